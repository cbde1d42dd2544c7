"""DataParallelEngine: one engine per rank behind LLMEngine's interface, for data-parallel attention.

Each rank serves its own requests out of its own latent cache, so W ranks cache W times what one does (with tensor
parallelism every rank caches the same latent: see docs/parallel.md). Rank 0 keeps one `LLMEngine` — scheduler,
block manager, sampling — per rank; a new request goes to the rank with the fewest unfinished sequences, and every
step runs all ranks' batches at once (`dsv2.parallel.group.DataParallelRunner`), the MoE layers exchanging tokens
between the ranks' experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsv2.engine.engine import EngineConfig, LLMEngine, Request, RequestOutput
from dsv2.model import DeepseekV2ForCausalLM
from dsv2.sampling import SamplingParams
from dsv2.tokenizer import Tokenizer

if TYPE_CHECKING:
    from dsv2.parallel.group import ParallelGroup


class DataParallelEngine:
    def __init__(self, model: DeepseekV2ForCausalLM, tokenizer: Tokenizer | None, config: EngineConfig,
                 group: ParallelGroup) -> None:
        assert group.data_parallel
        self.model, self.tokenizer, self.config = model, tokenizer, config
        # rank 0's engine owns the runner and the real cache; the others' caches live in their worker processes
        self.engines = [LLMEngine(model, tokenizer, config, runner_factory=group.make_runner)]
        self.engines += [LLMEngine(model, tokenizer, config, cache_device="meta") for _ in range(1, group.world)]
        self.runner = self.engines[0].runner
        self.owner: dict[str, LLMEngine] = {}  # request id → the engine (rank) serving it
        self.num_steps = 0

    @property
    def requests(self) -> dict[str, Request]:
        return {rid: request for engine in self.engines for rid, request in engine.requests.items()}

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engines[0].check_request(prompt_token_ids, params)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        """Queue a request on the least busy rank (fewest unfinished sequences, then most free blocks)."""
        if request_id in self.owner:
            raise ValueError(f"request_id {request_id!r} is already in use")
        engine = min(self.engines, key=lambda e: (sum(len(r.seqs) for r in e.requests.values()),
                                                  -e.num_free_blocks))
        engine.add_request(request_id, prompt_token_ids, params, prompt)
        self.owner[request_id] = engine

    def abort_request(self, request_id: str) -> RequestOutput | None:
        engine = self.owner.pop(request_id, None)
        return None if engine is None else engine.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(engine.has_unfinished_requests() for engine in self.engines)

    def step(self) -> list[RequestOutput]:
        """One batch per rank, computed together; the outputs of every request that got a token or finished."""
        scheduled = [engine.schedule() for engine in self.engines]
        if all(s is None for s in scheduled):
            return []
        try:
            logits = self.runner.run_all(scheduled)
        except BaseException:
            for engine in self.engines:  # the blocks the step was to fill hold nothing
                engine.blocks.forget_pending()
            raise
        self.num_steps += 1
        outputs = []
        for engine, batch, rank_logits in zip(self.engines, scheduled, logits, strict=True):
            if batch is not None:
                finished = engine.finish_step(*batch, rank_logits)
                for output in finished:
                    if output.finished:
                        del self.owner[output.request_id]
                outputs += finished
        return outputs

    @property
    def num_free_blocks(self) -> int:
        return sum(engine.num_free_blocks for engine in self.engines)

    def stats(self) -> dict[str, int]:
        """Summed over the ranks."""
        per_rank = [engine.stats() for engine in self.engines]
        return {key: sum(s[key] for s in per_rank) for key in per_rank[0]}
