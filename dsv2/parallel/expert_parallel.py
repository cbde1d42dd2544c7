"""Expert parallelism with token dispatch: the routed experts of a MoE layer split over the ranks, tokens sent to them.

Rank r owns a contiguous slice of E / world experts. Each rank routes its own tokens, sends every (token, expert)
assignment to the expert's owner with an all-to-all, computes the experts it owns on what it received (grouped per
expert), and sends the results back with a second all-to-all. Ranks may hold different numbers of tokens. The
all-to-alls are differentiable (torch.distributed.nn), so training's gradients follow the same path backwards; data-
parallel-attention inference (every rank its own requests, `dsv2.parallel.group`) uses the same module.

Device-level token dropping (DeepSeek-V2's training, section 5 of the reference): with ``capacity_factor`` set, a
rank computes at most capacity_factor × (all ranks' assignments) / ranks of the assignments it receives in a
training forward, keeping those of the highest affinity (their combine weight); assignments of tokens marked
``protected`` (the trainer marks ~10% of the sequences) are never dropped. A dropped assignment adds nothing to its
token's output. Inference never drops.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.moe import MoE, RoutedExperts, grouped_linear


def split_evenly(n: int, world: int, what: str) -> int:
    """n // world, or a ValueError naming ``what`` where world ranks cannot share n equally."""
    if n % world:
        raise ValueError(f"{what} = {n} cannot be split evenly over {world} ranks")
    return n // world


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
        self.num_experts, self.world_size, self.rank = experts.num_experts, world_size, rank
        self.local = split_evenly(experts.num_experts, world_size, "n_routed_experts")
        self.first_expert = rank * self.local  # the index of gate_proj[0] among the layer's experts
        owned = slice(self.first_expert, self.first_expert + self.local)
        self.gate_proj = nn.Parameter(experts.gate_proj.detach()[owned].clone())  # [E/world, I, H]
        self.up_proj = nn.Parameter(experts.up_proj.detach()[owned].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[owned].clone())
        self.capacity_factor: float | None = None  # device-level token dropping in training (None: off)
        self.protected: torch.Tensor | None = None  # [N] bool: this forward's tokens that are never dropped
        self.dropped = self.received = 0  # assignments dropped / received by this rank in its last forward

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
        kept = self._kept(N * k, weights.flatten()[order], order // k, send, recv)  # [M] bool, or None: all
        local_order = local_ids.argsort(stable=True)  # [M]: rows grouped by local expert
        if kept is not None:
            local_order = local_order[kept[local_order]]  # [M'] the kept rows, still grouped
        counts = torch.bincount(local_ids[local_order], minlength=self.local)  # [E/world]
        offsets = counts.cumsum(0).to(torch.int32)  # [E/world]
        xs = got_x[local_order]  # [M', H]
        h = F.silu(grouped_linear(xs, self.gate_proj, offsets)) * grouped_linear(xs, self.up_proj, offsets)
        ys = grouped_linear(h, self.down_proj, offsets)  # [M', H], grouped by local expert
        results = ys.new_zeros(got_x.shape) if kept is not None else torch.empty_like(ys)  # [M, H]: dropped rows 0
        results[local_order] = ys  # back to the order received
        back = _all_to_all(results.new_empty(N * k, x.shape[1]), results, send, recv)  # [N·k, H], autocast's dtype
        out = torch.empty_like(back)
        out[order] = back  # (token, slot) order
        return (out.view(N, k, -1).to(torch.float32) * weights[:, :, None]).sum(dim=1)

    def _kept(self, assignments: int, affinity: torch.Tensor, token: torch.Tensor, send: list[int],
              recv: list[int]) -> torch.Tensor | None:
        """Which received assignments this rank computes under device-level token dropping: [M] bool, or None
        when nothing is dropped (inference, dropping off). ``affinity`` and ``token`` [N·k]: each sent assignment's
        combine weight and token, in sending order."""
        self.dropped, self.received = 0, sum(recv)
        if self.capacity_factor is None or not (self.training and torch.is_grad_enabled()):
            return None
        total = torch.tensor(float(assignments), device=affinity.device)
        dist.all_reduce(total)  # every rank's assignments: the average load per device is total / ranks
        capacity = math.ceil(self.capacity_factor * total.item() / self.world_size)
        protected = torch.zeros_like(token, dtype=torch.bool) if self.protected is None else self.protected[token]
        got_affinity = torch.empty(sum(recv), dtype=affinity.dtype, device=affinity.device)
        dist.all_to_all_single(got_affinity, affinity.detach().contiguous(), recv, send)
        got_protected = torch.empty(sum(recv), dtype=torch.bool, device=affinity.device)
        dist.all_to_all_single(got_protected, protected.contiguous(), recv, send)
        kept = keep_within_capacity(got_affinity, got_protected, capacity)
        self.dropped = int((~kept).sum())
        return kept


def keep_within_capacity(affinity: torch.Tensor, protected: torch.Tensor, capacity: int) -> torch.Tensor:
    """[M] bool: the protected rows, then the highest-affinity others (ties: the earlier row) up to ``capacity``
    rows in all (protected rows are kept even beyond it)."""
    rows = affinity.shape[0]
    if rows <= capacity:
        return torch.ones(rows, dtype=torch.bool, device=affinity.device)
    priority = torch.where(protected, torch.inf, affinity.to(torch.float32))  # [M]
    order = priority.argsort(descending=True, stable=True)  # [M]
    kept = torch.zeros(rows, dtype=torch.bool, device=affinity.device)
    kept[order[: max(capacity, int(protected.sum()))]] = True
    return kept


def expert_parallel_layers(model: nn.Module) -> list[ExpertParallelExperts]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]


