import mmap
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dsv2 import DeepseekV2ForCausalLM, LatentCache
from dsv2.malloc import HUGE_PAGE, place_on_huge_pages

from helpers import tiny_config

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


def mapping_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="Linux's transparent huge pages")
def test_a_cpu_model_and_its_caches_live_on_memory_advised_for_huge_pages():
    config = tiny_config()
    model = DeepseekV2ForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = list(dict.fromkeys(model.parameters()))
    starts = sorted(p.data_ptr() for p in params)
    assert starts[0] % HUGE_PAGE == 0  # one region, from a 2 MiB boundary on
    for p in params:
        assert p.data_ptr() % 64 == 0 and "hg" in mapping_flags(p.data_ptr())  # madvise(MADV_HUGEPAGE) took
    assert mapping_flags(starts[0]) == mapping_flags(starts[-1])
    cache = LatentCache(config, 2, 16, dtype=torch.bfloat16)
    assert "hg" in mapping_flags(cache.data.data_ptr()) and not cache.data.any()  # zeros, as torch.zeros


def test_parameters_moved_to_huge_pages_keep_their_values_objects_and_ties():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    model[0].weight = model[1].weight  # tied: one parameter in two places
    objects = list(model.parameters())
    before = [p.detach().clone() for p in objects]
    assert place_on_huge_pages(model) == hasattr(mmap, "MADV_HUGEPAGE")
    assert list(model.parameters()) == objects and model[0].weight is model[1].weight
    for p, value in zip(objects, before, strict=True):
        assert torch.equal(p, value)
    model(torch.randn(3, 64)).sum().backward()  # still trainable in place
    assert all(p.grad is not None for p in objects)
