"""dsv2 vs transformers' native DeepseekV2ForCausalLM on the same weights, in one process run.

    python benchmarks/model_speed.py [--layers 2] [--context 2048] [--dtype bfloat16] [--device cpu]

A V2-Lite-shaped model (hidden 2048, 16 heads, kv_lora_rank 512, 64 routed experts of width 1408, 6 per token) with
fewer layers and a 32K vocabulary, random weights. Measures a prefill, and single-sequence decode steps after
`--context` tokens: transformers caches the latent too but re-expands per-head K/V for every cached token at every
step; dsv2 decodes through the absorbed path straight from the latent cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from dsv2 import DeepseekV2ForCausalLM, LatentCache, ModelConfig


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (the first is dense)")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill measurement")
    parser.add_argument("--context", type=int, default=2048, help="cached tokens before the measured decode steps")
    parser.add_argument("--steps", type=int, default=8, help="decode steps measured")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    import transformers

    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    config = ModelConfig.preset("v2-lite").replace(num_hidden_layers=args.layers, vocab_size=32000,
                                                      bos_token_id=0, eos_token_id=1)
    ours = DeepseekV2ForCausalLM.from_config(config, dtype=dtype, device=device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()

    rows = []
    prompt = torch.randint(0, config.vocab_size, (1, args.prefill), device=device)
    t_hf = timed(lambda: theirs(prompt, use_cache=False), 3)
    t_ours = timed(lambda: ours(prompt), 3)
    rows.append((f"prefill {args.prefill} tokens: transformers vs dsv2", t_hf, t_ours))

    hidden = torch.randn(1, args.context, config.hidden_size, dtype=dtype, device=device)
    t_hf = timed(lambda: theirs.model.layers[-1].mlp(hidden), 3)
    t_ours = timed(lambda: ours.model.layers[-1].mlp(hidden), 3)
    rows.append((f"MoE layer on {args.context} tokens: transformers vs dsv2", t_hf, t_ours))

    context = torch.randint(0, config.vocab_size, (1, args.context), device=device)
    step_ids = torch.randint(0, config.vocab_size, (1, 1), device=device)
    hf_cache = theirs(context, use_cache=True).cache
    hf_len = args.context

    def hf_step():
        nonlocal hf_len
        theirs(step_ids, cache=hf_cache, use_cache=True, position_ids=torch.tensor([[hf_len]], device=device))
        hf_len += 1

    cache = LatentCache(config, 1, args.context + 2 * args.steps + 2, dtype=dtype, device=device)
    ours(context, cache=cache)
    t_hf = timed(hf_step, args.steps)
    ours.attn_impl = "expanded"
    start = cache.seq_len
    t_expanded = timed(lambda: ours(step_ids, cache=cache), args.steps // 2)
    cache.seq_len = start  # measure the absorbed path over the same context length
    ours.attn_impl = "auto"
    t_ours = timed(lambda: ours(step_ids, cache=cache), args.steps // 2)
    rows.append((f"decode step after {args.context} tokens: transformers vs dsv2", t_hf, t_ours))
    rows.append((f"decode step after {args.context} tokens: dsv2 expanded vs dsv2 absorbed", t_expanded, t_ours))

    print(f"{args.layers} layers, V2-Lite widths, vocab 32000, {args.dtype} on {device} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}, transformers {transformers.__version__}")
    print("| measurement: baseline vs ours | baseline (ms) | ours (ms) | speed-up |")
    print("|---|---|---|---|")
    for name, base, new in rows:
        print(f"| {name} | {base * 1e3:.1f} | {new * 1e3:.1f} | {base / new:.2f}× |")
    latent = config.num_hidden_layers * config.latent_dim * dtype.itemsize
    expanded = config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    print(f"KV cache per token: dsv2 latent {latent} bytes; a per-head K/V cache "
          f"{expanded * dtype.itemsize} bytes ({expanded * dtype.itemsize / latent:.1f}×)")


if __name__ == "__main__":
    main()
