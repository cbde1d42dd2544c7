"""The expert-parallel balance losses of the DeepSeek-V2 paper (section 5 of the reference), per MoE layer.

With the routed experts spread over D devices (E/D each) and every token routed to at most M devices:
- device-level: f′_i = mean of f_j over device i's experts, P′_i = Σ_j P_j; L = α2 Σ_i f′_i P′_i
- communication: f″_i = D/(M·T) · (tokens of the sequence sent to device i), P″_i = P′_i; L = α3 Σ_i f″_i P″_i
where f_j = (tokens routed to expert j) / (T·k/E) and P_j = mean routing probability of j, per sequence of T tokens;
both are averaged over the sequences of the batch, like the expert-level loss with seq_aux.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from dsv2.model.moe import MoE, Routing


def device_balance_losses(routing: Routing, batch: int, seq_len: int, devices: int, device_limit: int,
                          device_alpha: float, comm_alpha: float) -> torch.Tensor:
    B, T, D = batch, seq_len, devices
    E = routing.scores.shape[1]
    k = routing.expert_ids.shape[1]
    ids = routing.expert_ids.view(B, T * k)  # [B, T·k]
    f = torch.zeros(B, E, device=ids.device).scatter_add_(1, ids, torch.ones(B, T * k, device=ids.device))
    f = f / (T * k / E)  # [B, E]
    P = routing.scores.view(B, T, E).mean(dim=1)  # [B, E]
    f_device = f.view(B, D, E // D).mean(dim=-1)  # [B, D]
    P_device = P.view(B, D, E // D).sum(dim=-1)  # [B, D]
    loss = device_alpha * (f_device * P_device).sum(dim=-1).mean()
    device_of = routing.expert_ids.view(B, T, k) // (E // D)  # [B, T, k]
    sent = torch.zeros(B, T, D, device=ids.device).scatter_(2, device_of, 1.0)  # [B, T, D] token t goes to device i
    f_comm = sent.sum(dim=1) * D / (device_limit * T)  # [B, D]
    return loss + comm_alpha * (f_comm * P_device).sum(dim=-1).mean()


def add_device_balance_losses(model: nn.Module, devices: int, device_limit: int | None, device_alpha: float,
                              comm_alpha: float) -> None:
    """Make every MoE layer add the device-level and communication losses to its balance loss in training."""
    if not device_alpha and not comm_alpha:
        return
    for module in model.modules():
        if isinstance(module, MoE):
            if module.gate.num_experts % devices:
                raise ValueError(f"{module.gate.num_experts} experts cannot be split over {devices} devices")
            limit = device_limit or min(devices, module.top_k)
            module.extra_balance_loss = functools.partial(device_balance_losses, devices=devices,
                                                          device_limit=limit, device_alpha=device_alpha,
                                                          comm_alpha=comm_alpha)


def limit_devices(model: nn.Module, devices: int, device_limit: int) -> None:
    """Device-limited routing: each token's experts come from at most ``device_limit`` of the ``devices`` groups
    (the devices whose best expert scores highest) — group-limited greedy routing with one group per device."""
    for module in model.modules():
        if isinstance(module, MoE):
            gate = module.gate
            if gate.num_experts % devices or not 0 < device_limit <= devices:
                raise ValueError(f"device_limit={device_limit} with {devices} devices and {gate.num_experts} experts")
            if gate.top_k > device_limit * (gate.num_experts // devices):
                raise ValueError(f"{gate.top_k} experts per token do not fit on {device_limit} devices")
            gate.topk_method, gate.n_group, gate.topk_group = "group_limited_greedy", devices, device_limit


@contextlib.contextmanager
def balance_over(model: nn.Module, valid: torch.Tensor | None) -> Iterator[None]:
    """Within the block, every MoE layer's expert-level balance loss counts only the input tokens marked in
    ``valid`` ([B, T] bool; None or all True: every token, the layers' own loss). SFT rows are padded to the
    longest in their micro-batch: without this, the padding would enter the loss, which would then depend on how a
    batch is split into micro-batches."""
    layers = [m for m in model.modules() if isinstance(m, MoE)] if valid is not None and not bool(valid.all()) \
        else []
    for layer in layers:
        layer.balance_mask = valid
    try:
        yield
    finally:
        for layer in layers:
            layer.balance_mask = None
