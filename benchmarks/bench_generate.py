"""End-to-end greedy generation: dsv2's `generate` vs transformers' `model.generate` on one random checkpoint.

    python benchmarks/bench_generate.py [--dtypes float32 bfloat16] [--quick]

One random mid-size checkpoint (V2-Lite's layout at hidden 1024, 8 layers, 32 routed experts of width 352, 4 per
token, 2 shared, kv_lora_rank 256, vocab 32000: ~359M parameters, ~114M active per token) is written once in float32
and loaded by both implementations in each measured dtype (transformers' weights are copied out of the memory-mapped
checkpoint, as dsv2's are, so that neither reads weights through page faults). transformers runs with the experts and
attention implementations that were fastest on a small input at start-up. Measured in this one run, on 2 threads,
the two implementations' calls interleaved:

* prefill: wall time of a generate call with max_new_tokens=1 on a 512-token prompt (time to first token);
* decode: batch-1 ms per step after a 32 / 1024 / 2048-token prompt: in a generate call, the time from the first
  new token to the last over the steps between them, both taken where the call hands its tokens to a streamer
  (transformers' protocol, which both generate functions take: the same clock for both, sampling included; dsv2's
  greedy steps run several to a kernel call and reach the streamer together, so only whole calls are timed), in
  rounds of one generate call each, the order alternating from round to round: the median of the rounds, and the
  median of the rounds' ratios (each round's two calls back to back, so that this machine's speed drifts, up to 2×
  within minutes, hit both alike). The 5× goal needs both;
* memory: in a fresh subprocess per implementation, peak RSS (VmHWM) of loading above the RSS before it, and of a
  generate call at the longest context above the loaded model's RSS; KV-cache bytes per token (transformers': its
  DynamicCache summed after a prefill);
* physical limits: read bandwidth (the fastest of a sum over 1 GiB in 4 KiB pages, the same on huge pages, and a
  float32 batch-1 linear over it), batch-1 linear throughput and matmul FLOP/s in each dtype, measured before and
  after each dtype's runs (the best counts); each implementation's decode step as a fraction of the bandwidth bound
  (active weights, one embedding row and the full head, plus the cache, read once) and its prefill as a fraction of
  the matmul bound (see `prefill_flops`), next to the project's goals. The decode goal is judged per round: right
  after each decode round at the shortest context the sum on huge pages is timed again, and the round's step is
  set against that bandwidth (the median over rounds counts); this machine's bandwidth drifts by ±20% within
  minutes, so a step set against the best bandwidth of the whole run is shown too.

``--quick``: contexts 32 and 1024 only, fewer repeats and steps (a smoke run).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from pathlib import Path

import torch

from dsv2 import DeepseekV2ForCausalLM, ModelConfig
from dsv2.generate import generate as dsv2_generate
from dsv2.info import ModelSummary, summarize
from dsv2.malloc import zeros_on_huge_pages

THREADS = 2
PREFILL_TOKENS = 512
DECODE_GOAL = 0.70  # ours, decode at the shortest context, as a fraction of the bandwidth bound
SPEEDUP_GOAL = 5.0  # transformers' / ours decode step at 2,048 tokens
PREFILL_GOAL = 0.40  # ours, prefill as a fraction of the matmul peak

SHORT_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}

GenerateFn = Callable[..., torch.Tensor]  # (input_ids [1, T], new tokens, streamer=None) → ids


@dataclass
class Settings:
    contexts: tuple[int, ...]
    prefill_repeats: int  # timed prefill calls (median), after one warm-up
    decode_tokens: int  # new tokens per decode generate call
    decode_calls: int  # rounds per context: a generate call of each implementation
    memory_tokens: int = 8  # new tokens of the memory probe's generate call


@dataclass
class Result:
    """One implementation's measurements in one dtype (seconds, bytes)."""

    prefill_s: float = 0.0
    decode_s: dict[int, float] = field(default_factory=dict)  # context → median of the rounds' seconds per step
    decode_rounds_s: dict[int, list[float]] = field(default_factory=dict)  # context → each round's seconds per step
    round_bandwidth: list[float] = field(default_factory=list)  # bytes/s read right after each shortest-context round
    cache_bytes_per_token: int = 0
    load_peak: int = 0  # VmHWM above the pre-load RSS while loading
    generate_peak: int = 0  # VmHWM above the loaded model's RSS during a generate at the longest context


