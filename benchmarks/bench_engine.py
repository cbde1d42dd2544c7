"""Offline batched generation: dsv2's engine (`LLM.generate`) vs transformers' `generate`, and what the latent cache
buys, on the shared mid-size random checkpoint (see bench_generate.py).

    python benchmarks/bench_engine.py [--dtypes bfloat16 float32] [--quick]

Both implementations run in this one process, on 2 threads, in each dtype in turn, both loaded at once:

(a) throughput: 64 requests with 128-token random prompts, 128 greedy new tokens each (ignore_eos): output tokens/s
    of dsv2's engine (one `LLM.generate` call, continuous batching over the paged latent cache, after a short warm-up
    call) vs transformers' `generate` one request at a time — only the first 3 requests are timed (tokens/s is per
    request anyway) — and batched (all 64 at once, left-padded, with an attention mask). For each of the two,
    transformers runs with its fastest (experts, attention) implementation pair, each pair scored by its prefill
    time (measured on up to 8 of the prompts, scaled) + 127 × its decode step on the full batch's cache (batched_mm
    is not tried where its prefill would gather more than 1 GiB of expert weights). Measured in 3 rounds, each with
    new prompts (so dsv2's prefix cache finds nothing to reuse) and the implementations in alternating order, so that
    this shared machine's speed drifts hit both alike: the medians of each one's rounds, and the median of the
    per-round ratios (a goal needs both).
(b) long-context decode: 8 sequences at a 2,048-token context, seconds per decode step. dsv2: the engine with 8
    requests of 2,048 distinct random tokens; after the prefill and 2 warm-up decode steps, the median of the timed
    `engine.step()` calls (scheduling and sampling included). transformers: one 2,048-token prefill whose
    DynamicCache is repeated to a batch of 8 (`batch_repeat_interleave`: the same shapes and work as 8 distinct
    prompts, at an eighth of the prefill time), then single-token forward steps with every implementation pair (a
    warm-up step, then the median of 2); the fastest pair counts.
(c) cache capacity (arithmetic from the configs, V2-Lite's and the mid-size one): bytes per token of dsv2's latent
    cache vs an expanded per-head K/V cache (layers × heads × (qk_head_dim + v_head_dim) values: what the official
    remote code and most ports keep), and how many 4,096-token sequences a 4 GiB cache holds (dsv2 counted in its
    engine's 16-token blocks). transformers 5.24's own DynamicCache is measured on the mid-size model.

Also printed: the matmul FLOP/s and read bandwidth measured after each dtype's runs, how close dsv2's batch-64
decode steps come to that matmul peak, and the CPU time other processes took meanwhile.

The process keeps freed memory for reuse from the start (`dsv2.malloc.keep_freed_memory`, which dsv2's engine
applies on CPU anyway): transformers runs with it too. Under glibc's defaults its long-context decode step pays for
page faults on its large re-expanded temporaries (several times slower here); the comparison leaves that out.

``--quick``: 8 requests of 32 + 16 tokens, context 256 with 2 sequences, 1 transformers request, one round (a
smoke run).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch

from dsv2 import LLM, ModelConfig, SamplingParams
from dsv2.engine.engine import LLMEngine
from dsv2.info import summarize
from dsv2.malloc import keep_freed_memory

from bench_generate import (
    CpuAccount,
    bench_config,
    describe_checkpoint,
    load_theirs,
    mark,
    matmul_flops,
    read_bandwidth,
    write_checkpoint,
)

THREADS = 2
SOLO_GOAL = 15.0  # dsv2 engine / transformers one request at a time, output tokens/s
BATCHED_GOAL = 3.0  # dsv2 engine / transformers batched
LONG_DECODE_GOAL = 10.0  # transformers / dsv2 seconds per decode step, 8 sequences at 2,048 tokens
CAPACITY_GOAL = 8.0  # dsv2 / expanded cache: concurrent 4k-token sequences in 4 GiB, V2-Lite dimensions
CAPACITY_BUDGET = 4 * 2**30
CAPACITY_TOKENS = 4096
BLOCK_SIZE = 16  # the engine's default
KV_CACHE_MEMORY = 512 * 2**20  # dsv2's engine in this benchmark: plenty for either workload
BATCHED_MM_LIMIT = 2**30  # transformers' batched_mm gathers one weight copy per (token, expert) pair
PROBE_ROWS = 8  # prompts whose prefill is timed when picking transformers' implementations
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


@dataclass
class Settings:
    requests: int  # (a) requests
    prompt_tokens: int
    new_tokens: int
    solo_requests: int  # (a) transformers one at a time: how many requests are timed
    theirs_batch: int  # (a) transformers batched: requests per generate call
    context: int  # (b) cached tokens per sequence
    long_batch: int  # (b) sequences
    long_steps: int  # (b) timed dsv2 decode steps (after 2 warm-up steps)
    theirs_long_steps: int  # (b) timed transformers decode steps (after 1 warm-up step)
    rounds: int  # (a) rounds, the implementations alternating


FULL = Settings(requests=64, prompt_tokens=128, new_tokens=128, solo_requests=3, theirs_batch=64, context=2048,
                long_batch=8, long_steps=8, theirs_long_steps=2, rounds=3)
QUICK = Settings(requests=8, prompt_tokens=32, new_tokens=16, solo_requests=1, theirs_batch=8, context=256,
                 long_batch=2, long_steps=3, theirs_long_steps=1, rounds=1)


@dataclass
class Step:
    """One engine step: wall seconds and what the scheduler put in it."""

    seconds: float
    prefill: bool
    seqs: int
    tokens: int  # tokens computed
    keys: int  # Σ over sequences of the context each attends to (their cached + new tokens)


@dataclass
class Round:
    """One round of (a): output tokens/s of each implementation on that round's prompts."""

    ours: float
    solo: float  # transformers one request at a time
    batched: float  # transformers batched


