"""One sequence the engine generates: its tokens, its cache blocks, its sampling state and its progress."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from dsv2.detokenize import IncrementalDetokenizer
from dsv2.sampling import SamplingParams, SamplingRow


class Status(enum.Enum):
    WAITING = "waiting"  # needs (re)computing from num_computed_tokens on
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    """vLLM's per-token log-probability record."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(eq=False)  # one sequence is one object: the scheduler's queues find it by identity
class Sequence:
    """``token_ids`` = prompt + output. Tokens [0, num_computed_tokens) have their latents in the cache; a step
    computes the next chunk, and when that chunk reaches the last token, samples one more."""

    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int  # output tokens allowed: params.max_tokens capped by max_model_len
    sampling: SamplingRow
    detokenizer: IncrementalDetokenizer | None = None
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks already registered in the prefix cache
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # per prompt position (None before the start)
    cumulative_logprob: float = 0.0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def cacheable_prefix(self) -> int:
        """Tokens the prefix cache may supply: all but the last (its logits are needed), and none whose prompt
        log-probability must be computed."""
        limit = self.num_tokens - 1
        if self.params.prompt_logprobs is not None:
            limit = min(limit, self.params.prompt_logprobs_start - 1)
        return limit

    def prompt_logprob_positions(self, start: int, end: int) -> list[int]:
        """Positions in [start, end) whose logits give a wanted prompt log-probability (position p predicts p + 1)."""
        if self.params.prompt_logprobs is None:
            return []
        first = max(start, self.params.prompt_logprobs_start - 1)
        return list(range(first, min(end, self.num_prompt_tokens - 1)))

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
