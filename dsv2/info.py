"""Model facts derived from a config: parameter counts and KV-cache sizes (what ``dsv2 info`` prints)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv2.config import ModelConfig
from dsv2.model.transformer import DeepseekV2ForCausalLM


@dataclass
class ModelSummary:
    total_params: int
    activated_params: int  # per token: everything but the routed experts a token is not sent to
    embedding_params: int  # the input embedding table (a lookup, not compute)
    latent_cache_values: int  # per token, all layers: kv_lora_rank + qk_rope_head_dim per layer
    expanded_cache_values: int  # per token, all layers: per-head K (nope + rope) and V


def summarize(config: ModelConfig) -> ModelSummary:
    """Counts come from the real module tree built on the meta device (no memory), not from a separate formula."""
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    total = model.num_parameters()
    idle_experts = 0
    if config.n_routed_experts is not None:
        per_expert = 3 * config.hidden_size * config.moe_intermediate_size
        idle = config.n_routed_experts - config.num_experts_per_tok
        idle_experts = idle * per_expert * len(config.moe_layer_indices)
    L, n_h = config.num_hidden_layers, config.num_attention_heads
    return ModelSummary(
        total_params=total,
        activated_params=total - idle_experts,
        embedding_params=model.model.embed_tokens.weight.numel(),
        latent_cache_values=L * config.latent_dim,
        expanded_cache_values=L * n_h * (config.qk_head_dim + config.v_head_dim),
    )


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def format_summary(config: ModelConfig, name: str, dtype: torch.dtype = torch.bfloat16) -> str:
    s = summarize(config)
    c = config
    n_moe = len(c.moe_layer_indices)
    query = "direct q_proj" if c.q_lora_rank is None else f"q_lora_rank {c.q_lora_rank}"
    rope = "plain RoPE" if c.rope_scaling is None else (
        f"YaRN ×{c.rope_scaling['factor']} from {c.rope_scaling['original_max_position_embeddings']}")
    lines = [
        f"{name}",
        f"  layers                {c.num_hidden_layers} ({c.num_hidden_layers - n_moe} dense, {n_moe} MoE)",
        f"  hidden size           {c.hidden_size} (dense FFN {c.intermediate_size})",
        f"  attention             MLA, {c.num_attention_heads} heads, {query}, kv_lora_rank {c.kv_lora_rank}, "
        f"qk {c.qk_nope_head_dim}+{c.qk_rope_head_dim}, v {c.v_head_dim}, softmax scale {c.softmax_scale:.7f}",
        f"  positions             {c.max_position_embeddings} ({rope}, theta {c.rope_theta:g})",
    ]
    if c.n_routed_experts is not None:
        lines.append(f"  experts               {c.n_shared_experts or 0} shared + {c.n_routed_experts} routed, "
                     f"{c.num_experts_per_tok} per token ({c.topk_method}), width {c.moe_intermediate_size}, "
                     f"scaling {c.routed_scaling_factor:g}")
    lines += [
        f"  vocabulary            {c.vocab_size}",
        "parameters",
        f"  total                 {s.total_params:,} ({_billions(s.total_params)})",
        f"  activated per token   {s.activated_params:,} ({_billions(s.activated_params)}; "
        f"{_billions(s.activated_params - s.embedding_params)} without the input embedding)",
        f"KV cache per token ({str(dtype).removeprefix('torch.')})",
        f"  latent (dsv2)         {s.latent_cache_values * dtype.itemsize:,} bytes "
        f"({c.num_hidden_layers} layers × {c.latent_dim} values)",
        f"  expanded K/V          {s.expanded_cache_values * dtype.itemsize:,} bytes "
        f"({c.num_hidden_layers} layers × {c.num_attention_heads} heads × "
        f"({c.qk_head_dim} + {c.v_head_dim}) values), "
        f"{s.expanded_cache_values / s.latent_cache_values:.1f}× the latent",
    ]
    return "\n".join(lines)
