"""The contiguous latent KV cache: per layer, per sequence, the 576 values MLA needs of every past token.

Each entry is the *normalized* latent c_KV (kv_lora_rank values) followed by the *roped* shared key k_pe
(qk_rope_head_dim values), so decoding never re-projects or re-rotates anything it reads back.
Entry s of a sequence holds the token at position s; attention masks by position, which also covers ragged batches.
"""

from __future__ import annotations

import torch

from dsv2 import kernels
from dsv2.config import ModelConfig
from dsv2.malloc import zeros_on_huge_pages


def fused_decode_applies(cache_data: torch.Tensor, dtype: torch.dtype, value_dim: int) -> bool:
    """Whether `kernels.cpu_ops().latent_attention` can attend over a cache holding ``cache_data`` for a step in
    ``dtype``: inference in bf16 or float32 on an AVX-512 CPU, the cache in that dtype, entries of a multiple of 32
    values whose first ``value_dim`` (a multiple of 16) are the value."""
    return (not torch.is_grad_enabled() and cache_data.device.type == "cpu"
            and cache_data.dtype in (torch.bfloat16, torch.float32) and dtype == cache_data.dtype
            and cache_data.shape[-1] % 32 == 0 and value_dim % 16 == 0 and kernels.cpu_ops() is not None)


