"""SamplingParams (vLLM's names and defaults) and a batched sampler with per-row parameters.

Per row, in vLLM's order: the logit bias, repetition penalty (prompt + output tokens), presence/frequency
penalties (output tokens), temperature, min-p, top-k, top-p (over what min-p and top-k leave), then a draw; with
``min_p_first=False`` (`generate`, as transformers) min-p comes last, over the top-k / top-p survivors. Temperature
0 is greedy. A row with a seed draws from its own generator, so its tokens do not depend on what else is
in the batch.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch


class SamplingParamsError(ValueError):
    """A SamplingParams field out of its range; ``field`` names it (the server's error names the request field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


GREEDY_BELOW = 1e-5  # temperatures below it sample greedily (vLLM's _SAMPLING_EPS)


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
    prompt_logprobs: int | None = None  # report the log-probability of prompt tokens (and this many top ones)
    prompt_logprobs_start: int = 1  # dsv2: the first prompt position to report; the prefix cache may skip before it
    skip_special_tokens: bool = True
    min_tokens: int = 0  # until this many tokens: EOS and stop_token_ids are barred, stop strings not looked for
    include_stop_str_in_output: bool = False  # keep the stop string, or the stop token's text, in the text
    detokenize: bool = True  # False: token ids only, the text stays ""
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last this many tokens
    best_of: int | None = None  # vLLM's candidates per prompt: only n (no ranking of extra candidates)
    spaces_between_special_tokens: bool = True  # vLLM's; accepted: the tokenizer's decoder places the spaces
    logit_bias: dict[int, float] | None = None  # OpenAI's: added to these ids' logits (each in [-100, 100])

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):  # a list (or another collection) of them, or None
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple, set, frozenset)):
                raise SamplingParamsError(name, f"SamplingParams.{name} = {value!r}: must be a list (or None)")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise SamplingParamsError(name, f"SamplingParams.{name} = {getattr(self, name)!r}: {rule}")

        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                fail(name, "must be a number")
        if not integer(self.n) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if not self.temperature >= 0:
            fail("temperature", f"must be >= 0 (below {GREEDY_BELOW} is greedy)")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "must be an integer >= 0 (0 or -1 disables it)")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= 2**63 - self.n):
            fail("seed", f"must be an integer in [0, 2**63 - n] (n = {self.n}: sample i draws from seed + i)")
        if not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0:
            fail("repetition_penalty", "must be > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                fail(name, "must be in [-2, 2]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail("max_tokens", "must be an integer >= 1")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not integer(value) or value < 0):
                fail(name, "must be an integer >= 0")
        if self.prompt_logprobs_start < 1:
            fail("prompt_logprobs_start", "must be >= 1 (the first prompt token has no log-probability)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "must be a non-empty string or a list of them")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be a list of token ids")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.truncate_prompt_tokens is not None and (not isinstance(self.truncate_prompt_tokens, int)
                                                        or self.truncate_prompt_tokens < 1):
            fail("truncate_prompt_tokens", "must be an integer >= 1")
        if self.logit_bias is not None and any(
                not isinstance(t, int) or t < 0 or isinstance(b, bool) or not isinstance(b, (int, float))
                or not -100 <= b <= 100 for t, b in self.logit_bias.items()):
            fail("logit_bias", "must map token ids (integers >= 0) to biases in [-100, 100]")
        if self.best_of is not None and (not isinstance(self.best_of, int) or self.best_of != self.n):
            fail("best_of", f"only best_of = n ({self.n}) is supported: candidates are not ranked")

    def stop_ids(self, eos_token_ids: Collection[int] = ()) -> set[int]:
        """The token ids that end a sequence: ``stop_token_ids``, and EOS unless ``ignore_eos``."""
        return {*self.stop_token_ids, *(() if self.ignore_eos else eos_token_ids)}

    def prompt_tail(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The prompt as it is served: its last ``truncate_prompt_tokens`` tokens when that is set."""
        k = self.truncate_prompt_tokens
        return list(prompt_token_ids if k is None else prompt_token_ids[-k:])

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's ``SamplingParams.clone``)."""
        return copy.deepcopy(self)

    @property
    def greedy(self) -> bool:
        # as vLLM: a temperature this small is greedy (logits / 1e-38 overflow to inf, and softmax gives NaN)
        return self.temperature < GREEDY_BELOW

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class SamplingRow:
    """What sampling needs of one sequence: its parameters, its own generator (when seeded) and its tokens so far.

    The caller appends each sampled token to ``output_ids``; penalties are computed from these lists. ``barred``:
    the ids that cannot be drawn before ``params.min_tokens`` tokens (the stop token ids, and EOS unless ignored).
    """

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    barred: tuple[int, ...] = ()

    @classmethod
    def start(cls, params: SamplingParams, prompt_ids: Sequence[int], device: torch.device | str = "cpu",
              eos_token_ids: Collection[int] = ()) -> SamplingRow:
        generator = None if params.seed is None else torch.Generator(device).manual_seed(params.seed)
        barred = tuple(params.stop_ids(eos_token_ids)) if params.min_tokens else ()
        return cls(params, prompt_ids, [], generator, barred)

    @property
    def stops_barred(self) -> bool:
        """Whether the row has yet to reach ``min_tokens``: no stop token may be drawn, no stop string counts."""
        return len(self.output_ids) < self.params.min_tokens


def plainly_greedy(rows: Sequence[SamplingRow]) -> bool:
    """Whether every row draws its logits' first maximum: greedy, no logit bias, no penalties, no barred ids now (and
    so none later: ids are barred only until ``min_tokens``)."""
    return all(row.params.greedy and not row.params.logit_bias and not row.params.uses_penalties
               and not (row.barred and row.stops_barred) for row in rows)


def greedy_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor | None:
    """What `sample` draws when every row is `plainly_greedy`, for logits [..., V] of any leading shape → the first
    maximum's index [...]; None otherwise. `sample` starts with it; a decoding step's [B, 1, V] takes it directly,
    two torch operations fewer (each ~30 µs there)."""
    if not plainly_greedy(rows):
        return None
    return logits.max(dim=-1).indices  # argmax's ties (the first maximum), 1.8 vs 2.6 ms for 64 × 32k


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow], generator: torch.Generator | None = None,
           min_p_first: bool = True) -> torch.Tensor:
    """logits [B, V] → one token id per row [B], each row with its own parameters. Rows without a seed draw from
    ``generator`` (default: torch's global one). ``min_p_first``: see `filtered_probs`."""
    assert logits.shape[0] == len(rows)
    plain = greedy_tokens(logits, rows)
    if plain is not None:
        return plain
    logits = penalized(without_barred(biased(logits.to(torch.float32), rows), rows), rows)
    best = logits.max(dim=-1).indices  # [B], as greedy_tokens
    if all(row.params.greedy for row in rows):
        return best
    device = logits.device
    greedy = torch.tensor([row.params.greedy for row in rows], device=device)  # [B]
    temperature = torch.tensor([1.0 if row.params.greedy else row.params.temperature for row in rows],
                               device=device)[:, None]  # [B, 1]: greedy rows take `best` below
    probs = filtered_probs(logits / temperature, rows, min_p_first)  # [B, V]
    # Exponential race: argmax(p / q) with q ~ Exp(1) draws from p; a seeded row draws from its own generator.
    race = torch.empty_like(probs)
    unseeded = [i for i, row in enumerate(rows) if row.generator is None]
    if unseeded:
        race[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device).exponential_(generator=generator)
    for i, row in enumerate(rows):
        if row.generator is not None:
            race[i].exponential_(generator=row.generator)
    sampled = (probs / race).max(dim=-1).indices  # [B]
    return torch.where(greedy, best, sampled)


