"""dsv2 vs transformers' native DeepseekV2ForCausalLM on one CUDA GPU, the same random weights, in one process run.

    python benchmarks/bench_cuda.py [--layers 4] [--dtype bfloat16] [--requests 256] [--quick]

The checkpoint: V2-Lite's widths (hidden 2048, 16 heads, kv_lora_rank 512, rope 64 / nope 128 / v 128, 64 routed
experts of width 1408, 6 per token, 2 shared, vocabulary 102,400) with ``--layers`` decoder layers (the first dense),
random weights made on the GPU, written once and loaded by both. transformers runs with its fastest experts
implementation for each workload (each candidate timed on a short run of that workload first), attention sdpa.

(a) batch-1 decode: ms per step after a 32- and a 2,048-token prompt, from `generate` calls with a streamer (the
    time from the first new token to the last over the steps between them; both functions take transformers'
    streamer protocol), the median of 3 calls each; and the step against the bandwidth bound: (active weight bytes,
    one embedding row, the whole head, plus the cache the step reads) ÷ the device's measured copy bandwidth.
    dsv2's steps replay a recorded CUDA graph (`dsv2.model.cuda_graph`); the same calls without graphs are shown.
(b) prefill: a generate call with one new token on a 2,048-token prompt, and its matmul FLOPs
    (`bench_generate.prefill_flops`) as a fraction of the measured dense matmul rate in that dtype.
(c) offline throughput: ``--requests`` requests of 128 random prompt tokens and 128 greedy new tokens each (EOS
    ignored): dsv2's engine (`LLM.generate`, one call, after a warm-up call) vs transformers' `generate` on batches
    of 64 (the prompts are equally long: no padding); output tokens per second.
(d) the absorbed attention alone (one latent head shared by the 16 query heads, head size 576, each row masked to
    its own length as in the engine's steps): torch's fused attention vs `latent_matmul_attention`, batches of 1 to
    64 over 256 rows and over the longest context of (a).
(e) dsv2 alone at V2-Lite's full depth (27 layers, random weights made on the GPU): batch-1 decode without and with
    CUDA graphs.

``--quick``: a small model (hidden 256, 4 heads, 16 routed experts, vocabulary 4,096; ``--layers`` layers), contexts
32 and 256, at most 16 requests, no (e): a smoke run that also runs on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv2 import LLM, DeepseekV2ForCausalLM, ModelConfig, SamplingParams
from dsv2.generate import generate as dsv2_generate
from dsv2.info import summarize
from dsv2.model.attention import latent_matmul_attention

from bench_generate import TimingStreamer, active_weight_params, prefill_flops

PROMPT_TOKENS = 128
NEW_TOKENS = 128
HF_BATCH = 64


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall seconds of `repeats` calls after a warm-up, the device drained around each."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, gib: float) -> float:
    """Bytes moved per second (read + written) by a device-to-device copy of `gib` GiB."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / seconds(lambda: dst.copy_(src), repeats=5)


def matmul_rate(dtype: torch.dtype, device: torch.device, n: int) -> float:
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    return 2 * n**3 / seconds(lambda: a @ b, repeats=5)


def model_config(layers: int, quick: bool) -> ModelConfig:
    config = ModelConfig.preset("v2-lite").replace(num_hidden_layers=layers, bos_token_id=0, eos_token_id=1)
    if quick:
        config = config.replace(hidden_size=256, num_attention_heads=4, kv_lora_rank=128, moe_intermediate_size=128,
                                intermediate_size=512, n_routed_experts=16, vocab_size=4096)
    return config


def prompts(config: ModelConfig, count: int, tokens: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, config.vocab_size, (count, tokens), generator=generator).to(device)  # no BOS / EOS ids


def theirs_generate(model, ids: torch.Tensor, new_tokens: int, streamer=None) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=streamer)


def ours_generate(model, ids: torch.Tensor, new_tokens: int, streamer=None) -> torch.Tensor:
    return dsv2_generate(model, ids, max_new_tokens=new_tokens, ignore_eos=True, streamer=streamer)


def step_ms(generate: Callable[..., torch.Tensor], model, ids: torch.Tensor, new_tokens: int) -> float:
    """Median over 3 calls (after a warm-up) of ms per decode step between the first and the last new token."""
    steps = []
    for call in range(4):
        streamer = TimingStreamer()
        generate(model, ids, new_tokens, streamer=streamer)
        if call:
            steps.append((streamer.stamps[-1] - streamer.stamps[0]) / (new_tokens - 1) * 1e3)
    return statistics.median(steps)


