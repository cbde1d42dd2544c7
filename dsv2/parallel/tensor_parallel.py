"""Tensor and expert parallelism for inference, applied to an already-built model from the outside.

With W ranks, rank r keeps:
- attention: its n_h/W heads — q_proj / q_b_proj and kv_b_proj cut by rows (column parallel), o_proj cut by columns
  (row parallel, results summed with an all-reduce). The latent projection (kv_a_proj_with_mqa, kv_a_layernorm),
  q_a_proj and the norms are replicated: MLA has a single latent "head", so every rank computes — and caches — the
  same latent. That is the price of tensor parallelism for MLA (the cache is not split); data-parallel attention
  (each rank its own requests) avoids it, see docs/parallel.md.
- dense MLP and shared experts: gate/up by rows, down by columns, then an all-reduce;
- routed experts: with ``expert_parallel``, E/W whole experts (each rank computes what its experts contribute for
  every token, and an all-reduce sums the ranks); otherwise every expert's intermediate dimension cut W ways;
- the embedding and the output head: V/W vocabulary rows each (an all-reduce of the masked lookups; an all-gather of
  the logit slices).
The model code is untouched: modules are swapped for their parallel versions (same parameter names, local shapes),
and `ShardPlan` tells the loader which slice of every checkpoint tensor a rank reads.

Data-parallel attention (`shard_for_data_parallel`) keeps everything whole on every rank — each rank serves its own
requests through its own latent cache — except, with expert parallelism, the routed experts: E/W per rank, each
rank's tokens sent to their experts' ranks by all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.attention import MultiHeadLatentAttention
from dsv2.model.linear import Linear, linear
from dsv2.model.moe import MLP, MoE, RoutedExperts
from dsv2.model.transformer import DeepseekV2ForCausalLM
from dsv2.parallel.expert_parallel import shard_experts, split_evenly

SKIP = "skip"  # a checkpoint tensor this rank does not hold (another rank's expert)


class RowParallelLinear(nn.Linear):
    """A linear layer holding a slice of the input features; partial results are summed over the ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, prepack=True)
        dist.all_reduce(out)
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + num_embeddings) of the vocabulary; other ids look up zeros, summed over the ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, start: int) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.start = start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight) * inside[..., None]
        dist.all_reduce(out)
        return out


class VocabParallelHead(nn.Linear):
    """Logits for a slice of the vocabulary, gathered from every rank into the full [..., vocab]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = linear(x, self.weight, prepack=True).contiguous()  # [..., V/W]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)


class ParallelRoutedExperts(RoutedExperts):
    """This rank's share of a layer's routed experts: whole experts (expert parallel) or a slice of every expert's
    intermediate dimension (tensor parallel). Its output is this rank's partial sum, all-reduced."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, first_expert: int,
                 total_experts: int) -> None:
        super().__init__(num_experts, hidden_size, intermediate_size)
        self.first_expert, self.total_experts = first_expert, total_experts

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                owned: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_experts == self.total_experts:  # tensor parallel: every expert, a slice of each
            out = super().forward(x, expert_ids, weights, owned)
        else:  # expert parallel: only the assignments to this rank's experts are computed
            local = expert_ids - self.first_expert  # [N, k]
            out = super().forward(x, local, weights, (local >= 0) & (local < self.num_experts))
        dist.all_reduce(out)
        return out


@dataclass
class ShardPlan:
    """How each parameter of the full model is cut for one rank: (dim, world) per parameter name; experts by index."""

    rank: int
    world: int
    expert_parallel: bool
    dims: dict[str, int]  # parameter → dimension split W ways (absent: replicated)
    experts_per_rank: dict[str, int]  # stacked expert parameter → experts held by each rank (expert parallel)

    def index(self, param: str, expert: int | None, full_shape: list[int]) -> tuple | str | None:
        """The slice of a checkpoint tensor (shape ``full_shape``) this rank reads; None for all of it, SKIP for
        none. ``expert`` is the tensor's expert number for stacked expert parameters."""
        if expert is not None and param in self.experts_per_rank:
            n = self.experts_per_rank[param]
            return None if self.rank * n <= expert < (self.rank + 1) * n else SKIP
        dim = self.dims.get(param)
        if dim is None:
            return None
        size = full_shape[dim] // self.world
        index = [slice(None)] * len(full_shape)
        index[dim] = slice(self.rank * size, (self.rank + 1) * size)
        return tuple(index)

    def local_expert(self, param: str, expert: int) -> int:
        n = self.experts_per_rank.get(param)
        return expert - self.rank * n if n else expert