def biased(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """logits [B, V] with each row's ``logit_bias`` added (a copy if any row has one)."""
    cells = [(i, t, b) for i, row in enumerate(rows) for t, b in (row.params.logit_bias or {}).items()]
    if not cells:
        return logits
    at_rows, ids, biases = zip(*cells, strict=True)
    index = (torch.tensor(at_rows, device=logits.device), torch.tensor(ids, device=logits.device))
    return logits.index_put(index, torch.tensor(biases, dtype=logits.dtype, device=logits.device), accumulate=True)


def without_barred(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """logits [B, V] with each row's barred ids at -inf while it is short of ``min_tokens`` (a copy if any)."""
    cells = [(i, t) for i, row in enumerate(rows) if row.barred and row.stops_barred for t in row.barred
             if t < logits.shape[1]]
    if not cells:
        return logits
    index = torch.tensor(cells, device=logits.device).T  # [2, cells]: rows, ids
    return logits.index_put((index[0], index[1]), torch.tensor(float("-inf"), device=logits.device))


def penalized(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """logits [B, V] float32 with each row's repetition (prompt + output tokens) and presence/frequency (output
    tokens) penalties applied."""
    if not any(row.params.uses_penalties for row in rows):
        return logits
    B, V = logits.shape
    device = logits.device
    counts = torch.zeros(B, V, device=device)  # [B, V] occurrences in the output
    seen = torch.zeros(B, V, dtype=torch.bool, device=device)  # [B, V] in the prompt or the output
    for i, row in enumerate(rows):
        if row.params.uses_penalties:
            output = torch.tensor(row.output_ids, dtype=torch.long, device=device)
            counts[i].index_add_(0, output, torch.ones(len(output), device=device))
            seen[i, torch.tensor(list(row.prompt_ids), dtype=torch.long, device=device)] = True
            seen[i, output] = True
    column = lambda name: torch.tensor([getattr(r.params, name) for r in rows], device=device)[:, None]  # noqa: E731
    repetition = column("repetition_penalty")  # [B, 1]
    logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    return logits - column("presence_penalty") * (counts > 0) - column("frequency_penalty") * counts


def filtered_probs(logits: torch.Tensor, rows: Sequence[SamplingRow], min_p_first: bool = True) -> torch.Tensor:
    """Softmax of logits [B, V] restricted to each row's top-k, top-p nucleus and min-p floor. ``min_p_first`` (vLLM
    V1): the min-p floor is set on the whole distribution and the nucleus taken from what it and top-k leave;
    otherwise (transformers) the floor is set last, on the top-k / top-p survivors."""
    V = logits.shape[1]
    if not any(0 < r.params.top_k < V or r.params.top_p < 1 or r.params.min_p > 0 for r in rows):
        return logits.softmax(dim=-1)  # nothing to filter: no need to sort the vocabulary
    device = logits.device
    top_k = torch.tensor([min(r.params.top_k, V) or V for r in rows], device=device)[:, None]  # [B, 1]
    top_p = torch.tensor([r.params.top_p for r in rows], device=device)[:, None]  # [B, 1]
    min_p = torch.tensor([r.params.min_p for r in rows], device=device)[:, None]  # [B, 1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    drop = torch.arange(V, device=device)[None, :] >= top_k  # [B, V] beyond top-k
    if min_p_first and (min_p > 0).any():
        full_probs = sorted_logits.softmax(dim=-1)
        drop |= full_probs < min_p * full_probs[:, :1]  # below min_p × the best probability
    sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V] probability of all better tokens
    drop |= (mass_before >= top_p) & (top_p < 1)  # outside the nucleus (the best token always stays; top_p 1: none
    # is dropped, even where float32 sums of the tail round up to 1)
    if not min_p_first:  # the survivors' probabilities keep their ratios, so the best one's share sets the floor
        drop |= sorted_probs < min_p * sorted_probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.empty_like(logits).scatter_(1, order, sorted_logits)  # back to vocabulary order
    return filtered.softmax(dim=-1)


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the model's own distribution (before sampling parameters, as vLLM reports them) →
    the chosen tokens' [B], and the k most likely ids [B, k] with their values [B, k]."""
    logprobs = logits.to(torch.float32).log_softmax(dim=-1)  # [B, V]
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]  # [B]
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # [B, k] each (the whole vocabulary at most)
    return chosen, ids, values


def token_ranks(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each row's rank of its token [B] among logits [B, V]: 1 for the most likely (ties share the better rank)."""
    return (logits > logits.gather(1, tokens[:, None])).sum(dim=1).add(1)