@dataclass
class Result:
    """One dtype's measurements."""

    rounds: list[Round] = field(default_factory=list)
    ours_steps: list[Step] = field(default_factory=list)  # (a) every step of the first round's generate call
    ours_seconds: float = 0.0  # (a) the first round's generate call
    ours_long_s: float = 0.0  # (b) seconds per decode step
    ours_long_prefill_s: float = 0.0
    theirs_long_s: float = 0.0
    theirs_cache_bytes: int = 0  # transformers' DynamicCache, bytes per token
    agree: int = 0  # greedy tokens dsv2's engine and transformers agree on (request 0) before the first difference
    solo_impl: str = ""
    batched_impl: str = ""
    long_impl: str = ""
    picks: list[str] = field(default_factory=list)
    matmul: float = 0.0  # FLOP/s
    bandwidth: float = 0.0  # bytes/s

    def median(self, impl: str) -> float:
        """The median over the rounds of one implementation's tokens/s: "ours", "solo" or "batched"."""
        return statistics.median(getattr(r, impl) for r in self.rounds)

    def ratios(self, baseline: str) -> tuple[float, float]:
        """dsv2 vs a baseline ("solo" or "batched"): (ratio of the medians, median of the per-round ratios)."""
        return (self.median("ours") / self.median(baseline),
                statistics.median(r.ours / getattr(r, baseline) for r in self.rounds))


