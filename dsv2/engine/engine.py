"""LLMEngine: requests in, a step at a time; the core under `LLM` (offline) and `AsyncEngine` (server)."""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dsv2.config import ModelConfig
from dsv2.detokenize import IncrementalDetokenizer
from dsv2.engine.block_manager import BlockManager
from dsv2.engine.runner import ModelRunner, PagedLatentCache
from dsv2.engine.scheduler import Batch, Scheduler
from dsv2.engine.sequence import Logprob, Sequence
from dsv2.malloc import keep_freed_memory
from dsv2.model import DeepseekV2ForCausalLM
from dsv2.sampling import SamplingParams, SamplingRow, sample, token_ranks, top_logprobs
from dsv2.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass
class EngineConfig:
    """Sizes of the paged cache and of a step. ``num_blocks`` comes from a memory budget (see `LLM`)."""

    num_blocks: int
    block_size: int = 16
    max_model_len: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_logprobs: int = 20  # the most (prompt) log-probabilities a request may ask for per token, as in vLLM
    seed: int | None = None  # the draws of requests without a seed of their own repeat from run to run

    def validate(self, config: ModelConfig) -> None:
        if self.max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                             f"{config.max_position_embeddings}")
        capacity = self.num_blocks * self.block_size
        if self.max_model_len > capacity:
            raise ValueError(f"max_model_len={self.max_model_len} does not fit the KV cache ({self.num_blocks} "
                             f"blocks of {self.block_size} = {capacity} tokens): give the cache more memory "
                             "(kv_cache_memory / gpu_memory_utilization) or lower max_model_len")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} < max_model_len="
                             f"{self.max_model_len}: without chunked prefill a whole prompt must fit one step")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_logprobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


def _copy(entries: list | None) -> list | None:
    return None if entries is None else list(entries)


