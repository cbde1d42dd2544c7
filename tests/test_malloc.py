import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource
    import torch
    from dsv2.malloc import keep_freed_memory

    def faults_of_a_big_tensor():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(64 * 2**20 // 4)  # 64 MiB: allocated, written, freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_a_big_tensor()
    default = faults_of_a_big_tensor()
    applied = keep_freed_memory()
    for _ in range(3):  # the heap grows to hold it (the first one or two fault their pages in once)
        faults_of_a_big_tensor()
    print(default, applied, max(faults_of_a_big_tensor() for _ in range(3)))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    default, applied, kept = int(out[0]), out[1] == "True", int(out[2])
    assert applied
    assert default > 1000  # glibc maps a fresh 64 MiB each time: its pages fault in again
    assert kept < default / 10  # kept in the heap: later tensors reuse the earlier ones' pages