# ------------------------------------------------------------------------------------------------------- inputs
def random_prompts(config: ModelConfig, count: int, tokens: int, seed: int) -> torch.Tensor:
    """[count, tokens] random ids, no BOS / EOS (ids 0 and 1)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, config.vocab_size, (count, tokens), generator=generator)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (ids [B, T], attention mask [B, T]) left-padded to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# --------------------------------------------------------------------------------------------------------- dsv2
class StepRecorder:
    """Times every `engine.step()` while active (`with StepRecorder(engine) as recorder:`): instance attributes wrap
    the engine's own methods for the duration, and are removed on exit; nothing is edited."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.steps: list[Step] = []
        self._scheduled: list = []

    def __enter__(self) -> StepRecorder:
        engine, scheduled = self.engine, self._scheduled
        schedule, step = engine.scheduler.schedule, engine.step

        def recording_schedule():
            batch = schedule()
            scheduled.append(batch)
            return batch

        def timed_step():
            scheduled.clear()
            start = time.perf_counter()
            outputs = step()
            seconds = time.perf_counter() - start
            batch = scheduled[-1] if scheduled else None
            if batch is not None:
                self.steps.append(Step(seconds, batch.is_prefill, len(batch.items), batch.num_tokens,
                                       sum(item.end for item in batch.items)))
            return outputs

        engine.scheduler.schedule = recording_schedule
        engine.step = timed_step
        return self

    def __exit__(self, *exc: object) -> None:
        del self.engine.scheduler.schedule, self.engine.step  # the class's methods show through again


def ours_warm_up(llm: LLM, prompts: torch.Tensor) -> None:
    """A short generate call (the decode step's shapes, and the per-expert matmul sizes oneDNN builds kernels for)."""
    llm.generate(prompt_token_ids=prompts.tolist(),
                 sampling_params=SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)


def ours_throughput(llm: LLM, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[Step], list[int]]:
    """One generate call over all prompts. → (output tokens/s, the call's steps, request 0's output ids)."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    with StepRecorder(llm.engine) as recorder:
        start = time.perf_counter()
        outputs = llm.generate(prompt_token_ids=prompts.tolist(), sampling_params=params, use_tqdm=False)
        seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    if tokens != prompts.shape[0] * new_tokens:
        raise RuntimeError(f"dsv2 generated {tokens} tokens, expected {prompts.shape[0] * new_tokens}")
    return tokens / seconds, recorder.steps, list(outputs[0].outputs[0].token_ids)


def ours_long_decode(llm: LLM, prompts: torch.Tensor, steps: int, warm_steps: int = 2) -> tuple[float, float]:
    """The engine with one request per prompt; → (median seconds of the decode steps after `warm_steps`, seconds of
    the prefill steps)."""
    engine = llm.engine
    # the answers admitted first decode between the later prompts' prefill steps: room for those tokens too
    params = SamplingParams(temperature=0, max_tokens=warm_steps + steps + 2 + len(prompts), ignore_eos=True)
    for i, ids in enumerate(prompts.tolist()):
        engine.add_request(f"long-{i}", ids, params)
    with StepRecorder(engine) as recorder:
        while engine.has_unfinished_requests():
            engine.step()
    prefill = sum(s.seconds for s in recorder.steps if s.prefill)
    decode = [s.seconds for s in recorder.steps if not s.prefill and s.seqs == prompts.shape[0]]
    timed = decode[warm_steps:warm_steps + steps]
    if len(timed) < steps:
        raise RuntimeError(f"dsv2: {len(decode)} full decode steps, expected {warm_steps + steps}")
    return statistics.median(timed), prefill


def run_ours_long(llm: LLM, dtype_name: str, config: ModelConfig, settings: Settings, result: Result) -> None:
    long_prompts = random_prompts(config, settings.long_batch, settings.context, seed=1)
    result.ours_long_s, result.ours_long_prefill_s = ours_long_decode(llm, long_prompts, settings.long_steps)
    print(f"{dtype_name}: dsv2 engine, {settings.long_batch} × {settings.context} tokens: "
          f"{result.ours_long_s * 1e3:.1f} ms per decode step (prefill {result.ours_long_prefill_s:.1f} s)", flush=True)


# -------------------------------------------------------------------------------------------------- transformers
def theirs_generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=model.config.eos_token_id)


def batched_mm_bytes(config: ModelConfig, tokens: int, dtype: torch.dtype) -> int:
    """Memory transformers' batched_mm experts gather for one forward pass: every (token, expert) pair's weights."""
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size * dtype.itemsize
    return tokens * config.num_experts_per_tok * per_expert


def impl_pairs(config: ModelConfig, prefill_tokens: int, dtype: torch.dtype) -> tuple[list[tuple[str, str]], list[str]]:
    """transformers' (experts, attention) implementation pairs worth trying. → (pairs, notes on the ones left out)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    pairs, notes = [], []
    for experts in ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]:
        gathered = batched_mm_bytes(config, prefill_tokens, dtype)
        if experts == "batched_mm" and gathered > BATCHED_MM_LIMIT:
            notes.append(f"batched_mm not tried (its prefill would gather {gathered / 2**30:.1f} GiB of expert "
                         "weights)")
            continue
        pairs += [(experts, "sdpa"), (experts, "eager")]
    return pairs, notes


