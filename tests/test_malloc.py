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
    print(default, applied, *(faults_of_a_big_tensor() for _ in range(9)))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    default, applied, kept = int(out[0]), out[1] == "True", sorted(map(int, out[2:]))
    assert applied
    assert default > 1000  # glibc maps a fresh 64 MiB each time: its pages fault in again
    # kept in the heap: most later tensors reuse the earlier ones' pages (the heap's first one or two 64 MiB blocks,
    # and now and then one more, fault in once)
    assert kept[len(kept) // 2] < default / 10, kept
