"""The paper's optimizer and learning-rate schedule.

AdamW (β1 0.9, β2 0.95, weight decay 0.1 on the weight matrices — the router's included — and none on norms and
biases), and a schedule of linear warm-up to the maximum, then ×0.316 after 80% and again after 90% of training
(V2 used 60% / 90%).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices; none on norms (1-d weights) and biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``parameter_groups``; torch's fused kernel where it applies (plain float tensors on CPU or CUDA,
    not FSDP's DTensors): one pass per tensor instead of ~8 (measured 4.4× faster on CPU), the same update."""
    groups = parameter_groups(model, weight_decay)
    params = [p for group in groups for p in group["params"]]
    fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def learning_rate(step: int, total_steps: int, max_lr: float, warmup_steps: int = 2000,
                  decay_at: Sequence[float] = (0.8, 0.9), decay_factor: float = 0.316) -> float:
    """The rate for optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps`` (``max_lr`` from step
    ``warmup_steps - 1`` on), then ``max_lr`` multiplied by ``decay_factor`` once per boundary in ``decay_at``
    (fractions of ``total_steps``) that has been passed."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    passed = sum(step >= round(fraction * total_steps) for fraction in decay_at)
    return max_lr * decay_factor**passed
