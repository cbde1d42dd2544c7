"""Keep freed memory in the process (glibc), so that the next step's tensors reuse it instead of faulting in pages.

A CPU training step frees and reallocates tensors of tens to hundreds of MB (logits, expert buffers, gradients) every
step. glibc serves each allocation over 32 MiB with a fresh ``mmap`` and unmaps it on free, so its pages fault in
one by one at every step: ~35 GB of page faults per step of the training benchmark's model (8.7 M minor faults), and
20% of its time. With mmap off and a high trim threshold, freed blocks stay in the heap for the next step.
The price: the process keeps its peak memory (as PyTorch's CUDA allocator does on GPUs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
KEEP_BYTES = 2**31 - 1  # free memory at the top of the heap is returned to the system only beyond this


@functools.cache
def keep_freed_memory() -> bool:
    """Switch glibc's malloc to reuse freed memory; once per process. → whether it applied (glibc only)."""
    path = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(path).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
