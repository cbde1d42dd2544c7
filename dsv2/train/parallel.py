"""torch.distributed for training, applied from outside the model: data parallel (DDP or FSDP2) and expert parallel.

Expert parallel: the routed experts of every MoE layer are split over the ranks (rank r owns a contiguous slice of
E / world experts). Each rank routes its own tokens, sends every (token, expert) assignment to the expert's owner
with an all-to-all, computes the experts it owns on what it received (grouped per expert), and sends the results
back with a second all-to-all. The all-to-alls are differentiable (torch.distributed.nn), so gradients follow the
same path backwards. Expert weights differ per rank, so data parallelism must not average them: they are excluded
from DDP, and their gradients — which collect every rank's contribution through the all-to-all — are divided by the
world size instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from dsv2.model.moe import MoE, RoutedExperts, grouped_linear


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


class ExpertParallelExperts(nn.Module):
    """This rank's slice of a layer's routed experts, with token dispatch and combine over all-to-all."""

    def __init__(self, experts: RoutedExperts, rank: int, world_size: int) -> None:
        super().__init__()
        if experts.num_experts % world_size:
            raise ValueError(f"{experts.num_experts} routed experts cannot be split evenly over {world_size} ranks")
        self.num_experts, self.world_size, self.rank = experts.num_experts, world_size, rank
        self.local = experts.num_experts // world_size
        owned = slice(rank * self.local, (rank + 1) * self.local)
        self.gate_proj = nn.Parameter(experts.gate_proj.detach()[owned].clone())  # [E/world, I, H]
        self.up_proj = nn.Parameter(experts.up_proj.detach()[owned].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[owned].clone())

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], expert_ids/weights [N, k] → Σ_k weights·expert(x) [N, H] (float32), experts anywhere."""
        N, k = expert_ids.shape
        flat = expert_ids.flatten()  # [N·k]
        order = flat.argsort(stable=True)  # assignments grouped by expert, hence by owning rank
        send_counts = torch.bincount(flat // self.local, minlength=self.world_size)  # [world]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        sent_x = x[order // k]  # [N·k, H]
        got_x = dist_fn.all_to_all_single(x.new_empty(sum(recv), x.shape[1]), sent_x, recv, send)  # [M, H]
        got_ids = torch.empty(sum(recv), dtype=flat.dtype, device=flat.device)
        dist.all_to_all_single(got_ids, flat[order].contiguous(), recv, send)
        local_ids = got_ids - self.rank * self.local  # [M] in [0, E/world)
        local_order = local_ids.argsort(stable=True)
        counts = torch.bincount(local_ids, minlength=self.local)
        offsets = counts.cumsum(0).to(torch.int32)  # [E/world]
        xs = got_x[local_order]
        h = F.silu(grouped_linear(xs, self.gate_proj, offsets)) * grouped_linear(xs, self.up_proj, offsets)
        ys = grouped_linear(h, self.down_proj, offsets)  # [M, H], grouped by local expert
        results = torch.empty_like(ys)
        results[local_order] = ys  # back to the order received
        back = dist_fn.all_to_all_single(x.new_empty(N * k, x.shape[1]), results, send, recv)  # [N·k, H]
        out = torch.empty_like(back)
        out[order] = back  # (token, slot) order
        return (out.view(N, k, -1).to(torch.float32) * weights[:, :, None]).sum(dim=1)


def shard_experts(model: nn.Module, rank: int, world_size: int) -> list[str]:
    """Replace every MoE layer's experts with this rank's expert-parallel slice; returns the sharded parameters'
    names (for DDP to ignore and for gradient scaling)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            module.experts = ExpertParallelExperts(module.experts, rank, world_size)
            names += [f"{name}.experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return names


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
