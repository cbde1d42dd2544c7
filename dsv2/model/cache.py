"""The contiguous latent KV cache: per layer, per sequence, the 576 values MLA needs of every past token.

Each entry is the *normalized* latent c_KV (kv_lora_rank values) followed by the *roped* shared key k_pe
(qk_rope_head_dim values), so decoding never re-projects or re-rotates anything it reads back.
Entry s of a sequence holds the token at position s; attention masks by position, which also covers ragged batches.
"""

from __future__ import annotations

import torch

from dsv2.config import ModelConfig


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
        self.data = torch.zeros(config.num_hidden_layers, batch_size, max_len, config.latent_dim, dtype=dtype,
                                device=device)
        self.seq_len = 0  # slots in use

    @property
    def max_len(self) -> int:
        return self.data.shape[2]

    def update(self, layer_idx: int, latent: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Store latent [B, T, D] of the new tokens at their positions [B, T]; return the layer's first seq_len + T
        entries, [B, seq_len + T, D].

        Rows may sit at different positions (a batch of prompts of different lengths, right-padded): every row writes
        where its tokens belong, and attention masks by position, so a row never reads another row's padding.
        """
        end = self.seq_len + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"latent cache is full: {self.seq_len} cached + {latent.shape[1]} new tokens > "
                             f"max_len={self.max_len}")
        index = positions[:, :, None].expand_as(latent)  # [B, T, D]
        self.data[layer_idx].scatter_(1, index, latent.to(self.data.dtype))
        return self.data[layer_idx, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Called by the model once every layer has stored the step's tokens: seq_len counts slots in use."""
        self.seq_len += num_tokens

    def reset(self) -> None:
        self.seq_len = 0

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