@dataclass
class Limits:
    bandwidth: float  # bytes/s read: the best way found to stream a 1 GiB float32 tensor
    sum_rate: float  # bytes/s of a sum over it
    huge_sum_rate: float  # bytes/s of a sum over one on huge pages (where dsv2 keeps its weights)
    matvec: float  # weight bytes/s of a batch-1 linear in the dtype
    matmul: float  # FLOP/s of the best large matmul in the dtype


# ------------------------------------------------------------------------------------------------ the checkpoint
def bench_config() -> ModelConfig:
    return ModelConfig.preset("v2-lite").replace(
        hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, kv_lora_rank=256, qk_rope_head_dim=32,
        qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=2,
        moe_intermediate_size=352, intermediate_size=2816, vocab_size=32000, first_k_dense_replace=1,
        bos_token_id=0, eos_token_id=1)


def active_weight_params(config: ModelConfig, summary: ModelSummary) -> int:
    """Parameters a decode step reads: the activated ones, with one row of the embedding instead of the table."""
    return summary.activated_params - summary.embedding_params + config.hidden_size


def prefill_flops(config: ModelConfig, summary: ModelSummary, tokens: int) -> float:
    """Matmul FLOPs a prefill needs: 2·params·tokens for every activated matrix but the embedding lookup and the
    output head (both implementations compute logits for the last prompt token only), 2·head params for that token,
    and causal attention (QKᵀ and PV over the expanded heads, half of the T² scores)."""
    head = config.vocab_size * config.hidden_size
    body = summary.activated_params - summary.embedding_params - head
    attention = config.num_hidden_layers * config.num_attention_heads * tokens**2 * (
        config.qk_head_dim + config.v_head_dim)
    return 2 * body * tokens + 2 * head + attention


def write_checkpoint(config: ModelConfig, path: str) -> None:
    model = DeepseekV2ForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)


def load_ours(path: str, dtype: torch.dtype) -> DeepseekV2ForCausalLM:
    return DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype, progress=False).eval()


def load_theirs(path: str, dtype: torch.dtype, experts: str | None = None, attn: str | None = None,
                private_weights: bool = False):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if private_weights:  # weights loaded without a dtype change stay memory-mapped from the checkpoint's files
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.clone()
    if experts is not None:
        model.set_experts_implementation(experts)
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


def ours_generate(model: DeepseekV2ForCausalLM) -> GenerateFn:
    return lambda ids, n, streamer=None: dsv2_generate(model, ids, max_new_tokens=n, ignore_eos=True,
                                                       streamer=streamer)


def theirs_generate(model) -> GenerateFn:
    def run(ids: torch.Tensor, n: int, streamer=None) -> torch.Tensor:
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=model.config.eos_token_id, streamer=streamer)

    return run


def prompt(config: ModelConfig, tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, config.vocab_size, (1, tokens), generator=generator)  # no BOS / EOS ids


