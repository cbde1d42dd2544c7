"""Multi-head Latent Attention (MLA), with two paths over the same weights.

Per token x (H = hidden size, n_h heads, d = qk_nope_head_dim, d_R = qk_rope_head_dim, r = kv_lora_rank):
  q            = q_proj(x)  or  q_b_proj(q_a_layernorm(q_a_proj(x)))            → [n_h, d + d_R] = q_nope | q_pe
  latent       = kv_a_layernorm(c) | rope(k_pe),  c | k_pe = kv_a_proj_with_mqa(x) → [r + d_R], what the cache keeps
*expanded*: k_nope | v = kv_b_proj(c_n) per head; ordinary attention over keys [k_nope ; k_pe] (training, prefill).
*absorbed*: W_UK folds into the query (q̃ = q_nope·W_UK, r-d), W_UV into the output; attention is then MQA with one
            (r + d_R)-d key and one r-d value per token, read straight from the latent cache (decoding).
Both use scale = (d + d_R)^-0.5 · m² (see ModelConfig.softmax_scale).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dsv2 import kernels
from dsv2.config import ModelConfig
from dsv2.model.cache import LatentCache
from dsv2.model.hooks import hooked_within
from dsv2.model.linear import (
    Linear,
    autocast_input,
    matmul_dtype,
    small_matmul_applies,
    weight_key,
)
from dsv2.model.norm import RMSNorm
from dsv2.model.rope import apply_rope

AttentionImpl = Literal["auto", "expanded", "absorbed"]


# The reference builds the compressed query's and latent's norms with RMSNorm's default eps, whatever the config's
# rms_norm_eps (which the decoder layers' and the final norm use); so do DeepSeek's code and transformers.
LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        self.dropout = config.attention_dropout
        hidden, bias, qk_dim = config.hidden_size, config.attention_bias, config.qk_head_dim
        self.q_lora_rank = config.q_lora_rank
        if config.q_lora_rank is None:
            self.q_proj = Linear(hidden, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(hidden, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(config.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.num_heads * self.v_dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: LatentCache | None = None, impl: AttentionImpl = "auto") -> torch.Tensor:
        """x [B, T, H], cos/sin [B, T, d_R/2], positions [B, T] → [B, T, H].

        Without a cache the T tokens attend causally to each other. With one, their latents are appended and they
        attend to every cached entry at a position ≤ their own. ``impl="auto"`` decodes single tokens through the
        absorbed path and runs everything else expanded.
        """
        B, T, _ = x.shape
        absorbed = impl == "absorbed" or (impl == "auto" and cache is not None and T == 1)
        if absorbed and T == 1 and cache is not None and self.fused_step_applies(x, cache):
            return self.fused_step(x, cos, sin, positions, cache)
        x = autocast_input(x)  # read by two projections
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.num_heads, self.nope_dim + self.rope_dim)  # [B, T, n_h, d + d_R]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None])  # [B, T, n_h, d_R]

        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)  # [B, T, r], [B, T, d_R]
        # The normed latent in autocast's dtype (every reader casts it there anyway), so that the keys built from it
        # are 16-bit too: one cast of [B, T, r], not of the [B, n_h, T, d + d_R] keys, forward and back.
        c_normed = autocast_input(self.kv_a_layernorm(c))  # [B, T, r]
        latent = torch.cat([c_normed, apply_rope(k_pe, cos, sin)], dim=-1)  # [B, T, r + d_R]

        if absorbed and T == 1 and cache is not None and cache.fused_decode_applies(latent.dtype, self.kv_rank):
            # a kernel writes the latents and attends straight over the cache: no gathered context, no mask
            q = self.absorbed_query(q_nope, q_pe)[:, 0]  # [B, n_h, r + d_R]
            out_latent = cache.fused_decode(self.layer_idx, latent, positions, q, self.softmax_scale, self.kv_rank)
            return self.o_proj(self.unabsorb(out_latent[:, :, None]).flatten(2))  # [B, 1, H]
        if cache is None:
            mask = None  # causal among the T tokens
        else:  # entry s of the returned context = position s; mask None: every key up to the query's own
            latent, mask = cache.update(self.layer_idx, latent, positions)  # [B, S, r + d_R], [B, T, S] | None

        out = self.absorbed(q_nope, q_pe, latent, mask) if absorbed else self.expanded(q_nope, q_pe, latent, mask)
        return self.o_proj(out.flatten(2))  # [B, T, n_h·v] → [B, T, H]

    def fused_step_applies(self, x: torch.Tensor, cache: LatentCache) -> bool:
        """Whether `fused_step` can take this decoding step: inference on an AVX-512 CPU, x in the weights' dtype
        (bf16 or float32) for few enough rows (SMALL_MATMUL_MAX_ROWS), no biases, every product's inner size a
        multiple of 32, a cache the attention kernel reads, and no hooks on the projections and norms it computes."""
        w = self.kv_a_proj_with_mqa.weight
        return (self._fused_shapes_ok and small_matmul_applies(x.shape[0], x, w)
                and self.kv_a_layernorm.weight.dtype == x.dtype and cache.fused_decode_applies(x.dtype, self.kv_rank)
                and not any(map(hooked_within, self.children())))

    @functools.cached_property
    def _fused_shapes_ok(self) -> bool:
        inner = [self.kv_a_proj_with_mqa.in_features, self.nope_dim, self.kv_rank, self.num_heads * self.v_dim]
        projections = [self.kv_a_proj_with_mqa, self.o_proj]
        if self.q_lora_rank is not None:
            inner.append(self.q_lora_rank)
            projections.append(self.q_a_proj)
        # plain projections only: a tensor-parallel o_proj (RowParallelLinear) sums its output over the ranks
        plain = all(type(p) is Linear for p in projections)
        return plain and all(size % 32 == 0 for size in inner) and all(p.bias is None for p in projections)

    def fused_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   cache: LatentCache, norm: RMSNorm | None = None) -> torch.Tensor:
        """One token per row, the whole absorbed path in one kernel call (`mla_decode`: the products, norms, RoPE,
        the cache write and the attention, with this module's roundings): x [B, 1, H] → [B, 1, H].
        With the decoder layer's ``norm`` (of the same eps), x is its residual stream h: → h + attention(norm(h))."""
        w_uk_t, w_uv = self.absorbed_weights()
        layer, write_slots, read_slots, lengths = cache.step_slots(self.layer_idx, positions)
        lora = self.q_lora_rank is not None
        out = kernels.cpu_ops().mla_decode(
            x[:, 0], None if lora else self.q_proj.weight, self.q_a_proj.weight if lora else None,
            self.q_a_layernorm.weight if lora else None, self.q_b_proj.weight if lora else None,
            self.kv_a_proj_with_mqa.weight, self.kv_a_layernorm.weight, w_uk_t, w_uv, self.o_proj.weight,
            cos[:, 0], sin[:, 0], layer, write_slots, read_slots, lengths, self.kv_a_layernorm.eps, self.softmax_scale,
            None if norm is None else norm.weight)
        return out[:, None]  # [B, 1, H]

    def expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """Per-head K/V re-materialized from the latent. q_* [B, T, n_h, ·], latent [B, S, r + d_R] → [B, T, n_h, v].

        ``mask`` None means bottom-right causal: the T queries are the last T of the S positions.
        """
        B, S, _ = latent.shape
        T = q_nope.shape[1]
        c, k_pe = latent.split([self.kv_rank, self.rope_dim], dim=-1)  # [B, S, r], [B, S, d_R]
        kv = self.kv_b_proj(c).view(B, S, self.num_heads, self.nope_dim + self.v_dim)  # [B, S, n_h, d + v]
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        # q and k concatenated straight into the heads-first layout the batched matmuls read (one copy each)
        k = torch.cat([k_nope.transpose(1, 2), k_pe[:, None].expand(-1, self.num_heads, -1, -1)],
                      dim=-1)  # [B, n_h, S, d + d_R]
        q = torch.cat([q_nope.transpose(1, 2), q_pe.transpose(1, 2)], dim=-1)  # [B, n_h, T, d + d_R]
        v = v.transpose(1, 2)  # [B, n_h, S, v]
        if _matmul_attention_pays(q, S, masked=mask is not None):
            dropout = self.dropout if self.training else 0.0
            out = causal_matmul_attention(q, k, v, self.softmax_scale, dropout, mask=mask)  # [B, n_h, T, v]
            return out.transpose(1, 2)  # [B, T, n_h, v]
        # The fused (flash) SDPA kernels want one head size for q, k and v: pad v with zeros, drop them after.
        pad = q.shape[-1] - self.v_dim
        v = F.pad(v, (0, pad)) if pad > 0 else v  # [B, n_h, S, max(v, d + d_R)]
        out = F.scaled_dot_product_attention(
            q, k, v,  # [B, n_h, T|S, ·]
            attn_mask=None if mask is None else mask[:, None],  # [B, 1, T, S]
            is_causal=mask is None and T > 1, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, n_h, T, ·]
        return out[..., : self.v_dim].transpose(1, 2)  # [B, T, n_h, v]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UKᵀ [n_h, r, d] and W_UV [n_h, v, r] out of kv_b_proj (per head, [out, in] as a linear layer stores
        them): contiguous copies at inference (rebuilt when the weight changes), views when gradients must flow into
        kv_b_proj."""
        w = self.kv_b_proj.weight
        if torch.is_grad_enabled() and w.requires_grad:
            w_uk, w_uv = w.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank).split(
                [self.nope_dim, self.v_dim], dim=1)
            return w_uk.transpose(1, 2), w_uv
        key = (*weight_key(w), w.dtype, w.device)
        if getattr(self, "_absorbed_key", None) != key:
            w_kv_b = w.detach().view(self.num_heads, self.nope_dim + self.v_dim, self.kv_rank)  # [n_h, d + v, r]
            w_uk, w_uv = w_kv_b.split([self.nope_dim, self.v_dim], dim=1)
            self._absorbed = w_uk.transpose(1, 2).contiguous(), w_uv.contiguous()
            self._absorbed_key = key
        return self._absorbed

    def absorbed_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """W_UK folded into the query: q_* [B, T, n_h, ·] → [B, T, n_h, r + d_R], a query against the latent."""
        w_uk_t, _ = self.absorbed_weights()  # [n_h, r, d]
        return torch.cat([per_head_matmul(q_nope, w_uk_t), q_pe], dim=-1)  # [B, T, n_h, r + d_R]

    def unabsorb(self, out_latent: torch.Tensor) -> torch.Tensor:
        """W_UV applied to the attention's output over the latent: [B, n_h, T, r] → [B, T, n_h, v]."""
        _, w_uv = self.absorbed_weights()  # [n_h, v, r]
        return per_head_matmul(out_latent.transpose(1, 2), w_uv)

    def absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """MQA over the latent with W_UK/W_UV folded in. q_* [B, T, n_h, ·], latent [B, S, r + d_R] → [B, T, n_h, v].

        ``mask`` None means bottom-right causal, as in `expanded`.
        """
        B, T, n_h, _ = q_nope.shape
        S = latent.shape[1]
        q = self.absorbed_query(q_nope, q_pe)  # [B, T, n_h, r + d_R]
        if mask is None and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None].expand(B, T, S)
        # Fold the heads into the query length: one key/value head shared by all n_h·T query rows.
        q = q.transpose(1, 2).reshape(B, 1, n_h * T, self.kv_rank + self.rope_dim)  # [B, 1, n_h·T, r + d_R]
        if mask is not None:
            mask = mask[:, None].expand(B, n_h, T, S).reshape(B, 1, n_h * T, S)  # [B, 1, n_h·T, S]
        if q.device.type != "cpu" and not torch.is_grad_enabled() and S >= LATENT_MATMUL_MIN_KEYS:
            out_latent = latent_matmul_attention(q[:, 0], latent, mask, self.softmax_scale, self.kv_rank)
        else:  # the whole latent serves as the value (same head size as q/k: the fused kernel applies); keep its r
            out_latent = F.scaled_dot_product_attention(
                q, latent[:, None], latent[:, None], attn_mask=mask, scale=self.softmax_scale,
            )[:, 0, :, : self.kv_rank]  # [B, n_h·T, r]
        return self.unabsorb(out_latent.reshape(B, n_h, T, self.kv_rank))  # [B, T, n_h, v]


