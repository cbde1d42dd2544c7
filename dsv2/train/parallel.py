"""torch.distributed for training, applied from outside the model: data parallel (DDP or FSDP2) and expert parallel.

Expert parallel: the routed experts of every MoE layer are split over the ranks and tokens travel to their experts
by all-to-all (`dsv2.parallel.expert_parallel`, shared with data-parallel-attention inference); the all-to-alls are
differentiable, so gradients follow the same path backwards. Expert weights differ per rank, so data parallelism
must not average them: they are excluded from DDP, and their gradients — which collect every rank's contribution
through the all-to-all — are divided by the world size instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from dsv2.parallel.expert_parallel import ExpertParallelExperts
from dsv2.parallel.process_group import end_process_group


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
        """End the process group (`end_process_group`: past gloo's teardown hang)."""
        if self.enabled:
            end_process_group()


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