# ------------------------------------------------------------------------------------------------------- timing
def call_seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_wall(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(call_seconds(fn, repeats))


class TimingStreamer:
    """A streamer (transformers' protocol) that records when each step's tokens arrive; the prompt's put is not one."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.stamps.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


@dataclass
class Impl:
    name: str
    model: torch.nn.Module
    generate: GenerateFn
    result: Result = field(default_factory=Result)


def decode_step_s(impl: Impl, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """One generate call → (seconds per step from the first new token to the last, the ids)."""
    streamer = TimingStreamer()
    out = impl.generate(ids, new_tokens, streamer=streamer)
    if len(streamer.stamps) != new_tokens:
        raise RuntimeError(f"{impl.name}: expected {new_tokens} tokens streamed, saw {len(streamer.stamps)}")
    return (streamer.stamps[-1] - streamer.stamps[0]) / (new_tokens - 1), out


def measure_speed(impls: list[Impl], config: ModelConfig, settings: Settings) -> int:
    """Prefill and decode times of every implementation, calls interleaved so that drifts in the machine's speed
    hit both alike. → how many greedy tokens all implementations agree on before the first difference, at the
    shortest context (random weights leave near-ties that low precision can flip)."""
    for impl in impls:
        impl.generate(prompt(config, 16), 4)  # warm-up: kernels, allocator
    ids = prompt(config, PREFILL_TOKENS)
    prefill: dict[str, list[float]] = {impl.name: [] for impl in impls}
    for repeat in range(settings.prefill_repeats + 1):
        for impl in impls:
            start = time.perf_counter()
            impl.generate(ids, 1)
            if repeat:  # the first round is a warm-up at this length
                prefill[impl.name].append(time.perf_counter() - start)
    for impl in impls:
        impl.result.prefill_s = statistics.median(prefill[impl.name])
    outputs: dict[str, torch.Tensor] = {}
    for context in settings.contexts:
        ids = prompt(config, context, seed=context)
        for impl in impls:
            impl.result.decode_rounds_s[context] = []
        for round_ in range(settings.decode_calls):
            for impl in impls if round_ % 2 == 0 else impls[::-1]:
                step_s, out = decode_step_s(impl, ids, settings.decode_tokens)
                impl.result.decode_rounds_s[context].append(step_s)
                outputs.setdefault(impl.name, out[0, ids.shape[1]:])
                if context == min(settings.contexts):  # the bandwidth of the moment, for this round's bound
                    impl.result.round_bandwidth.append(huge_page_sum_rate(repeats=3))
        for impl in impls:
            impl.result.decode_s[context] = statistics.median(impl.result.decode_rounds_s[context])
    first, *rest = outputs.values()
    same = torch.stack([first == other for other in rest]).all(dim=0).tolist() if rest else [True] * len(first)
    return [*same, False].index(False)


def candidate_seconds(generate: GenerateFn, ids: torch.Tensor, best: float) -> float:
    """Median of 3 short generate calls after a warm-up; just the warm-up when that is already 3× the best."""
    start = time.perf_counter()
    generate(ids, 8)
    warm_up = time.perf_counter() - start
    return warm_up if warm_up > 3 * best else median_wall(lambda: generate(ids, 8), 3)


def fastest_theirs(model, config: ModelConfig) -> tuple[str, str, dict[str, float | None]]:
    """Pick transformers' fastest experts implementation (with sdpa), then attention implementation, on a 64-token
    prompt + 8 new tokens. → (experts, attention, seconds per candidate; None: it does not run here)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ids, generate = prompt(config, 64, seed=1), theirs_generate(model)
    timings: dict[str, float | None] = {}

    def pick(candidates: list[str], apply: Callable[[str], None], label: str) -> str:
        best, best_name = float("inf"), candidates[0]
        for name in candidates:
            try:
                apply(name)
                seconds = candidate_seconds(generate, ids, best)
            except Exception:  # CUDA-only kernels, missing packages
                timings[f"{label}={name}"] = None
                continue
            timings[f"{label}={name}"] = seconds
            if seconds < best:
                best, best_name = seconds, name
        apply(best_name)
        return best_name

    model.set_attn_implementation("sdpa")
    experts = pick(["eager", *ALL_EXPERTS_FUNCTIONS.keys()], model.set_experts_implementation, "experts")
    attn = pick(["sdpa", "eager"], model.set_attn_implementation, "attn")
    return experts, attn, timings


def theirs_cache_bytes_per_token(model, config: ModelConfig, tokens: int = 64) -> int:
    """Bytes of every tensor in transformers' cache after a prefill of `tokens` tokens, per token."""
    cache = model(prompt(config, tokens), use_cache=True).cache
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total // tokens


def ours_cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """dsv2's LatentCache: (kv_lora_rank + qk_rope_head_dim) values per layer per token."""
    return (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * dtype.itemsize


# ------------------------------------------------------------------------------------------------------- memory
def status_bytes(field_name: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field_name}:"))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def measure_memory(path: str, impl: str, dtype_name: str, context: int, new_tokens: int, experts: str | None = None,
                   attn: str | None = None) -> dict[str, int]:
    """Runs in a fresh process: peak RSS growth of loading `impl`, and of one generate call after loading."""
    torch.set_num_threads(THREADS)
    import transformers  # noqa: F401  (imported before the baseline RSS by both, so neither pays for it)

    dtype = getattr(torch, dtype_name)
    config = bench_config()
    ids = prompt(config, context)
    before = status_bytes("VmRSS")
    if impl == "dsv2":
        model = load_ours(path, dtype)
        generate = ours_generate(model)
    else:
        model = load_theirs(path, dtype, experts, attn)
        generate = theirs_generate(model)
    loaded, load_peak = status_bytes("VmRSS"), status_bytes("VmHWM")
    if not reset_peak_rss():
        raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs): the generate peak would include the load")
    with torch.no_grad():
        generate(ids, new_tokens)
    return {"load_peak": load_peak - before, "generate_peak": status_bytes("VmHWM") - loaded}


