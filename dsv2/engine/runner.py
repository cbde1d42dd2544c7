"""Runs one scheduled batch through the model over the paged latent cache.

The cache is one tensor [num_layers, num_blocks·block_size + 1, kv_lora_rank + qk_rope_head_dim]: slot
``block·block_size + offset`` holds one token's normalized latent and roped k_pe, and the extra last slot absorbs the
writes of padding tokens. A batch is laid out as [B, T] (each sequence's chunk, right-padded); each layer writes the
chunk's latents to their slots and reads back every sequence's context by block table ([B, S] gather, entry s =
position s), so the model's attention — expanded for prefill chunks, absorbed for single-token decoding — runs
unchanged. A fused paged-attention kernel (FlashMLA, Triton) would replace the gather in `PagedStepCache.update`.
"""

from __future__ import annotations

import torch

from dsv2 import kernels
from dsv2.config import ModelConfig
from dsv2.engine.scheduler import Batch
from dsv2.malloc import zeros_on_huge_pages
from dsv2.model import DeepseekV2ForCausalLM
from dsv2.model.cache import fused_decode_applies


class PagedLatentCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        self.trash_slot = self.num_slots  # padding tokens write here; never read as a real entry
        self.data = zeros_on_huge_pages((config.num_hidden_layers, self.num_slots + 1, config.latent_dim), dtype,
                                        device)  # [L, slots + 1, D]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        return config.num_hidden_layers * config.latent_dim * dtype.itemsize


