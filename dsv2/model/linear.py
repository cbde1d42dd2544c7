"""nn.Linear with faster paths for inference on CPU.

- A few rows without gradients (decoding) on a CPU with AVX-512: `small_matmul_applies` → the `small_matmul` kernel
  (dsv2/kernels/small_matmul.cpp), which streams the weight once at the memory's rate; up to 16 rows (bf16 from 5
  rows on the AMX tiles where the CPU has them: 1.1-1.7× oneDNN's prepacked path at 5-16 rows, 1.1-2.5× the register
  tiles; without AMX, on an AMD EPYC, the register tiles: 1.2-2× oneDNN's at 2-8 rows, equal at 16). Where the
  kernels are missing:
- One row (batch-1 decoding): torch's matmul path (oneDNN) reads a bf16 weight for a single input row at
  ~15-23 GB/s, while ``torch.mv``'s bf16 gemv kernel reads it at ~22-37 GB/s (measured on the project's 2-core
  machine, 352×1024 to 4096×1024 weights; fp32 and fp16 are not faster through mv, so they keep the ordinary path).
  The result is the same product, rounded to bf16 once.
- Several rows without gradients: oneDNN (AMX where present) reads the weight in a blocked layout, and ``F.linear``
  re-lays out the whole [out, in] weight at every call. A layer's own weight is laid out once instead and kept
  (`prepacked_weight`, one extra copy of it), the way inference runtimes built on oneDNN prepack. Same kernel, same
  bits: the engine's batch-64 bf16 decoding step 9% faster (paired A/B), no change at thousands of rows.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from dsv2 import kernels

# The most rows that `small_matmul` takes; beyond, oneDNN / MKL are as fast or faster. Also the most sequences of a
# step that the whole-step kernels (mla_decode / moe_decode) take: their products run through small_matmul. float32 on
# AMD: up to 64, where MKL's float32 products of a few dozen rows ran at ~100 GFLOP/s on a 2-core EPYC (Zen 4) and
# small_matmul's were 1.4× faster at 64 rows; decode steps of 20-64 sequences 1.16-1.44× faster than with 16 (A/B in
# one process), 128 sequences no faster. Intel (the AMX machine): MKL is as fast from 17 rows on.
SMALL_MATMUL_MAX_ROWS = {torch.bfloat16: 16, torch.float32: 64 if kernels.cpu_vendor() == "AuthenticAMD" else 16}


def small_matmul_applies(rows: int, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `kernels.cpu_ops().small_matmul` takes `rows` rows of x times weight [..., N, K]ᵀ: inference (no
    gradients, no autocast) on CPU, x and weight both bf16 or both float32 (≤ 16 rows), K a multiple of 32."""
    return (rows <= SMALL_MATMUL_MAX_ROWS.get(x.dtype, 0) and weight.dtype == x.dtype and x.device.type == "cpu"
            and weight.device.type == "cpu" and weight.shape[-1] % 32 == 0 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and kernels.cpu_ops() is not None)


def single_row_cpu_bf16(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x · weightᵀ is one bf16 row on CPU (no autocast), where `torch.mv` beats the matmul path."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.numel() == weight.shape[-1] and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           prepack: bool = False) -> torch.Tensor:
    """F.linear: x [..., in], weight [out, in] → [..., out], through `torch.mv` for one bf16 row on CPU.

    ``prepack``: the weight is a layer's own parameter (it lives on), so several bf16 rows on CPU without gradients
    read its `prepacked_weight`. Never for a weight made at the call (a slice): it would be packed at every call."""
    rows = x.numel() // x.shape[-1]
    if small_matmul_applies(rows, x, weight):
        y = kernels.cpu_ops().small_matmul(x, weight)  # [..., out]
        return y if bias is None else y + bias
    if single_row_cpu_bf16(x, weight):
        y = torch.mv(weight, x.reshape(-1))  # [out]
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weight.shape[0])
    if prepack and _prepacking_pays(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, prepacked_weight(weight), bias, "none", [], "")
    return F.linear(x, weight, bias)


def _prepacking_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Several bf16 rows on CPU, no autocast (training's fp32 master weights never qualify), no gradients."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and _onednn_prepacking_works())


PREPACK_ROWS_HINT = 64  # the row count oneDNN picks the packed layout for; any row count reads it (bitwise equal)
_prepacked: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight → ((data_ptr, version), packed copy)


def prepacked_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] bf16 on CPU in oneDNN's blocked layout for `torch.ops.mkldnn._linear_pointwise`, made at the
    first call and kept while the weight lives; remade when the weight is replaced or changed in place."""
    key = weight_key(weight)
    entry = _prepacked.get(weight)
    if entry is None or entry[0] != key:
        entry = key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PREPACK_ROWS_HINT)
        _prepacked[weight] = entry
    return entry[1]


def weight_key(weight: torch.Tensor) -> tuple[int, int]:
    """What identifies a weight's current values for a cache derived from it: its storage and its version counter
    (bumped by every in-place change). Inference tensors (made under ``torch.inference_mode``) keep no counter: 0."""
    return weight.data_ptr(), 0 if weight.is_inference() else weight._version


@functools.cache
def _onednn_prepacking_works() -> bool:
    """Whether this torch build has oneDNN's prepacked linear for bf16 (x86 CPU builds do)."""
    try:
        w = torch.ones(4, 8, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PREPACK_ROWS_HINT)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=torch.bfloat16), packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool((out == 8).all())


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul reading t runs in: autocast's where it is on for t's device, else t's own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype autocast gives a linear layer's input (x itself without autocast): for an input that several
    projections read, one cast (and one cast of its gradient back) instead of one per projection."""
    return x.to(matmul_dtype(x))


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) whose forward is `linear`, prepacking its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, prepack=True)