def memory_in_subprocess(path: str, impl: str, dtype_name: str, context: int, new_tokens: int,
                         experts: str | None, attn: str | None) -> dict[str, int]:
    here = str(Path(__file__).resolve().parent)
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import bench_generate as b; "
            f"print(json.dumps(b.measure_memory({path!r}, {impl!r}, {dtype_name!r}, {context}, {new_tokens}, "
            f"{experts!r}, {attn!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- physical limits
def best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    return min(call_seconds(fn, repeats))


def read_bandwidth() -> tuple[float, float, float]:
    """Bytes/s reading a 1 GiB float32 tensor, best of several: (a sum over it, the same on huge pages, a batch-1
    linear with it)."""
    x = torch.ones(2**28)
    sum_rate = x.nbytes / best_seconds(x.sum)
    return sum_rate, huge_page_sum_rate(), matvec_bandwidth(torch.float32, x.view(2**14, 2**14))


@functools.cache
def huge_page_gib() -> torch.Tensor:
    """1 GiB of float32 ones on huge pages (`dsv2.malloc.zeros_on_huge_pages`), kept for the run."""
    return zeros_on_huge_pages((2**28,), torch.float32).fill_(1.0)


def huge_page_sum_rate(repeats: int = 5) -> float:
    """Bytes/s of a sum over `huge_page_gib`, the best of `repeats`."""
    x = huge_page_gib()
    return x.nbytes / best_seconds(x.sum, repeats)


def matvec_bandwidth(dtype: torch.dtype, weight: torch.Tensor | None = None) -> float:
    """Weight bytes/s of a batch-1 linear (what decode does) with a 16384 × 16384 matrix in `dtype`."""
    weight = torch.ones(2**14, 2**14, dtype=dtype) if weight is None else weight
    x = torch.ones(1, weight.shape[1], dtype=dtype)
    return weight.nbytes / best_seconds(lambda: torch.nn.functional.linear(x, weight))


def matmul_flops(dtype: torch.dtype, config: ModelConfig) -> float:
    """FLOP/s of the best of a 2048³ matmul and the prefill's dense-FFN shape, in `dtype`, best of 10 each."""
    shapes = [(2048, 2048, 2048), (PREFILL_TOKENS, config.hidden_size, config.intermediate_size)]
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        best = max(best, 2 * m * k * n / best_seconds(lambda a=a, b=b: a @ b, repeats=10))
    return best


