"""Ending a torch.distributed process group without the gloo teardown hang.

gloo's worker threads release each finished collective's Python tensors under the GIL; the group's destructor (run by
`destroy_process_group`, or when its last holder, e.g. DDP's reducer, goes) joins those threads while the caller holds
the GIL. If a worker is still releasing the last collective's tensors then, both wait forever: a rank hung so at the
end of a 2-rank test run (torch 2.13, CPU). A short pause first hands the GIL over.
"""

from __future__ import annotations

import time

import torch.distributed as dist

GLOO_SETTLE_S = 0.2  # seconds for gloo's worker threads to release finished work before the group goes


def end_process_group() -> None:
    """Destroy the default process group, if there is one, after the pause above (training ranks, inference
    workers and the engine's rank 0 all end their group here)."""
    if dist.is_initialized():
        time.sleep(GLOO_SETTLE_S)
        dist.destroy_process_group()