LATENT_MATMUL_MIN_KEYS = 512  # from here on a GPU decodes with `latent_matmul_attention` (about even at 512)


def latent_matmul_attention(q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None, scale: float,
                            value_dim: int) -> torch.Tensor:
    """Absorbed attention as two batched matmuls around a softmax in float32 (or wider), for decoding on a GPU over
    LATENT_MATMUL_MIN_KEYS rows or more: q [B, M, D] (the n_h·T query rows of one shared key/value head), latent
    [B, S, D], mask [B, 1, M, S] (True: attend) or None (every key) → [B, M, value_dim], the probabilities times the
    latent's first value_dim values. torch's fused attention runs one thread block per (sequence, 64 query rows)
    here, over a head size (576 on V2-Lite) past the flash kernel's, and its time grows with S; these matmuls' barely
    does. Measured on an H200, bf16, 16 query rows per sequence, D = 576, rows masked to their own lengths, each call
    timed alone (`benchmarks/bench_cuda.py` (d), two runs): over 2,048 rows 112-172 µs vs 250-287 µs fused, batches
    of 1 to 64; over 256 rows 115-127 µs vs 74-79 µs."""
    scores = torch.bmm(q, latent.transpose(1, 2))  # [B, M, S] in q's dtype, accumulated in float32
    if mask is not None:
        scores = scores.masked_fill(~mask[:, 0], float("-inf"))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # 16-bit scores: a float32 softmax
    probs = torch.softmax(scores * scale, dim=-1).to(latent.dtype)  # [B, M, S]
    return torch.bmm(probs, latent[..., :value_dim])  # [B, M, value_dim]