def set_token_dropping(model: nn.Module, capacity_factor: float | None) -> None:
    """Device-level token dropping at ``capacity_factor`` (None: off) in every expert-parallel layer."""
    for layer in expert_parallel_layers(model):
        layer.capacity_factor = capacity_factor


@contextlib.contextmanager
def protected_tokens(model: nn.Module, protected: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the tokens marked in ``protected`` ([B, T] bool, the forward's input) are never dropped."""
    layers = expert_parallel_layers(model)
    for layer in layers:
        layer.protected = None if protected is None else protected.flatten()
    try:
        yield
    finally:
        for layer in layers:
            layer.protected = None


def dropped_counts(model: nn.Module) -> tuple[int, int]:
    """(assignments dropped, assignments received) by this rank over its expert-parallel layers' last forward."""
    layers = expert_parallel_layers(model)
    return sum(m.dropped for m in layers), sum(m.received for m in layers)


def expert_parameter_names(model: nn.Module) -> list[str]:
    """The names of the expert-parallel slices' parameters in ``model`` (none before `shard_experts`)."""
    return [f"{name}.{p}" for name, module in model.named_modules() if isinstance(module, ExpertParallelExperts)
            for p in ("gate_proj", "up_proj", "down_proj")]


def check_expert_split(config: ModelConfig, ranks: int, setting: str) -> None:
    """Before any model is built: a ValueError naming ``setting`` unless ``config``'s model has routed experts
    that split evenly over ``ranks``."""
    if not any(config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        raise ValueError(f"{setting}={ranks}: the model has no MoE layers, so no routed experts to split over ranks")
    try:
        split_evenly(config.n_routed_experts, ranks, "n_routed_experts")
    except ValueError as e:
        raise ValueError(f"{setting}={ranks}: the model's {e}") from None


def shard_experts(model: nn.Module, rank: int, world_size: int) -> list[str]:
    """Replace every MoE layer's experts with this rank's expert-parallel slice (on the meta device too); returns
    the sharded parameters' names (training: for DDP to ignore and for gradient scaling; inference: to load)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            module.experts = ExpertParallelExperts(module.experts, rank, world_size)
            names += [f"{name}.experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return names