def use_impl(model, experts: str, attn: str) -> None:
    model.set_experts_implementation(experts)
    model.set_attn_implementation(attn)


def decode_step_s(model, cache, steps: int, give_up_s: float = math.inf) -> float:
    """Median seconds of `steps` single-token forward steps (after a warm-up step) on `cache` [B, T], each step's
    entries cut off again (also when a step fails midway); stops after the warm-up when that alone took
    `give_up_s` (→ its time)."""
    batch, context = cache.layers[0].keys.shape[0], cache.get_seq_length()
    ids = torch.full((batch, 1), 2)
    mask = torch.ones(batch, context + 1, dtype=torch.long)
    positions = torch.full((batch, 1), context)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        try:
            model(ids, attention_mask=mask, cache=cache, use_cache=True, position_ids=positions, logits_to_keep=1)
        finally:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[..., :context, :], layer.values[..., :context, :]
        times.append(time.perf_counter() - start)
        if times[0] >= give_up_s:
            return times[0]
    return statistics.median(times[1:])


def pick_theirs(model, ids: torch.Tensor, new_tokens: int, config: ModelConfig,
                dtype: torch.dtype) -> tuple[str, str, str]:
    """transformers' fastest (experts, attention) pair for a generate call of `new_tokens` after the prompts `ids`
    [B, T], each pair scored by its prefill time (measured on up to PROBE_ROWS of the prompts, scaled to B) +
    (new_tokens − 1) × its decode step on the full batch's cache. → (experts, attention, what was tried)."""
    sample = ids[:PROBE_ROWS]
    pairs, tried = impl_pairs(config, ids.numel(), dtype)
    scores: dict[tuple[str, str], tuple[float, float]] = {}  # pair → (estimated seconds, prefill)
    cache = None
    for experts, attn in pairs:
        try:
            use_impl(model, experts, attn)
            model(sample[:, :8], use_cache=False, logits_to_keep=1)  # kernels for this pair
            start = time.perf_counter()
            out = model(sample, attention_mask=torch.ones_like(sample), use_cache=True, logits_to_keep=1)
            prefill = (time.perf_counter() - start) * ids.shape[0] / sample.shape[0]
        except Exception:  # CUDA-only kernels, missing packages
            tried.append(f"{experts}+{attn} does not run")
            continue
        if cache is None:
            cache = out.cache if sample.shape[0] == ids.shape[0] else model(
                ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1).cache
        best_step = min((score - p) / (new_tokens - 1) for score, p in scores.values()) if scores else math.inf
        step = decode_step_s(model, cache, 1, give_up_s=3 * best_step)
        scores[experts, attn] = (prefill + (new_tokens - 1) * step, prefill)
        tried.append(f"{experts}+{attn} {prefill:.2f} s + {step * 1e3:.0f} ms/step")
    experts, attn = min(scores, key=lambda pair: scores[pair][0])
    use_impl(model, experts, attn)
    return experts, attn, ", ".join(tried)


