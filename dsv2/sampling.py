"""SamplingParams (vLLM's names and defaults) and a batched sampler with per-row parameters.

Per row, in vLLM's order: repetition penalty (prompt + output tokens), presence/frequency penalties (output tokens),
temperature, top-k, top-p, min-p, then a draw. Temperature 0 is greedy. A row with a seed draws from its own
generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    extra: dict = field(default_factory=dict, repr=False)  # accepted vLLM arguments that do not apply here

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"SamplingParams.{name} = {getattr(self, name)!r}: {rule}")

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if not self.temperature >= 0:
            fail("temperature", "must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "must be an integer >= 0 (0 or -1 disables it)")
        if not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0:
            fail("repetition_penalty", "must be > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                fail(name, "must be in [-2, 2]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail("max_tokens", "must be an integer >= 1")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            fail("logprobs", "must be an integer >= 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "must be a non-empty string or a list of them")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be a list of token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


class Sampler:
    """Samples one token per row from logits [B, V], with each row's own parameters and token history."""

    def __init__(self, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device | str = "cpu") -> None:
        assert len(params) == len(prompts)
        self.params = list(params)
        self.vocab_size = vocab_size

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        self.temperature = column([p.temperature for p in params])  # [B]
        self.greedy = self.temperature == 0  # [B]
        self.all_greedy = all(p.greedy for p in params)
        self.top_k = column([p.top_k or vocab_size for p in params], torch.long)  # [B]
        self.top_p, self.min_p = column([p.top_p for p in params]), column([p.min_p for p in params])  # [B]
        self.repetition = column([p.repetition_penalty for p in params])  # [B]
        self.presence = column([p.presence_penalty for p in params])  # [B]
        self.frequency = column([p.frequency_penalty for p in params])  # [B]
        self.generators = [None if p.seed is None else torch.Generator(device).manual_seed(p.seed) for p in params]
        self.uses_penalties = any(p.uses_penalties for p in params)
        if self.uses_penalties:
            self.output_counts = torch.zeros(len(params), vocab_size, device=device)  # [B, V]
            self.seen = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)  # [B, V]
            for row, prompt in enumerate(prompts):
                self.seen[row, torch.as_tensor(list(prompt), dtype=torch.long, device=device)] = True

    def penalized(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32 with the repetition, presence and frequency penalties applied."""
        if not self.uses_penalties:
            return logits
        rep = self.repetition[:, None]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(self.seen, penalized, logits)
        return logits - self.presence[:, None] * (self.output_counts > 0) - self.frequency[:, None] * self.output_counts

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] → token ids [B]."""
        logits = self.penalized(logits.to(torch.float32)[:, : self.vocab_size])
        greedy_tokens = logits.argmax(dim=-1)  # [B]
        if self.all_greedy:
            return greedy_tokens
        temperature = torch.where(self.greedy, 1.0, self.temperature)[:, None]  # [B, 1]
        probs = self.filtered_probs(logits / temperature)  # [B, V]
        # Exponential race: argmax(p / q) with q ~ Exp(1) draws from p; one generator per seeded row.
        race = torch.empty_like(probs)
        unseeded = [row for row, g in enumerate(self.generators) if g is None]
        if unseeded:
            race[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
        for row, generator in enumerate(self.generators):
            if generator is not None:
                race[row].exponential_(generator=generator)
        sampled = (probs / race).argmax(dim=-1)  # [B]
        return torch.where(self.greedy, greedy_tokens, sampled)

    def filtered_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax of logits [B, V] restricted to each row's top-k, top-p nucleus and min-p floor."""
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        ranks = torch.arange(logits.shape[1], device=logits.device)  # [V]
        drop = ranks[None, :] >= self.top_k[:, None]  # [B, V] beyond top-k
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V] probability of all better tokens
        drop |= mass_before >= self.top_p[:, None]  # outside the nucleus (the best token always stays)
        drop |= sorted_probs < self.min_p[:, None] * sorted_probs[:, :1]  # below min_p × the best probability
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filtered = torch.empty_like(logits).scatter_(1, order, sorted_logits)  # back to vocabulary order
        return filtered.softmax(dim=-1)

    def append(self, tokens: torch.Tensor) -> None:
        """Record the tokens just sampled [B], for the penalties."""
        if self.uses_penalties:
            self.output_counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.float32))
            self.seen.scatter_(1, tokens[:, None], True)