class PagedStepCache:
    """What the model sees for one step: ``update`` writes the new latents to their slots and returns the context."""

    def __init__(self, cache: PagedLatentCache, write_slots: torch.Tensor, read_slots: torch.Tensor,
                 mask: torch.Tensor | None) -> None:
        self.cache = cache
        self.write_slots = write_slots.flatten()  # [B·T]
        self.read_slots = read_slots  # [B, S]
        self.mask = mask  # [B, T, S], or None when bottom-right causal suffices
        self.seq_len = 0  # positions are always given by the runner
        self._lengths: torch.Tensor | None = None  # [B] made by the step's first `step_slots`

    def update(self, layer_idx: int, latent: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """latent [B, T, D] → the batch's contexts [B, S, D] (entry s = position s) and the step's mask."""
        layer = self.write(layer_idx, latent)
        B, S = self.read_slots.shape
        return layer.index_select(0, self.read_slots.flatten()).view(B, S, -1), self.mask  # ~5× layer[read_slots]

    def write(self, layer_idx: int, latent: torch.Tensor) -> torch.Tensor:
        """Store latent [B, T, D] in the step's write slots; → the layer's cache [slots + 1, D]."""
        layer = self.cache.data[layer_idx]  # [slots + 1, D]
        layer.index_copy_(0, self.write_slots, latent.flatten(0, 1).to(layer.dtype))
        return layer

    def fused_decode_applies(self, dtype: torch.dtype, value_dim: int) -> bool:
        return fused_decode_applies(self.cache.data, dtype, value_dim)

    def step_slots(self, layer_idx: int,
                   positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a kernel that writes one token per sequence and attends itself (`mla_decode`): the layer's cache
        [slots + 1, D], the write slots [B], the read slots [B, S] and the lengths [B]."""
        layers, write, read, lengths = self.step_layers(positions)
        return layers[layer_idx], write, read, lengths

    def step_layers(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`step_slots` for every layer at once: the cache [layers, slots + 1, D]."""
        if self._lengths is None:  # every layer of the step passes the same positions
            self._lengths = positions[:, 0] + 1
        return self.cache.data, self.write_slots, self.read_slots, self._lengths

    def step_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For `decode_layers` taking the step's positions: the cache [layers, slots + 1, D] and the read slots
        [B, S] (entry s: the slot of position s)."""
        return self.cache.data, self.read_slots

    def fused_decode(self, layer_idx: int, latent: torch.Tensor, positions: torch.Tensor, q: torch.Tensor,
                     scale: float, value_dim: int) -> torch.Tensor:
        """One token per sequence: write latent [B, 1, D] to its slot, then attend with the absorbed queries
        q [B, n_h, D] straight over each sequence's slots up to its position → [B, n_h, value_dim] (the CPU kernel
        reads the cache by the step's read slots: no gathered context)."""
        layer = self.write(layer_idx, latent)
        return kernels.cpu_ops().latent_attention(q, layer, self.read_slots, positions[:, 0] + 1, value_dim, scale)

    def advance(self, num_tokens: int) -> None:
        pass


class ModelRunner:
    def __init__(self, model: DeepseekV2ForCausalLM, cache: PagedLatentCache) -> None:
        self.model, self.cache = model, cache
        self.device = model.device

    def _slots(self, tables: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Cache slots of positions [B, K] by block tables [B, max_blocks]; the trash slot where not ``valid``."""
        bs = self.cache.block_size
        block_index = (positions // bs).clamp(max=tables.shape[1] - 1)  # [B, K]
        blocks = tables.gather(1, block_index)  # [B, K]
        return torch.where(valid & (blocks >= 0), blocks * bs + positions % bs, self.cache.trash_slot)

    @torch.no_grad()
    def run(self, batch: Batch, extra: list[list[int]] | None = None) -> torch.Tensor:
        """Compute the batch's chunks; return logits [B, K, vocab]: at each sequence's ``extra`` positions (absolute,
        within its chunk), then at its last computed token; rows with fewer positions repeat their last."""
        return self.execute(self.prepare(batch, extra))

    def prepare(self, batch: Batch, extra: list[list[int]] | None = None,
                device: torch.device | str | None = None) -> dict[str, torch.Tensor | None]:
        """The step's tensors (on ``device``, default the model's): what every rank of a parallel group needs to
        run it."""
        device = device or self.device
        items = batch.items
        T = max(item.end - item.start for item in items)
        S = max(item.end for item in items)
        widest = max(len(item.seq.block_table) for item in items)

        def tensor(rows: list) -> torch.Tensor:
            return torch.tensor(rows, dtype=torch.long, device=device)

        input_ids = tensor([item.seq.token_ids[item.start:item.end] + [0] * (T - item.end + item.start)
                            for item in items])  # [B, T], right-padded
        tables = tensor([item.seq.block_table + [-1] * (widest - len(item.seq.block_table)) for item in items])
        starts, ends = tensor([item.start for item in items]), tensor([item.end for item in items])  # [B]
        positions = starts[:, None] + torch.arange(T, device=device)  # [B, T]
        context = torch.arange(S, device=device).expand(len(items), S)  # [B, S]
        # Plain causal when every chunk starts at position 0 (keys = the queries, padding at the ends) or when one
        # sequence decodes; otherwise each query sees the keys up to its own position.
        fresh = all(item.start == 0 for item in items) or (len(items) == 1 and T == 1)
        extra = extra or [[] for _ in items]
        K = 1 + max(len(e) for e in extra)
        return {
            "input_ids": input_ids,
            "positions": positions,
            "write_slots": self._slots(tables, positions, positions < ends[:, None]),  # [B, T]
            "read_slots": self._slots(tables, context, context < ends[:, None]),  # [B, S]
            "mask": None if fresh else context[:, None, :] <= positions[:, :, None],  # [B, T, S]
            "logits_at": tensor([[p - item.start for p in e] + [item.end - item.start - 1] * (K - len(e))
                                 for item, e in zip(items, extra, strict=True)]),  # [B, K]
        }

    @torch.no_grad()
    def execute(self, step: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Run prepared step tensors through the model over this rank's cache → logits [B, K, vocab]."""
        step_cache = PagedStepCache(self.cache, step["write_slots"], step["read_slots"], step["mask"])
        return self.model(step["input_ids"], positions=step["positions"], cache=step_cache,
                          logits_at=step["logits_at"])