def measure_limits(dtype: torch.dtype, config: ModelConfig) -> Limits:
    sum_rate, huge_sum_rate, linear_rate = read_bandwidth()
    return Limits(bandwidth=max(sum_rate, huge_sum_rate, linear_rate), sum_rate=sum_rate, huge_sum_rate=huge_sum_rate,
                  matvec=matvec_bandwidth(dtype), matmul=matmul_flops(dtype, config))


def best_limits(a: Limits, b: Limits) -> Limits:
    """Field-wise best of two measurements (taken before and after a dtype's runs: this machine's speed drifts)."""
    return Limits(*(max(x, y) for x, y in zip(astuple(a), astuple(b), strict=True)))


class CpuAccount:
    """Wall time since construction, and the CPU seconds that other processes used and that the hypervisor stole
    meanwhile (/proc/stat)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.start = self.snapshot()

    @staticmethod
    def snapshot() -> tuple[float, float, float]:
        """(all busy CPU seconds, stolen seconds, this process's and its waited-for children's CPU seconds)."""
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
        tick = os.sysconf("SC_CLK_TCK")
        own = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for field in ("ru_utime", "ru_stime"))
        return (user + nice + system + irq + softirq) / tick, steal / tick, own

    def summary(self) -> str:
        """The run's closing line: its wall time and what the rest of the machine did meanwhile."""
        seconds = time.perf_counter() - self.started
        busy, steal, own = (end - start for start, end in zip(self.start, self.snapshot(), strict=True))
        other = max(busy - own, 0.0)
        warning = ""
        if other + steal > 0.05 * seconds * (os.cpu_count() or 1):
            warning = " — more than 5% of the machine went elsewhere: rerun on a quiet machine"
        return (f"(total {seconds:.0f} s; during the run other processes used {other:.0f} CPU-s, the hypervisor "
                f"stole {steal:.0f} CPU-s{warning})")


def describe_checkpoint(config: ModelConfig) -> str:
    """One line on the mid-size checkpoint and the software measured."""
    import transformers

    summary = summarize(config)
    return (f"mid-size checkpoint: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.n_routed_experts} routed experts × {config.moe_intermediate_size} "
            f"({config.num_experts_per_tok} per token) + {config.n_shared_experts} shared, kv_lora_rank "
            f"{config.kv_lora_rank}, vocab {config.vocab_size}: {summary.total_params / 1e6:.1f}M parameters, "
            f"{(summary.activated_params - summary.embedding_params) / 1e6:.1f}M active per token (without the "
            f"input embedding); {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
            f"{transformers.__version__}")


# ------------------------------------------------------------------------------------------------------- report
def ratio(theirs: float, ours: float) -> str:
    return f"{theirs / ours:.2f}×" if ours else "n/a"


def number(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,.1f}"


def table_rows(dtype_name: str, theirs: Result, ours: Result, contexts: tuple[int, ...]) -> list[str]:
    rows = [("prefill, 512-token prompt (time to first token), ms", theirs.prefill_s * 1e3, ours.prefill_s * 1e3)]
    rows += [(f"decode, batch 1, context {c}, ms/step", theirs.decode_s[c] * 1e3, ours.decode_s[c] * 1e3)
             for c in contexts]
    rows += [
        ("peak RSS growth while loading, MB", theirs.load_peak / 1e6, ours.load_peak / 1e6),
        (f"peak RSS growth of a generate at context {max(contexts)}, MB", theirs.generate_peak / 1e6,
         ours.generate_peak / 1e6),
        ("KV cache, bytes per token", theirs.cache_bytes_per_token, ours.cache_bytes_per_token),
    ]
    short = SHORT_DTYPE_NAMES[dtype_name]
    return [f"| {what} | {short} | {number(t)} | {number(o)} | {ratio(t, o)} |" for what, t, o in rows]


