"""Decoding steps recorded once as a CUDA graph and replayed.

A batch-1 decoding step of DeepSeek-V2 launches hundreds of small kernels (per layer: norms, projections, RoPE, the
cache write, attention, routing, experts), and on a GPU the step's time goes to launching them, not to reading the
weights. A CUDA graph records the launches of one step and replays them with one call. The step's inputs (token ids,
positions) are copied into fixed buffers first; the cache attends over all of its slots, masked by position
(`LatentCache.attend_all`), so that every step has the shapes of the recorded one.

Replays run none of the model's Python: forward hooks do not fire (a model with hooks runs eagerly), and the cache's
``seq_len`` is advanced here.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv2.model.cache import LatentCache
from dsv2.model.hooks import hooked_within

WARMUP_STEPS = 2  # eager steps on a side stream before recording: lazy state (handles, caches) is made there


def graphs_apply(model: nn.Module, cache: LatentCache, steps: int) -> bool:
    """Whether `GraphedDecodeStep` should take ``steps`` decoding steps of ``model`` over ``cache``: a CUDA cache in
    16 bits (float32 experts go through torch's grouped_mm fallback, which reads the groups' offsets on the host:
    no recording can hold that), ``model.use_cuda_graphs``, eval mode, no hooks that replays would pass by, and more
    steps than recording costs."""
    return (cache.data.device.type == "cuda" and cache.data.dtype in (torch.bfloat16, torch.float16)
            and getattr(model, "use_cuda_graphs", False) and not model.training and steps > WARMUP_STEPS + 1
            and not hooked_within(model)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks))


class GraphedDecodeStep:
    """``step(ids [B, 1], positions [B, 1])`` → logits [B, 1, V] of one decoding step over ``cache``: what
    ``model(ids, positions=positions, cache=cache)`` returns, recorded at the first call, replayed from then on."""

    def __init__(self, model: nn.Module, cache: LatentCache) -> None:
        self.model, self.cache = model, cache
        batch, device = cache.data.shape[1], cache.data.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the recorded step's output buffer

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.cache.check_room()
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        if self.graph is None:
            self._record()
        self.graph.replay()
        self.cache.advance(1)
        return self.logits.clone()

    @torch.no_grad()
    def _record(self) -> None:
        """Warm up on a side stream, then record one step. Neither counts as a step: each writes the step's own
        latents at its positions (what the replay writes again), and ``seq_len`` is put back after each."""
        cache, start = self.cache, self.cache.seq_len
        cache.attend_all = True
        try:
            side = torch.cuda.Stream(device=cache.data.device)
            side.wait_stream(torch.cuda.current_stream(cache.data.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.model(self.ids, positions=self.positions, cache=cache)
                    cache.seq_len = start
            torch.cuda.current_stream(cache.data.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self.model(self.ids, positions=self.positions, cache=cache)
            cache.seq_len = start
            self.graph = graph
        finally:
            cache.attend_all = False
            cache.advance(0)  # forget the step's slots made while recording
