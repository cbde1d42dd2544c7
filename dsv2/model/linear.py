"""nn.Linear with a faster path for the one-row bf16 products of batch-1 decoding on CPU.

There torch's matmul path (oneDNN) reads a bf16 weight for a single input row at ~15-23 GB/s, while ``torch.mv``'s
bf16 gemv kernel reads it at ~22-37 GB/s (measured on the project's 2-core machine, 352×1024 to 4096×1024 weights;
fp32 and fp16 are not faster through mv, so they keep the ordinary path). The result is the same product, rounded to
bf16 once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def single_row_cpu_bf16(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x · weightᵀ is one bf16 row on CPU (no autocast), where `torch.mv` beats the matmul path."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.numel() == weight.shape[-1] and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear: x [..., in], weight [out, in] → [..., out], through `torch.mv` for one bf16 row on CPU."""
    if not single_row_cpu_bf16(x, weight):
        return F.linear(x, weight, bias)
    y = torch.mv(weight, x.reshape(-1))  # [out]
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul reading t runs in: autocast's where it is on for t's device, else t's own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype autocast gives a linear layer's input (x itself without autocast): for an input that several
    projections read, one cast (and one cast of its gradient back) instead of one per projection."""
    return x.to(matmul_dtype(x))


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) whose forward is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