class LatentCache:
    """A [num_layers, batch, max_len, kv_lora_rank + qk_rope_head_dim] buffer.

    ``seq_len`` counts the slots in use, the same for every row; a row's own length may be shorter (it is masked by
    position). Positions a row writes must stay below ``seq_len`` + the step's token count.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        if max_len > config.max_position_embeddings:
            raise ValueError(f"max_len={max_len} exceeds the model's max_position_embeddings="
                             f"{config.max_position_embeddings}")
        self.data = zeros_on_huge_pages((config.num_hidden_layers, batch_size, max_len, config.latent_dim), dtype,
                                        device)
        self.seq_len = 0  # slots in use
        # every step attends over all max_len slots, masked by position: shapes that do not change from step to step,
        # which a recorded CUDA graph needs (`dsv2.model.cuda_graph`)
        self.attend_all = False
        self._indices: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None  # (batch, end), rows, slots
        self._step_slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # this step's (`step_slots`)
        self._row_table: tuple[torch.Tensor, torch.Tensor] | None = None  # (`_row_slots`)
        self._flat: torch.Tensor | None = None  # data as [layers, B·max_len, D] (`step_tables`)

    @property
    def max_len(self) -> int:
        return self.data.shape[2]

    def update(self, layer_idx: int, latent: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Store latent [B, T, D] of the new tokens at their positions [B, T]; return the layer's first seq_len + T
        entries [B, S, D] and the attention mask [B, T, S] (key position ≤ query position).

        The mask is None when it is plain bottom-right causal: a fresh cache (the T tokens are positions 0..T-1), or
        one sequence decoding its next token (it sees every entry). Rows may sit at different positions (prompts of
        different lengths, right-padded): every row writes where its tokens belong, and the mask keeps each row to
        its own positions, so a row never reads another row's padding. With ``attend_all`` the entries are all
        max_len slots, always with a mask.
        """
        T = latent.shape[1]
        end = self.write(layer_idx, latent, positions)
        if self.attend_all:
            return self.data[layer_idx], torch.arange(self.max_len, device=positions.device) <= positions[:, :, None]
        context = self.data[layer_idx, :, :end]  # [B, S, D]
        if self.seq_len == 0 or (latent.shape[0] == 1 and T == 1):
            return context, None
        return context, torch.arange(end, device=positions.device) <= positions[:, :, None]

    def write(self, layer_idx: int, latent: torch.Tensor, positions: torch.Tensor) -> int:
        """Store latent [B, T, D] at positions [B, T]; → the slots in use once the step is done (seq_len + T)."""
        T = latent.shape[1]
        self.check_batch(latent.shape[0])
        if latent.dtype != self.data.dtype and not torch.is_autocast_enabled(latent.device.type):
            # (under autocast the attention's matmuls cast both operands: a cache in another dtype works)
            raise ValueError(f"the latent cache holds {self.data.dtype} but the model computes in {latent.dtype}: "
                             f"make the cache with dtype={latent.dtype} (the model's dtype)")
        end = self.seq_len + T
        if end > self.max_len:
            raise ValueError(f"latent cache is full: {self.seq_len} cached + {T} new tokens > max_len={self.max_len}")
        rows, _ = self._step_indices(latent.shape[0], end)  # [B, 1]
        # index_put_ copies T rows of D values; scatter_ over the expanded [B, T, D] index took 0.4-20 ms per call
        self.data[layer_idx].index_put_((rows, positions), latent.to(self.data.dtype))
        return end

    @property
    def batch_size(self) -> int:
        return self.data.shape[1]

    def check_batch(self, batch: int) -> None:
        """Raise where an input of ``batch`` rows does not match the cache's rows (row i of the input is sequence i
        of the cache; ragged prompts are right-padded rows of one batch, not fewer rows)."""
        if batch != self.batch_size:
            raise ValueError(f"input has {batch} row{'s' if batch != 1 else ''} but the latent cache was made for "
                             f"batch_size={self.batch_size}: make the cache with batch_size={batch}")

    def _step_indices(self, batch: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row numbers [B, 1] and every row's slots in data[layer].view(B·max_len, D) up to ``end`` [B, end]: made
        once per step, not per layer."""
        if self._indices is None or self._indices[0] != (batch, end):
            rows = torch.arange(batch, device=self.data.device)[:, None]
            self._indices = (batch, end), rows, rows * self.max_len + torch.arange(end, device=self.data.device)
        return self._indices[1], self._indices[2]

    def fused_decode_applies(self, dtype: torch.dtype, value_dim: int) -> bool:
        return fused_decode_applies(self.data, dtype, value_dim)

    def step_slots(self, layer_idx: int,
                   positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a kernel that writes one token per row and attends itself (`mla_decode`): the layer's cache as
        [B·max_len, D], each row's write slot [B], its slots up to the step's end [B, S] and lengths [B]."""
        layers, write, read, lengths = self.step_layers(positions)
        return layers[layer_idx], write, read, lengths

    def step_layers(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`step_slots` for every layer at once: the cache as [layers, B·max_len, D]; the read
        slots are every row's whole range [B, max_len] (the kernels read a row's first `lengths` of them)."""
        B = positions.shape[0]
        self.check_batch(B)
        self.check_room()
        if self._step_slots is None:  # every layer of a step passes the same positions; `advance` forgets them
            at = positions.view(B)  # [B] one token per row
            first, slots = self._row_slots(B)
            self._step_slots = first + at, slots, at + 1
        write, read, lengths = self._step_slots
        return self.data.view(self.data.shape[0], B * self.max_len, -1), write, read, lengths

    def step_tables(self, steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """For `decode_layers` (or ``steps`` of `decode_greedy`) taking the step's positions: the cache as
        [layers, B·max_len, D] and every row's slots [B, max_len] (entry s: the slot of position s; a row writes the
        one at its position)."""
        self.check_room(steps)
        if self._flat is None:
            self._flat = self.data.view(self.data.shape[0], -1, self.data.shape[-1])
        return self._flat, self._row_slots(self.data.shape[1])[1]

    def check_room(self, steps: int = 1) -> None:
        """Raise where ``steps`` more one-token steps would not fit in max_len."""
        if self.seq_len + steps > self.max_len:
            raise ValueError(f"latent cache is full: {self.seq_len} cached + {steps} new token"
                             f"{'s' if steps > 1 else ''} > max_len={self.max_len}")

    def _row_slots(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's first slot [B] and all its slots [B, max_len] in data[layer].view(B·max_len, D), made once."""
        if self._row_table is None or self._row_table[0].shape[0] != batch:
            first = torch.arange(batch, device=self.data.device) * self.max_len
            self._row_table = first, first[:, None] + torch.arange(self.max_len, device=self.data.device)
        return self._row_table

    def fused_decode(self, layer_idx: int, latent: torch.Tensor, positions: torch.Tensor, q: torch.Tensor,
                     scale: float, value_dim: int) -> torch.Tensor:
        """One token per row: store latent [B, 1, D] at positions [B, 1], then attend with the absorbed queries
        q [B, n_h, D] over each row's entries up to its position → [B, n_h, value_dim] (the CPU kernel)."""
        end = self.write(layer_idx, latent, positions)
        layer = self.data[layer_idx]  # [B, max_len, D]
        B = layer.shape[0]
        _, slots = self._step_indices(B, end)  # [B, end]
        return kernels.cpu_ops().latent_attention(q, layer.view(B * self.max_len, -1), slots, positions[:, 0] + 1,
                                                  value_dim, scale)

    def advance(self, num_tokens: int) -> None:
        """Called by the model once every layer has stored the step's tokens: seq_len counts slots in use."""
        self.seq_len += num_tokens
        self._step_slots = None

    def reset(self) -> None:
        self.seq_len = 0
        self._step_slots = None

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