class LLMEngine:
    def __init__(self, model: DeepseekV2ForCausalLM, tokenizer: Tokenizer | None, config: EngineConfig,
                 runner_factory: Callable[[PagedLatentCache], ModelRunner] | None = None,
                 cache_device: torch.device | str | None = None) -> None:
        """``cache_device`` "meta": the cache's blocks are bookkept here but live in another process (a rank of
        a data-parallel group), so none is allocated."""
        config.validate(model.config)
        if model.device.type == "cpu":
            keep_freed_memory()  # steps reuse freed blocks instead of faulting in fresh pages: fp32 (a) +23% measured
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.cache = PagedLatentCache(model.config, config.num_blocks, config.block_size, model.dtype,
                                      cache_device or model.device)
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        self.runner = (runner_factory or functools.partial(ModelRunner, model))(self.cache)
        self.requests: dict[str, Request] = {}
        self.generator = None if config.seed is None else torch.Generator(model.device).manual_seed(config.seed)
        eos = model.generation_config.eos_token_id
        eos = model.config.eos_token_id if eos is None else eos
        self.eos_token_ids = {eos} if isinstance(eos, int) else set(eos or [])
        self.num_steps = 0
        # Python's cyclic GC rescans every tracked object at each full collection (torch alone brings ~170k): what
        # is alive now (modules, model, tokenizer) lives as long as the engine, so collect once and leave the rest
        # out of later scans, as vLLM does after start-up. Measured: bf16 engine throughput +4% (paired A/B).
        gc.collect()
        gc.freeze()

    # ------------------------------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        """Queue a request; a ValueError that names the problem (see `check_request`) queues nothing."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.check_request(prompt_token_ids, params)
        prompt_token_ids = params.prompt_tail(prompt_token_ids)
        limit = self.config.max_model_len
        max_tokens = min(params.max_tokens or limit, limit - len(prompt_token_ids))
        seqs = []
        for index in range(params.n):
            seq_params = params if params.seed is None else dataclasses.replace(params, seed=params.seed + index)
            if index > 0 and params.prompt_logprobs is not None:  # the request reports the first sample's; the
                seq_params = dataclasses.replace(seq_params, prompt_logprobs=None)  # others may share its blocks
            seq = Sequence(
                request_id=request_id, index=index, token_ids=list(prompt_token_ids),
                num_prompt_tokens=len(prompt_token_ids), params=seq_params, max_tokens=max_tokens,
                sampling=SamplingRow.start(seq_params, prompt_token_ids, self.model.device, self.eos_token_ids),
                detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens,
                                                   params.include_stop_str_in_output)
                if self.tokenizer is not None and params.detokenize else None,
                logprobs=[] if params.logprobs is not None else None,
                prompt_logprobs=[None] * len(prompt_token_ids) if seq_params.prompt_logprobs is not None else None,
            )
            seqs.append(seq)
        for seq in seqs:  # all built first: a sample that cannot be made leaves none behind
            self.scheduler.add(seq)
        self.requests[request_id] = Request(request_id, prompt, list(prompt_token_ids), seqs)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request cannot be served: an empty or too long prompt, token ids outside the
        vocabulary (in the prompt or logit_bias), more log-probabilities than ``max_logprobs``, stop strings without
        a tokenizer (or with ``detokenize=False``). Reads only settings fixed at construction (thread-safe)."""
        prompt_token_ids = params.prompt_tail(prompt_token_ids)
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: it needs at least one token")
        vocab = self.model.config.vocab_size
        outside = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if outside:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}); got {outside[0]}")
        outside = [t for t in params.logit_bias or {} if t >= vocab]
        if outside:
            raise ValueError(f"logit_bias token ids must lie in [0, {vocab}); got {outside[0]}")
        limit = self.config.max_model_len
        if len(prompt_token_ids) >= limit:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens, but max_model_len is {limit} (prompt and "
                             "output together)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (the model folder has no tokenizer.json)")
        if params.stop and not params.detokenize:
            raise ValueError("stop strings need the text: detokenize=False leaves none")
        for name in ("logprobs", "prompt_logprobs"):
            wanted = getattr(params, name)
            if wanted is not None and wanted > self.config.max_logprobs:
                raise ValueError(f"{name}={wanted} is more than max_logprobs={self.config.max_logprobs} (an "
                                 "engine setting: LLM(max_logprobs=...))")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its cache blocks."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ----------------------------------------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one batch; return the (cumulative) output of every request that got a token or finished."""
        scheduled = self.schedule()
        if scheduled is None:
            return []
        try:
            logits = self.runner.run(*scheduled)
        except BaseException:
            self.blocks.forget_pending()  # the blocks it was to fill hold nothing: no later request may share them
            raise
        return self.finish_step(*scheduled, logits)

    def schedule(self) -> tuple[Batch, list[list[int]]] | None:
        """The next batch and, per sequence, the positions whose logits it needs besides the last (prompt
        logprobs); None when there is nothing to run."""
        batch = self.scheduler.schedule()
        if batch is None:
            return None
        return batch, [item.seq.prompt_logprob_positions(item.start, item.end) for item in batch.items]

    def finish_step(self, batch: Batch, extra: list[list[int]], logits: torch.Tensor) -> list[RequestOutput]:
        """Record a computed batch (logits [B, K, vocab]: the ``extra`` positions, then the last token), sample,
        and return the output of every request that got a token or finished."""
        self.num_steps += 1
        self.blocks.confirm()
        for item, positions, row in zip(batch.items, extra, logits, strict=True):
            item.seq.num_computed_tokens = item.end
            self.blocks.commit(item.seq)
            if positions:
                self._record_prompt_logprobs(item.seq, positions, row[: len(positions)])
        touched = self._sample(batch, logits[:, -1])
        outputs = []
        for request_id in dict.fromkeys(seq.request_id for seq in touched):
            request = self.requests[request_id]
            outputs.append(self._output(request))
            if request.finished:
                del self.requests[request_id]
        return outputs

    def _sample(self, batch: Batch, logits: torch.Tensor) -> list[Sequence]:
        rows = [i for i, item in enumerate(batch.items) if item.samples]
        if not rows:
            return []
        seqs = [batch.items[i].seq for i in rows]
        logits = logits if len(rows) == len(batch.items) else logits[rows]  # [N, vocab]
        tokens = sample(logits, [seq.sampling for seq in seqs], self.generator)  # [N]
        want_logprobs = [seq.params.logprobs for seq in seqs if seq.params.logprobs is not None]
        if want_logprobs:
            chosen, top_ids, top_values = (t.tolist() for t in top_logprobs(logits, tokens, max(want_logprobs)))
            ranks = token_ranks(logits, tokens).tolist()
        now = time.monotonic()
        for n, (seq, token) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            seq.token_ids.append(token)
            seq.sampling.output_ids.append(token)
            seq.first_token_time = seq.first_token_time or now
            if seq.logprobs is not None:
                k = seq.params.logprobs
                seq.logprobs.append(self._logprob_entry(token, chosen[n], ranks[n], top_ids[n][:k], top_values[n][:k],
                                                        seq.params.detokenize))
                seq.cumulative_logprob += chosen[n]
            if seq.detokenizer is not None and not (self._is_stop_token(seq, token)
                                                    and not seq.params.include_stop_str_in_output):
                seq.text += seq.detokenizer.add(token, look_for_stop=not seq.sampling.stops_barred)
            self._check_finished(seq, token)
        return seqs

    def _record_prompt_logprobs(self, seq: Sequence, positions: list[int], logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens after ``positions`` (logits [n, vocab] at those positions)."""
        targets = torch.tensor([seq.token_ids[p + 1] for p in positions], device=logits.device)
        k = seq.params.prompt_logprobs
        chosen, top_ids, top_values = (t.tolist() for t in top_logprobs(logits, targets, k))
        ranks = token_ranks(logits, targets).tolist()
        for n, p in enumerate(positions):
            seq.prompt_logprobs[p + 1] = self._logprob_entry(seq.token_ids[p + 1], chosen[n], ranks[n], top_ids[n],
                                                             top_values[n], seq.params.detokenize)

    def _logprob_entry(self, token: int, logprob: float, rank: int, top_ids: list[int], top_values: list[float],
                       detokenize: bool = True) -> dict[int, Logprob]:
        """One position's logprobs as vLLM reports them: the token's (first, with its true rank), then the most
        likely ones not already in; their decoded_token is None with ``detokenize`` False, as in vLLM."""
        entry = {token: Logprob(logprob, rank, self._decode_one(token, detokenize))}
        for top_rank, (tid, value) in enumerate(zip(top_ids, top_values, strict=True), start=1):
            entry.setdefault(tid, Logprob(value, top_rank, self._decode_one(tid, detokenize)))
        return entry

    def _decode_one(self, token: int, detokenize: bool = True) -> str | None:
        return None if self.tokenizer is None or not detokenize else self.tokenizer.decode([token])

    def _is_stop_token(self, seq: Sequence, token: int) -> bool:
        """Whether ``token`` ends the sequence as a stop token id or EOS (its text is then left out, as vLLM does,
        unless ``include_stop_str_in_output``)."""
        return token in seq.params.stop_ids(self.eos_token_ids)

    def _check_finished(self, seq: Sequence, token: int) -> None:
        params = seq.params
        if token in self.eos_token_ids and not params.ignore_eos:  # EOS first, as vLLM: no stop_reason
            seq.finish_reason = "stop"
        elif token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif seq.detokenizer is not None and seq.detokenizer.stopped:
            seq.finish_reason, seq.stop_reason = "stop", seq.detokenizer.stop_string
        elif len(seq.output_ids) >= seq.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason is None:
            return
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.finish()
        self.scheduler.finish(seq)

    def _output(self, request: Request) -> RequestOutput:
        """A snapshot: the lists it holds are copies, which later steps do not change."""
        outputs = [
            CompletionOutput(seq.index, seq.text, seq.output_ids, seq.cumulative_logprob if seq.logprobs is not None
                             else None, _copy(seq.logprobs), seq.finish_reason, seq.stop_reason)
            for seq in request.seqs
        ]
        first = request.seqs[0]
        return RequestOutput(request.request_id, request.prompt, list(request.prompt_token_ids), outputs,
                             request.finished, prompt_logprobs=_copy(first.prompt_logprobs),
                             num_cached_tokens=first.num_cached_tokens,
                             metrics={"arrival_time": first.arrival_time, "first_token_time": first.first_token_time})

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    def stats(self) -> dict[str, int]:
        """Sequences running and waiting, free and total cache blocks (for metrics)."""
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "free_blocks": self.num_free_blocks, "total_blocks": self.blocks.num_blocks}