def per_head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each head's rows times its own weight: x [B, T, n_h, K], weight [n_h, N, K] → [B, T, n_h, N]. A few rows
    (decoding) go through the `small_matmul` kernel where it applies: it reads the weight at the memory's rate,
    where torch's batched matmul of 16 heads × one row managed ~4 GB/s."""
    B, T, n_h, K = x.shape
    if small_matmul_applies(B * T, x, weight):
        rows = x.reshape(B * T, n_h, K).transpose(0, 1)  # [n_h, B·T, K], a view where x allows
        out = kernels.cpu_ops().small_matmul(rows, weight)  # [n_h, B·T, N]
        return out.transpose(0, 1).view(B, T, n_h, -1)
    return torch.einsum("bthk,hnk->bthn", x, weight)


# Queries per block of `causal_matmul_attention`, each block scored against only the keys up to its last query. Without
# AMX (AVX-512 bf16 dot products: a 2-core EPYC, Zen 4), 16 heads of 96, bf16: forward over 512 tokens 4.3 ms in
# blocks of 128, 11.5 ms unblocked, 11.2 ms the flash kernel; 2,048 tokens 64 / 159 / 97 ms; 4,096 tokens 292 ms
# blocked, 353 ms flash; forward + backward of 8 × 512 tokens 152 / 206 / 299 ms. With AMX (Intel Xeon) one block:
# there the blocks' smaller, strided products ran at half the rate (an attention core 156 vs 124 ms). On Zen 5 (AMD
# family 26, full-width AVX-512) blocks of 256: forward + backward of 8 × 512 tokens 64 ms vs 82 in blocks of 128 (72
# unblocked), 4 × 1,024 132 vs 208, 2 × 2,048 250 vs 350; forward over 2,048 tokens 32.7 vs 37.6 ms, 4,096 120 vs 145;
# a training step of the benchmark's model 1.02-1.03× (same-process A/B).
MATMUL_ATTENTION_BLOCK = (None if "amx_bf16" in kernels.cpu_flags()
                          else 256 if kernels.cpu_vendor() == "AuthenticAMD" and kernels.cpu_family() >= 26 else 128)