def theirs_solo(model, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """One generate call per prompt. → (output tokens/s over all of them, prompt 0's output ids)."""
    outputs = []
    start = time.perf_counter()
    for ids in prompts:
        ids = ids[None]
        outputs.append(theirs_generate(model, ids, torch.ones_like(ids), new_tokens)[0, ids.shape[1]:])
    seconds = time.perf_counter() - start
    return prompts.shape[0] * new_tokens / seconds, outputs[0].tolist()


def theirs_batched(model, prompts: torch.Tensor, new_tokens: int, batch: int) -> float:
    """generate over `batch` prompts at a time, left-padded with an attention mask. → output tokens/s."""
    tokens = 0
    start = time.perf_counter()
    for first in range(0, prompts.shape[0], batch):
        ids, mask = left_pad(prompts[first:first + batch].tolist(), model.config.eos_token_id)
        out = theirs_generate(model, ids, mask, new_tokens)
        tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
    return tokens / (time.perf_counter() - start)


def theirs_long_decode(model, prompt: torch.Tensor, batch: int, steps: int, config: ModelConfig,
                       dtype: torch.dtype) -> tuple[float, str, str]:
    """Prefill one prompt [1, T], repeat its cache to `batch` rows, then single-token steps with every
    implementation pair (a warm-up step, then `steps`; a pair whose warm-up step takes 3× the best median stops
    there). → (the best pair's median seconds per step, its name, what was tried)."""
    cache = model(prompt, use_cache=True, logits_to_keep=1).cache
    cache.batch_repeat_interleave(batch)
    pairs, tried = impl_pairs(config, prompt.numel(), dtype)
    best, best_name = math.inf, ""
    for experts, attn in pairs:
        try:
            use_impl(model, experts, attn)
            model(prompt[:, :8], use_cache=False, logits_to_keep=1)  # fails here if the pair cannot run
            seconds = decode_step_s(model, cache, steps, give_up_s=3 * best)
        except Exception:  # CUDA-only kernels, missing packages
            tried.append(f"{experts}+{attn} does not run")
            continue
        tried.append(f"{experts}+{attn} {seconds * 1e3:.0f} ms/step")
        if seconds < best:
            best, best_name = seconds, f"experts={experts}, attn={attn}"
    return best, best_name, ", ".join(tried)


def theirs_cache_bytes_per_token(model, config: ModelConfig, tokens: int = 64) -> int:
    cache = model(random_prompts(config, 1, tokens, seed=3), use_cache=True, logits_to_keep=1).cache
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total // tokens


@dataclass
class Theirs:
    """transformers' model and the (experts, attention) pairs picked for (a)."""

    model: object
    solo: tuple[str, str]
    batched: tuple[str, str]


@torch.no_grad()
def load_and_pick_theirs(path: str, dtype: torch.dtype, config: ModelConfig, prompts: torch.Tensor,
                         settings: Settings, result: Result) -> Theirs:
    model = load_theirs(path, dtype, private_weights=True)
    result.theirs_cache_bytes = theirs_cache_bytes_per_token(model, config)
    experts, attn, tried = pick_theirs(model, prompts[:1], settings.new_tokens, config, dtype)
    solo = experts, attn
    result.solo_impl = f"experts={experts}, attn={attn}"
    result.picks.append(f"one at a time (prefill + decode step of 1 prompt): {tried}")
    batch = prompts[:settings.theirs_batch]
    experts, attn, tried = pick_theirs(model, batch, settings.new_tokens, config, dtype)
    result.batched_impl = f"experts={experts}, attn={attn}"
    result.picks.append(f"batched (prefill of {min(PROBE_ROWS, batch.shape[0])} prompts scaled to "
                        f"{batch.shape[0]} + decode step of {batch.shape[0]}): {tried}")
    return Theirs(model, solo, (experts, attn))


@torch.no_grad()
def run_theirs_round(theirs: Theirs, prompts: torch.Tensor, settings: Settings) -> tuple[float, float, list[int]]:
    """(a) for transformers on one round's prompts → (tokens/s one at a time, batched, request 0's output ids)."""
    use_impl(theirs.model, *theirs.solo)
    solo, first = theirs_solo(theirs.model, prompts[:settings.solo_requests], settings.new_tokens)
    use_impl(theirs.model, *theirs.batched)
    batched = theirs_batched(theirs.model, prompts, settings.new_tokens, settings.theirs_batch)
    return solo, batched, first


@torch.no_grad()
def run_theirs_long(theirs: Theirs, dtype_name: str, config: ModelConfig, settings: Settings,
                    result: Result) -> None:
    long_prompt = random_prompts(config, 1, settings.context, seed=1)
    result.theirs_long_s, result.long_impl, tried = theirs_long_decode(
        theirs.model, long_prompt, settings.long_batch, settings.theirs_long_steps, config, getattr(torch, dtype_name))
    result.picks.append(f"long-context decode steps: {tried}")
    print(f"{dtype_name}: transformers, {settings.long_batch} × {settings.context} tokens: "
          f"{result.theirs_long_s * 1e3:.1f} ms per decode step", flush=True)


# ------------------------------------------------------------------------------------------------------ physics
def measure_machine(dtype: torch.dtype, config: ModelConfig) -> tuple[float, float]:
    """(matmul FLOP/s in `dtype`, read bytes/s: the best of a sum and a float32 batch-1 linear over 1 GiB)."""
    return matmul_flops(dtype, config), max(read_bandwidth())


def decode_step_flops(config: ModelConfig, active_params: int, step: Step) -> float:
    """A decode step's matmul FLOPs: 2 per active parameter per sequence (the absorbed W_UK / W_UV cost what
    kv_b_proj's parameters count), plus absorbed attention over each sequence's context: per layer and head,
    scores over (kv_lora_rank + rope) values and the latent-value sum over kv_lora_rank."""
    per_key = 2 * config.num_hidden_layers * config.num_attention_heads * (2 * config.kv_lora_rank
                                                                          + config.qk_rope_head_dim)
    return 2 * active_params * step.seqs + per_key * step.keys


# ------------------------------------------------------------------------------------------------------- report
def capacity_rows(dtype_name: str, theirs_bytes: dict[str, int]) -> tuple[list[str], float]:
    """(c) rows for V2-Lite and the mid-size config. → (rows, V2-Lite's ratio of sequences)."""
    dtype = getattr(torch, dtype_name)
    rows, lite_ratio = [], 0.0
    blocks_per_seq = -(-CAPACITY_TOKENS // BLOCK_SIZE)
    for name, config in (("V2-Lite", ModelConfig.preset("v2-lite")), ("mid-size", bench_config())):
        summary = summarize(config)
        ours = summary.latent_cache_values * dtype.itemsize
        expanded = summary.expanded_cache_values * dtype.itemsize
        ours_seqs = CAPACITY_BUDGET // (ours * BLOCK_SIZE) // blocks_per_seq
        expanded_seqs = CAPACITY_BUDGET // (expanded * CAPACITY_TOKENS)
        ratio = ours_seqs / expanded_seqs if expanded_seqs else float("inf")
        lite_ratio = lite_ratio or ratio
        rows.append(f"| {name} | {SHORT[dtype_name]} | {ours:,} | {expanded:,} | {expanded / ours:.1f}× | "
                    f"{ours_seqs} | {expanded_seqs} | {ratio:.1f}× |")
        if name == "mid-size" and dtype_name in theirs_bytes:
            measured = theirs_bytes[dtype_name]
            rows.append(f"| mid-size, transformers 5.24 DynamicCache (measured) | {SHORT[dtype_name]} | — | "
                        f"{measured:,} | {measured / ours:.1f}× | — | "
                        f"{CAPACITY_BUDGET // (measured * CAPACITY_TOKENS)} | — |")
    return rows, lite_ratio


def throughput_rows(dtype_name: str, r: Result, settings: Settings) -> list[str]:
    short = SHORT[dtype_name]
    rows = [
        (f"(a) transformers one at a time ({settings.solo_requests} of the requests timed)", "solo"),
        (f"(a) transformers batched, {settings.theirs_batch} per generate call", "batched"),
    ]
    lines = []
    for what, baseline in rows:
        of_medians, paired = r.ratios(baseline)
        lines.append(f"| {what} | {short} | {r.median(baseline):,.1f} | {r.median('ours'):,.1f} | "
                     f"{of_medians:.2f}× | {paired:.2f}× |")
    long = r.theirs_long_s / r.ours_long_s
    lines.append(f"| (b) decode step, {settings.long_batch} sequences at {settings.context} tokens, ms "
                 f"| {short} | {r.theirs_long_s * 1e3:,.1f} | {r.ours_long_s * 1e3:,.1f} | {long:.2f}× | — |")
    return lines


def decode_efficiency(dtype_name: str, r: Result, config: ModelConfig, settings: Settings) -> list[str]:
    """How close dsv2's full-batch decode steps of (a) come to the matmul peak (and what reading the weights costs)."""
    summary = summarize(config)
    active = summary.activated_params - summary.embedding_params
    full = [s for s in r.ours_steps if not s.prefill and s.seqs == settings.requests]
    if not full:
        return [f"{dtype_name}: no full-batch decode step recorded"]
    seconds = statistics.median(s.seconds for s in full)
    deciles = statistics.quantiles([s.seconds for s in full], n=10)
    flops = statistics.mean(decode_step_flops(config, active, s) for s in full)
    mean_context = statistics.mean(s.keys / s.seqs for s in full)
    prefill = sum(s.seconds for s in r.ours_steps if s.prefill)
    weights = (summary.total_params - summary.embedding_params) * getattr(torch, dtype_name).itemsize
    return [
        f"{dtype_name}: dsv2 decode steps of (a) with all {settings.requests} sequences: median "
        f"{seconds * 1e3:.1f} ms (p10 {deciles[0] * 1e3:.0f}, p90 {deciles[-1] * 1e3:.0f}) at a mean context of "
        f"{mean_context:.0f} tokens, {flops / 1e9:.1f} GFLOP each → "
        f"{flops / seconds / 1e9:.0f} GFLOP/s = {flops / seconds / r.matmul:.1%} of the measured matmul peak "
        f"({r.matmul / 1e9:.0f} GFLOP/s); reading the weights once ({weights / 1e6:.0f} MB, nearly every routed "
        f"expert is hit at this batch) at the measured {r.bandwidth / 1e9:.1f} GB/s takes "
        f"{weights / r.bandwidth * 1e3:.1f} ms ({weights / r.bandwidth / seconds:.0%} of the step); "
        f"the prefill steps took {prefill:.1f} s of the first round's {r.ours_seconds:.1f} s",
        f"  transformers ran one at a time with {r.solo_impl}, batched with {r.batched_impl}, at long context with "
        f"{r.long_impl}; "
        f"greedy outputs of request 0 agree on the first {r.agree} of {settings.new_tokens} tokens",
        *[f"  transformers candidates, {pick}" for pick in r.picks],
    ]


def goal_lines(results: dict[str, Result], lite_ratio: float) -> list[str]:
    lines = []
    for name, r in results.items():
        for what, baseline, goal in (("one at a time", "solo", SOLO_GOAL), ("batched", "batched", BATCHED_GOAL)):
            of_medians, paired = r.ratios(baseline)
            lines.append(f"goal (a) {name}: dsv2 engine ≥ {goal:.0f}× transformers {what}: {of_medians:.2f}× "
                         f"(median of the rounds' ratios {paired:.2f}×) {mark(min(of_medians, paired) >= goal)}")
        long = r.theirs_long_s / r.ours_long_s
        lines.append(f"goal (b) {name}: decode step at long context ≥ {LONG_DECODE_GOAL:.0f}× faster: {long:.2f}× "
                     f"{mark(long >= LONG_DECODE_GOAL)}")
    lines.append(f"goal (c): ≥ {CAPACITY_GOAL:.0f}× more concurrent {CAPACITY_TOKENS}-token sequences in 4 GiB on "
                 f"V2-Lite dimensions: {lite_ratio:.1f}× {mark(lite_ratio >= CAPACITY_GOAL)}")
    return lines


def agreement(a: list[int], b: list[int]) -> int:
    same = [x == y for x, y in zip(a, b, strict=False)]
    return [*same, False].index(False)


# --------------------------------------------------------------------------------------------------------- main
def run_rounds(llm: LLM, theirs: Theirs, dtype_name: str, config: ModelConfig, settings: Settings,
               result: Result) -> None:
    """(a): each round's prompts through both implementations, which go first in turn."""
    for i in range(settings.rounds):
        prompts = random_prompts(config, settings.requests, settings.prompt_tokens, seed=i)
        ours_first = i % 2 == 0
        if not ours_first:
            solo, batched, theirs_ids = run_theirs_round(theirs, prompts, settings)
        ours, steps, ours_ids = ours_throughput(llm, prompts, settings.new_tokens)
        if ours_first:
            solo, batched, theirs_ids = run_theirs_round(theirs, prompts, settings)
        result.rounds.append(Round(ours, solo, batched))
        if i == 0:
            result.ours_steps, result.ours_seconds = steps, sum(s.seconds for s in steps)
            result.agree = agreement(ours_ids, theirs_ids)
        print(f"{dtype_name}, round {i + 1} ({'dsv2' if ours_first else 'transformers'} first): output tokens/s "
              f"dsv2 engine {ours:.1f}, transformers one at a time {solo:.1f} ({ours / solo:.2f}×), batched by "
              f"{settings.theirs_batch} {batched:.1f} ({ours / batched:.2f}×)", flush=True)


def run_dtype(path: str, dtype_name: str, config: ModelConfig, settings: Settings) -> Result:
    result = Result()
    dtype = getattr(torch, dtype_name)
    llm = LLM(model=path, dtype=dtype_name, kv_cache_memory=KV_CACHE_MEMORY,
              max_model_len=max(settings.context, settings.prompt_tokens) + 64)
    ours_warm_up(llm, random_prompts(config, settings.requests, 16, seed=100))
    first_prompts = random_prompts(config, settings.requests, settings.prompt_tokens, seed=0)  # round 1's
    theirs = load_and_pick_theirs(path, dtype, config, first_prompts, settings, result)
    run_rounds(llm, theirs, dtype_name, config, settings, result)
    run_ours_long(llm, dtype_name, config, settings, result)
    run_theirs_long(theirs, dtype_name, config, settings, result)
    del llm, theirs
    gc.collect()
    result.matmul, result.bandwidth = measure_machine(dtype, config)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--quick", action="store_true", help="small workloads: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    keep_freed_memory()
    settings = QUICK if args.quick else FULL
    config = bench_config()
    account = CpuAccount()
    print(describe_checkpoint(config), flush=True)
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(config, tmp)
        for dtype_name in args.dtypes:
            results[dtype_name] = run_dtype(tmp, dtype_name, config, settings)

    print(f"\n(a) {settings.requests} requests × {settings.prompt_tokens}-token prompts → {settings.new_tokens} new "
          f"tokens each (greedy, ignore_eos), output tokens/s; (b) seconds per decode step")
    print(f"(medians of {settings.rounds} rounds)")
    print("| measurement | dtype | transformers | dsv2 engine | ratio | median of the rounds' ratios |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print("\n".join(throughput_rows(name, r, settings)))
    print(f"\n(c) cache per token and concurrent {CAPACITY_TOKENS}-token sequences in a 4 GiB cache")
    print("| config | dtype | dsv2 latent, bytes/token | expanded K/V, bytes/token | expanded / latent | "
          "sequences, dsv2 | sequences, expanded | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    theirs_bytes = {name: r.theirs_cache_bytes for name, r in results.items()}
    lite_ratio = 0.0
    for dtype_name in ("bfloat16", "float32"):
        rows, ratio = capacity_rows(dtype_name, theirs_bytes)
        lite_ratio = lite_ratio or ratio
        print("\n".join(rows))
    print()
    for name, r in results.items():
        print("\n".join(decode_efficiency(name, r, config, settings)))
    print()
    print("\n".join(goal_lines(results, lite_ratio)))
    print(f"\n{account.summary()}")


if __name__ == "__main__":
    main()