def mark(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def decode_fraction(result: Result, weight_bytes: int, context: int, bytes_per_s: float) -> float:
    """Bound time of a decode step (active weights + cache read once at `bytes_per_s`) / measured step time."""
    step_bytes = weight_bytes + context * result.cache_bytes_per_token
    return step_bytes / bytes_per_s / result.decode_s[context]


def paired_decode_fraction(result: Result, weight_bytes: int, context: int) -> float:
    """The median over the rounds at `context` of each round's bound (at the bandwidth measured right after it) /
    its median step time."""
    step_bytes = weight_bytes + context * result.cache_bytes_per_token
    return statistics.median(step_bytes / rate / seconds for rate, seconds
                             in zip(result.round_bandwidth, result.decode_rounds_s[context], strict=True))


def limit_lines(dtype_name: str, config: ModelConfig, summary: ModelSummary, limits: Limits, theirs: Result,
                ours: Result, contexts: tuple[int, ...]) -> list[str]:
    dtype = getattr(torch, dtype_name)
    short = min(contexts)
    weight_bytes = active_weight_params(config, summary) * dtype.itemsize
    step_bytes = weight_bytes + short * ours.cache_bytes_per_token
    decode_ours = decode_fraction(ours, weight_bytes, short, limits.bandwidth)
    paired_ours = paired_decode_fraction(ours, weight_bytes, short)
    rates = ours.round_bandwidth + theirs.round_bandwidth
    flops = prefill_flops(config, summary, PREFILL_TOKENS)
    prefill_bound = flops / limits.matmul
    prefill_ours = prefill_bound / ours.prefill_s
    lines = [
        f"{dtype_name}: read bandwidth {limits.bandwidth / 1e9:.1f} GB/s (best of a sum over 1 GiB, "
        f"{limits.sum_rate / 1e9:.1f} GB/s, the same on huge pages, {limits.huge_sum_rate / 1e9:.1f} GB/s, and a "
        f"float32 batch-1 linear over it); after the decode rounds {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f} GB/s; "
        f"a batch-1 linear streams {limits.matvec / 1e9:.1f} GB/s of {dtype_name} weights; matmul peak "
        f"{limits.matmul / 1e9:.0f} GFLOP/s",
        f"  decode at context {short}: {step_bytes / 1e6:.1f} MB read per step (active weights "
        f"{weight_bytes / 1e6:.1f} MB + cache); against the bandwidth right after each round dsv2 {paired_ours:.0%}, "
        f"transformers {paired_decode_fraction(theirs, weight_bytes, short):.0%} of the bound (median of the "
        f"rounds); against the best of the run ({step_bytes / limits.bandwidth * 1e3:.2f} ms) dsv2 {decode_ours:.0%}, "
        f"transformers {decode_fraction(theirs, weight_bytes, short, limits.bandwidth):.0%}",
        f"  prefill of {PREFILL_TOKENS} tokens: {flops / 1e9:.1f} GFLOP → bound {prefill_bound * 1e3:.1f} ms; "
        f"dsv2 {prefill_ours:.0%}, transformers {prefill_bound / theirs.prefill_s:.0%} of the matmul peak",
        f"  goal: dsv2 decode ≥ {DECODE_GOAL:.0%} of the bandwidth bound at short context: {paired_ours:.0%} "
        f"{mark(paired_ours >= DECODE_GOAL)} (against the run's best bandwidth: {decode_ours:.0%})",
        "  dsv2's rounds at context {}: {}".format(short, ", ".join(
            f"{seconds * 1e3:.2f} ms at {rate / 1e9:.0f} GB/s = {step_bytes / rate / seconds:.0%}"
            for seconds, rate in zip(ours.decode_rounds_s[short], ours.round_bandwidth, strict=True))),
    ]
    goal = f"  goal: dsv2 decode step ≥ {SPEEDUP_GOAL:.0f}× faster than transformers' at 2,048 tokens: "
    if 2048 in contexts:
        speedup = theirs.decode_s[2048] / ours.decode_s[2048]
        per_round = statistics.median(t / o for t, o in zip(theirs.decode_rounds_s[2048], ours.decode_rounds_s[2048],
                                                            strict=True))
        lines.append(f"{goal}{speedup:.2f}× (median of the rounds' ratios {per_round:.2f}×) "
                     f"{mark(min(speedup, per_round) >= SPEEDUP_GOAL)}")
    else:
        lines.append(f"{goal}not measured (context 2048 not run)")
    lines.append(f"  goal: dsv2 prefill ≥ {PREFILL_GOAL:.0%} of the matmul peak: {prefill_ours:.0%} "
                 f"{mark(prefill_ours >= PREFILL_GOAL)}")
    return lines


# --------------------------------------------------------------------------------------------------------- main
def speed_and_cache(path: str, dtype: torch.dtype, config: ModelConfig,
                    settings: Settings) -> tuple[Result, Result, str, str]:
    """Both implementations loaded in this process. → (theirs, ours, transformers' experts and attention impls)."""
    theirs_model = load_theirs(path, dtype, private_weights=True)
    experts, attn, timings = fastest_theirs(theirs_model, config)
    tried = ", ".join(f"{name} {t * 1e3:.0f} ms" if t is not None else f"{name} does not run"
                      for name, t in timings.items())
    name = str(dtype).removeprefix("torch.")
    print(f"{name}: transformers runs with experts_implementation={experts!r}, attn_implementation={attn!r} "
          f"(a 64-token prompt + 8 new tokens: {tried})", flush=True)
    ours_model = load_ours(path, dtype)
    theirs = Impl("transformers", theirs_model, theirs_generate(theirs_model))
    ours = Impl("dsv2", ours_model, ours_generate(ours_model))
    agree = measure_speed([theirs, ours], config, settings)
    print(f"{name}: the two generate the same first {agree} of {settings.decode_tokens} greedy tokens at context "
          f"{min(settings.contexts)}", flush=True)
    theirs.result.cache_bytes_per_token = theirs_cache_bytes_per_token(theirs_model, config)
    ours.result.cache_bytes_per_token = ours_cache_bytes_per_token(config, dtype)
    return theirs.result, ours.result, experts, attn


def run_dtype(path: str, dtype_name: str, config: ModelConfig, settings: Settings) -> tuple[Result, Result]:
    """Both implementations in one dtype: speed in this process, memory in fresh subprocesses. → (theirs, ours)."""
    theirs, ours, experts, attn = speed_and_cache(path, getattr(torch, dtype_name), config, settings)
    for result, impl in ((theirs, "transformers"), (ours, "dsv2")):
        memory = memory_in_subprocess(path, impl, dtype_name, max(settings.contexts), settings.memory_tokens,
                                      experts, attn)
        result.load_peak, result.generate_peak = memory["load_peak"], memory["generate_peak"]
    return theirs, ours


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="contexts 32 and 1024 only, fewer repeats")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    settings = (Settings(contexts=(32, 1024), prefill_repeats=1, decode_tokens=6, decode_calls=1) if args.quick
                else Settings(contexts=(32, 1024, 2048), prefill_repeats=5, decode_tokens=32, decode_calls=6))
    config = bench_config()
    summary = summarize(config)
    account = CpuAccount()
    print(describe_checkpoint(config), flush=True)
    rows, lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(config, tmp)
        for dtype_name in args.dtypes:
            before = measure_limits(getattr(torch, dtype_name), config)
            theirs, ours = run_dtype(tmp, dtype_name, config, settings)
            limits = best_limits(before, measure_limits(getattr(torch, dtype_name), config))
            rows += table_rows(dtype_name, theirs, ours, settings.contexts)
            lines += limit_lines(dtype_name, config, summary, limits, theirs, ours, settings.contexts)
    print()
    print("| measurement | dtype | transformers | dsv2 | ratio (transformers / dsv2) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("\n".join(lines))
    print(f"\n{account.summary()}")


if __name__ == "__main__":
    main()
