"""Expert parallelism with token dispatch: the routed experts of a MoE layer split over the ranks, tokens sent to them.

Rank r owns a contiguous slice of E / world experts. Each rank routes its own tokens, sends every (token, expert)
assignment to the expert's owner with an all-to-all, computes the experts it owns on what it received (grouped per
expert), and sends the results back with a second all-to-all. Ranks may hold different numbers of tokens. The
all-to-alls are differentiable (torch.distributed.nn), so training's gradients follow the same path backwards; data-
parallel-attention inference (every rank its own requests, `dsv2.parallel.group`) uses the same module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from dsv2.model.moe import MoE, RoutedExperts, grouped_linear


def _all_to_all(output: torch.Tensor, sent: torch.Tensor, output_splits: list[int],
                sent_splits: list[int]) -> torch.Tensor:
    """Rows of ``sent`` go to the ranks by ``sent_splits``, received into ``output`` by ``output_splits``;
    differentiable when gradients are on (training), the plain collective otherwise (inference)."""
    if torch.is_grad_enabled():
        return dist_fn.all_to_all_single(output, sent, output_splits, sent_splits)
    dist.all_to_all_single(output, sent, output_splits, sent_splits)
    return output


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
        got_x = _all_to_all(x.new_empty(sum(recv), x.shape[1]), sent_x, recv, send)  # [M, H]
        got_ids = torch.empty(sum(recv), dtype=flat.dtype, device=flat.device)  # [M]: their experts
        dist.all_to_all_single(got_ids, flat[order].contiguous(), recv, send)
        local_ids = got_ids - self.rank * self.local  # [M] in [0, E/world)
        local_order = local_ids.argsort(stable=True)  # [M]: rows grouped by local expert
        counts = torch.bincount(local_ids, minlength=self.local)  # [E/world]
        offsets = counts.cumsum(0).to(torch.int32)  # [E/world]
        xs = got_x[local_order]  # [M, H]
        h = F.silu(grouped_linear(xs, self.gate_proj, offsets)) * grouped_linear(xs, self.up_proj, offsets)
        ys = grouped_linear(h, self.down_proj, offsets)  # [M, H], grouped by local expert
        results = torch.empty_like(ys)  # [M, H]
        results[local_order] = ys  # back to the order received
        back = _all_to_all(x.new_empty(N * k, x.shape[1]), results, send, recv)  # [N·k, H]
        out = torch.empty_like(back)
        out[order] = back  # (token, slot) order
        return (out.view(N, k, -1).to(torch.float32) * weights[:, :, None]).sum(dim=1)


def shard_experts(model: nn.Module, rank: int, world_size: int) -> list[str]:
    """Replace every MoE layer's experts with this rank's expert-parallel slice (on the meta device too); returns
    the sharded parameters' names (training: for DDP to ignore and for gradient scaling; inference: to load)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            module.experts = ExpertParallelExperts(module.experts, rank, world_size)
            names += [f"{name}.experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return names
