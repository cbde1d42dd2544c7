"""torch.distributed for training, applied from outside the model: data parallel (DDP or FSDP2) and expert parallel.

Expert parallel: the routed experts of every MoE layer are split over the ranks and tokens travel to their experts
by all-to-all (`dsv2.parallel.expert_parallel`, shared with data-parallel-attention inference); the all-to-alls are
differentiable, so gradients follow the same path backwards. Expert weights differ per rank, so data parallelism
must not average them: they are excluded from DDP, and their gradients — which collect every rank's contribution
through the all-to-all — are divided by the world size instead.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from dsv2.parallel.expert_parallel import ExpertParallelExperts

GLOO_SETTLE_S = 0.2  # seconds for gloo's worker threads to release finished work before the group goes (see close)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """End the process group. gloo's worker threads release each finished collective's Python tensors under the
        GIL; the group's destructor (run when the last holder, e.g. DDP's reducer, goes) joins those threads while
        the caller holds the GIL. If a worker is still releasing the last barrier then, both wait forever: a rank
        hung so at the end of a 2-rank test run (torch 2.13, CPU). The pause hands the GIL over first."""
        if self.enabled and dist.is_initialized():
            time.sleep(GLOO_SETTLE_S)
            dist.destroy_process_group()


def init_distributed(device: str | None = None) -> Distributed:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a single process otherwise. NCCL on CUDA, gloo
    on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    target = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world, local, target)


def gather_experts(model: nn.Module, world_size: int) -> dict[str, torch.Tensor]:
    """The full stacked expert tensors (every rank's slice, in order), for saving a complete checkpoint."""
    full = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                local = getattr(module, p).detach().contiguous()
                parts = [torch.empty_like(local) for _ in range(world_size)]
                dist.all_gather(parts, local)
                full[f"{name}.{p}".replace("_orig_mod.", "")] = torch.cat(parts)
    return full