# Training (16-bit, with gradients): the keys up to which the matmul path's forward + backward beat the flash kernel's.
# With AMX, unblocked: up to 512. In blocks (no AMX), forward + backward of the attention core over 16 heads of 96,
# bf16: 4 × 1,024 tokens 279 vs 359 ms flash, 2 × 2,048 529 vs 579 ms, 1 × 4,096 1,060 vs 1,045 ms; a whole training
# step of the benchmark's model 1.03× at 4 × 1,024 tokens, 1.01× at 2 × 2,048 (same-process A/B). Up to 1,024: the
# probabilities it keeps for the backward (~n_h · T² / 2 bf16 values per sequence and layer) grow with T².
MATMUL_ATTENTION_MAX_KEYS = 512 if MATMUL_ATTENTION_BLOCK is None else 1024
MATMUL_ATTENTION_MAX_INFERENCE_KEYS = 4096  # inference, in blocks: beyond, the flash kernel (no [T, S] scores held)
# float32 inference, in blocks, unmasked: prefill of the benchmark's model 1.07× at 512 tokens, 1.04× at 4 × 256, 1.01×
# at 1,024, 1.00× at 8 × 128; the attention core alone at 2,048 tokens 99 vs 94 ms flash
MATMUL_ATTENTION_MAX_FLOAT32_KEYS = 1024