def _cut(layer: nn.Linear, dim: int, world: int, cls: type[nn.Linear] = Linear) -> nn.Linear:
    """A fresh (meta) linear layer of the local shape: dim 0 = output rows, 1 = input columns."""
    out_f, in_f = layer.out_features, layer.in_features
    if dim == 0:
        out_f = split_evenly(out_f, world, "output features")
    else:
        in_f = split_evenly(in_f, world, "input features")
    with torch.device("meta"):
        return cls(in_f, out_f, bias=layer.bias is not None)


def shard_model(model: DeepseekV2ForCausalLM, rank: int, world: int, expert_parallel: bool = False) -> ShardPlan:
    """Swap ``model``'s modules (built on the meta device) for this rank's parallel versions; return the plan for
    loading its weights."""
    config = model.config
    dims: dict[str, int] = {}
    experts: dict[str, int] = {}
    vocab = split_evenly(config.vocab_size, world, "vocab_size")
    with torch.device("meta"):
        model.model.embed_tokens = VocabParallelEmbedding(vocab, config.hidden_size, rank * vocab)
        model.lm_head = VocabParallelHead(config.hidden_size, vocab, bias=False)
    dims["model.embed_tokens.weight"] = dims["lm_head.weight"] = 0
    model.tie_weights()
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        attn: MultiHeadLatentAttention = layer.self_attn
        attn.num_heads = split_evenly(attn.num_heads, world, "num_attention_heads")
        q_name = "q_proj" if attn.q_lora_rank is None else "q_b_proj"
        for name, dim, cls in ((q_name, 0, Linear), ("kv_b_proj", 0, Linear), ("o_proj", 1, RowParallelLinear)):
            setattr(attn, name, _cut(getattr(attn, name), dim, world, cls))
            dims[f"{prefix}.self_attn.{name}.weight"] = dim
        mlps = [(f"{prefix}.mlp", layer.mlp)] if isinstance(layer.mlp, MLP) else []
        if isinstance(layer.mlp, MoE):
            moe = layer.mlp
            if moe.shared_experts is not None:
                mlps.append((f"{prefix}.mlp.shared_experts", moe.shared_experts))
            E, H, width = moe.experts.num_experts, config.hidden_size, config.moe_intermediate_size
            if expert_parallel:
                local = split_evenly(E, world, "n_routed_experts")
                with torch.device("meta"):
                    moe.experts = ParallelRoutedExperts(local, H, width, rank * local, E)
                for p in ("gate_proj", "up_proj", "down_proj"):
                    experts[f"{prefix}.mlp.experts.{p}"] = local
            else:
                with torch.device("meta"):
                    moe.experts = ParallelRoutedExperts(E, H, split_evenly(width, world, "moe_intermediate_size"), 0, E)
                dims.update({f"{prefix}.mlp.experts.gate_proj": 0, f"{prefix}.mlp.experts.up_proj": 0,
                             f"{prefix}.mlp.experts.down_proj": 1})  # per expert tensor: [I, H] and [H, I]
        for name, mlp in mlps:
            mlp.gate_proj = _cut(mlp.gate_proj, 0, world)
            mlp.up_proj = _cut(mlp.up_proj, 0, world)
            mlp.down_proj = _cut(mlp.down_proj, 1, world, RowParallelLinear)
            dims.update({f"{name}.gate_proj.weight": 0, f"{name}.up_proj.weight": 0, f"{name}.down_proj.weight": 1})
    return ShardPlan(rank, world, expert_parallel, dims, experts)


def shard_for_data_parallel(model: DeepseekV2ForCausalLM, rank: int, world: int,
                            expert_parallel: bool) -> ShardPlan:
    """Data-parallel attention: every rank keeps the whole model (its own requests, its own cache), but with
    ``expert_parallel`` only E/W routed experts per MoE layer, reached by all-to-all; without, whole replicas."""
    experts: dict[str, int] = {}
    if expert_parallel:
        per_rank = split_evenly(model.config.n_routed_experts or 0, world, "n_routed_experts")
        experts = dict.fromkeys(shard_experts(model, rank, world), per_rank)
    return ShardPlan(rank, world, expert_parallel, {}, experts)


def check_split(config: ModelConfig, world: int, expert_parallel: bool, data_parallel: bool) -> None:
    """Before any rank starts: a ValueError naming the size parameter if ``config``'s model cannot be split over
    ``world`` ranks (heads, vocabulary, MLP widths or experts that do not divide evenly), tried on the meta device."""
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    shard = shard_for_data_parallel if data_parallel else shard_model
    try:
        shard(model, 0, world, expert_parallel)
    except ValueError as e:
        what = "data_parallel_size" if data_parallel else "tensor_parallel_size"
        raise ValueError(f"{what}={world}: {e}") from None