def use_fastest_experts(model, run: Callable[[], object]) -> str:
    """Time `run` under each of transformers' experts implementations that works here (batched_mm gathers every
    token's expert weights: it runs out of memory on long prompts); keep the fastest."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    best, best_name = float("inf"), "eager"
    for name in ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]:
        try:
            model.set_experts_implementation(name)
            took = seconds(run, repeats=1)
        except Exception:  # kernels this build lacks
            continue
        if took < best:
            best, best_name = took, name
    model.set_experts_implementation(best_name)
    return best_name


def attention_seconds(config: ModelConfig, batch_size: int, keys: int, dtype: torch.dtype,
                      device: torch.device) -> tuple[float, float]:
    """The absorbed attention of batch_size × n_h query rows over `keys` latent rows: (torch's fused attention,
    `latent_matmul_attention`) in seconds."""
    n_h = config.num_attention_heads
    q = torch.randn(batch_size, n_h, config.latent_dim, dtype=dtype, device=device)
    latent = torch.randn(batch_size, keys, config.latent_dim, dtype=dtype, device=device)
    lengths = torch.randint(keys // 2, keys + 1, (batch_size, 1, 1, 1), device=device)  # each row's own length
    mask = (torch.arange(keys, device=device) < lengths).expand(batch_size, 1, n_h, keys)  # as the engine's steps
    fused = seconds(lambda: F.scaled_dot_product_attention(q[:, None], latent[:, None], latent[:, None],
                                                           attn_mask=mask), repeats=20)
    matmul = seconds(lambda: latent_matmul_attention(q, latent, mask, 1.0, config.kv_lora_rank), repeats=20)
    return fused, matmul


def full_depth_row(dtype: torch.dtype, device: torch.device, bandwidth: float) -> str:
    """dsv2 alone at V2-Lite's own depth (27 layers, 15.7B parameters, random): batch-1 decode after 32 tokens,
    without and with CUDA graphs."""
    full = ModelConfig.preset("v2-lite").replace(bos_token_id=0, eos_token_id=1)
    model = DeepseekV2ForCausalLM.from_config(full, dtype=dtype, device=device).eval()
    ids = prompts(full, 1, 32, device)
    model.use_cuda_graphs = False
    eager = step_ms(ours_generate, model, ids, 32)
    model.use_cuda_graphs = True
    graphed = step_ms(ours_generate, model, ids, 32)
    bound_ms = active_weight_params(full, summarize(full)) * dtype.itemsize / bandwidth * 1e3
    return (f"| (e) V2-Lite's depth (27 layers), batch-1 decode step after 32 tokens, ms: dsv2 without CUDA graphs "
            f"(baseline column) vs with | {eager:.2f} | {graphed:.2f} | {ratio(eager, graphed)} | "
            f"{bound_ms / graphed:.0%} of the bandwidth bound ({bound_ms:.2f}) |")


def ratio(theirs: float, ours: float) -> str:
    return f"{theirs / ours:.2f}×"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (the first is dense)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--requests", type=int, default=256, help="requests of the throughput run (c)")
    parser.add_argument("--quick", action="store_true", help="a small model and workload: a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    started = time.perf_counter()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    config = model_config(args.layers, args.quick)
    summary = summarize(config)
    contexts = (32, 256) if args.quick else (32, 2048)
    prefill_tokens = 256 if args.quick else 2048
    requests = min(args.requests, 16) if args.quick else args.requests
    with tempfile.TemporaryDirectory() as tmp:
        DeepseekV2ForCausalLM.from_config(config, dtype=dtype, device=device).save_pretrained(tmp)
        theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
        theirs.set_attn_implementation("sdpa")
        llm = LLM(model=tmp, dtype=dtype, device=device, kv_cache_memory=8 * 2**30 if device.type == "cuda" else None,
                  max_num_seqs=requests)
    ours = llm.model
    bandwidth = copy_bandwidth(device, 0.25 if args.quick else 4)
    peak = matmul_rate(dtype, device, 1024 if args.quick else 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}: copy {bandwidth / 1e12:.2f} TB/s, {args.dtype} matmul {peak / 1e12:.0f} TFLOP/s; torch "
          f"{torch.__version__}, transformers {transformers.__version__}")
    print(f"model: V2-Lite widths, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.n_routed_experts} routed experts top-{config.num_experts_per_tok}, vocabulary {config.vocab_size}: "
          f"{summary.total_params / 1e9:.2f}B parameters, {summary.activated_params / 1e9:.2f}B active, {args.dtype}")

    rows = ["| measurement | transformers | dsv2 | dsv2 speed-up | dsv2 vs bound |", "|---|---|---|---|---|"]
    longest = prompts(config, 1, contexts[-1], device, seed=5)
    experts = use_fastest_experts(theirs, lambda: theirs_generate(theirs, longest, 16))
    weight_bytes = active_weight_params(config, summary) * dtype.itemsize
    eager_rows = []
    for context in contexts:
        ids = prompts(config, 1, context, device, seed=context)
        t_theirs = step_ms(theirs_generate, theirs, ids, 32)
        t_ours = step_ms(ours_generate, ours, ids, 32)
        ours.use_cuda_graphs = False
        t_eager = step_ms(ours_generate, ours, ids, 32)
        ours.use_cuda_graphs = True
        cache_bytes = (context + 16) * config.num_hidden_layers * config.latent_dim * dtype.itemsize
        bound_ms = (weight_bytes + cache_bytes) / bandwidth * 1e3
        rows.append(f"| (a) batch-1 decode step after {context} tokens, ms | {t_theirs:.2f} | {t_ours:.2f} | "
                    f"{ratio(t_theirs, t_ours)} | {bound_ms / t_ours:.0%} of the bandwidth bound ({bound_ms:.2f}) |")
        eager_rows.append(f"| (a) dsv2 without CUDA graphs (baseline column) after {context} tokens, ms | "
                          f"{t_eager:.2f} | {t_ours:.2f} | {ratio(t_eager, t_ours)} | |")
    rows += eager_rows
    for batch_size in (1, 4, 16, 64):
        for keys in sorted({256, contexts[-1]}):
            t_fused, t_matmul = attention_seconds(config, batch_size, keys, dtype, device)
            rows.append(f"| (d) absorbed attention of {batch_size} × {config.num_attention_heads} queries over "
                        f"{keys} latent rows (masked), µs: torch's fused attention (baseline column) vs two matmuls | "
                        f"{t_fused * 1e6:.0f} | {t_matmul * 1e6:.0f} | {ratio(t_fused, t_matmul)} | |")
    ids = prompts(config, 1, prefill_tokens, device, seed=1)
    t_theirs = seconds(lambda: theirs_generate(theirs, ids, 1))
    t_ours = seconds(lambda: ours_generate(ours, ids, 1))
    flops = prefill_flops(config, summary, prefill_tokens)
    rows.append(f"| (b) prefill of {prefill_tokens} tokens, ms | {t_theirs * 1e3:.1f} | {t_ours * 1e3:.1f} | "
                f"{ratio(t_theirs, t_ours)} | {flops / t_ours / peak:.0%} of the matmul peak |")

    batch = prompts(config, min(HF_BATCH, requests), PROMPT_TOKENS, device, seed=2)
    batched_experts = use_fastest_experts(theirs, lambda: theirs_generate(theirs, batch, 8))
    hf_batches = 1 if args.quick else 2
    t_theirs = seconds(lambda: [theirs_generate(theirs, batch, NEW_TOKENS) for _ in range(hf_batches)], repeats=1)
    theirs_rate = hf_batches * batch.shape[0] * NEW_TOKENS / t_theirs
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts(config, 8, PROMPT_TOKENS, device, seed=3).tolist(), sampling_params=greedy,
                 use_tqdm=False)  # warm-up
    work = prompts(config, requests, PROMPT_TOKENS, device, seed=4).tolist()
    sync()
    start = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=work, sampling_params=greedy, use_tqdm=False)
    sync()
    ours_rate = sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)
    rows.append(f"| (c) {requests} requests × ({PROMPT_TOKENS} + {NEW_TOKENS}) tokens, output tokens/s (transformers: "
                f"batches of {batch.shape[0]}) | {theirs_rate:.0f} | {ours_rate:.0f} | {ours_rate / theirs_rate:.2f}× "
                "| |")
    if not args.quick:
        del llm, ours, theirs
        rows.append(full_depth_row(dtype, device, bandwidth))
    print(f"transformers' experts implementation: {experts!r} at batch 1, {batched_experts!r} batched")
    print("\n".join(rows))
    if device.type == "cuda":
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