def _matmul_attention_pays(q: torch.Tensor, keys: int, masked: bool = False) -> bool:
    """Whether `causal_matmul_attention` is faster than the flash kernel here: on CPU, in 16-bit (bf16 autocast
    included), with gradients over at most MATMUL_ATTENTION_MAX_KEYS keys (there the flash kernel's backward runs at a
    fraction of the matmul rate: forward + backward over 16 heads of 96 took 65 ms this way vs 85 ms fused for 4 × 512
    tokens, 26 vs 67 ms for 8 × 256 on the AMX machine), and without them, in blocks (no AMX), over at most
    MATMUL_ATTENTION_MAX_INFERENCE_KEYS, ``masked`` (the engine's prefills after a prefix-cache hit or in chunks:
    a bf16 attention core of 128 queries over 640 keys 2.2 vs 4.8 ms flash, 4 × 128 over 640 8.9 vs 16.3 ms, 512
    over 1,024 18.4 vs 22.1 ms) or not. In float32 only inference without a mask over at most
    MATMUL_ATTENTION_MAX_FLOAT32_KEYS, in blocks; elsewhere the fused kernel is as fast or faster (and never holds
    the scores)."""
    if q.device.type != "cpu":
        return False
    sixteen_bit = matmul_dtype(q) in (torch.bfloat16, torch.float16)
    if torch.is_grad_enabled():
        return sixteen_bit and not masked and keys <= MATMUL_ATTENTION_MAX_KEYS
    if MATMUL_ATTENTION_BLOCK is None:
        return False
    if sixteen_bit:
        return keys <= MATMUL_ATTENTION_MAX_INFERENCE_KEYS
    return q.dtype == torch.float32 and not masked and keys <= MATMUL_ATTENTION_MAX_FLOAT32_KEYS


def causal_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            dropout: float = 0.0, block: int | None = MATMUL_ATTENTION_BLOCK,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bottom-right causal attention written as two batched matmuls around a softmax, as the reference's eager
    path computes it, ``block`` queries at a time (None: all at once), each block against only the keys up to its
    last query: the keys after it are never scored. ``mask`` [B, T, S] (True: attend; every query sees a key) replaces
    the causal rule, each block then scoring every key. q [B, n_h, T, D], k [B, n_h, S, D], v [B, n_h, S, V] →
    [B, n_h, T, V]."""
    B, n_h, T, _ = q.shape
    S = k.shape[2]
    q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)  # [B·n_h, ·, ·]
    outs, size = [], block or T  # size: queries per block
    for start in range(0, T, size):
        end = min(start + size, T)
        rows = end - start
        # bias = -inf where a query must not see a key, else 0; scores = bias + scale · q kᵀ, one matmul: no masking
        # pass, nor one in backward
        if mask is None:
            keys = S - T + end  # the block's queries see keys [0, keys), the last one all of them
            bias = torch.full((1, rows, keys), float("-inf"), dtype=q.dtype, device=q.device).triu(keys - rows + 1)
        else:
            keys = S
            bias = torch.zeros(B, 1, rows, S, dtype=q.dtype, device=q.device).masked_fill_(
                ~mask[:, None, start:end], float("-inf")).expand(-1, n_h, -1, -1).reshape(B * n_h, rows, S)
        scores = torch.baddbmm(bias, q[:, start:end], k[:, :keys].transpose(1, 2), alpha=scale)
        probs = scores.softmax(dim=-1)  # [B·n_h, rows, keys], float32 math inside
        if dropout > 0:
            probs = F.dropout(probs, dropout)
        outs.append(torch.bmm(probs, v[:, :keys]))  # [B·n_h, rows, V]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [B·n_h, T, V]
    return out.view(B, n_h, T, -1)  # [B, n_h, T, V]
