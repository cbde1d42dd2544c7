"""Multi-process inference layouts side by side: one process, tensor parallel, data-parallel attention.

    python benchmarks/bench_parallel.py [--dtype bfloat16] [--quick]

On the shared mid-size random checkpoint (see bench_generate.py), in this one run: the same batch of requests
(random prompts, greedy, ignore_eos) through `LLM.generate` as
- one process on 2 threads;
- `tensor_parallel_size=2, enable_expert_parallel=True`: 2 processes × 1 thread, heads and experts split;
- `data_parallel_size=2, enable_expert_parallel=True`: 2 processes × 1 thread, each its own requests and latent
  cache, routed experts split (tokens exchanged by all-to-all).
Printed per layout: output tokens/s, the weights each rank holds, and the capacity of the latent cache given the
same memory per rank (`kv_cache_memory`): tokens cached in all and concurrent `max_model_len`-token sequences.
Tensor parallelism replicates MLA's single latent, so its capacity is one rank's; data-parallel attention adds the
ranks' caches up. This machine has 2 cores, so the layouts share the same compute: throughput differences show the
communication and duplicated work of each, not a speed-up (on GPUs every rank brings its own compute and bandwidth).

``--quick``: 4 requests of 32 + 8 tokens (a smoke run).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import torch

from dsv2 import LLM, SamplingParams

from bench_generate import bench_config, describe_checkpoint, write_checkpoint

THREADS = 2
KV_CACHE_MEMORY = 256 * 2**20  # per rank
MAX_MODEL_LEN = 2048
LAYOUTS = {
    "1 process": {},
    "tensor parallel 2 + EP": {"tensor_parallel_size": 2, "enable_expert_parallel": True},
    "data-parallel attention 2 + EP": {"data_parallel_size": 2, "enable_expert_parallel": True},
}


@dataclass
class Settings:
    requests: int
    prompt_tokens: int
    new_tokens: int


FULL = Settings(requests=32, prompt_tokens=128, new_tokens=64)
QUICK = Settings(requests=4, prompt_tokens=32, new_tokens=8)


@dataclass
class Row:
    tokens_per_s: float
    rank_weight_bytes: list[int]
    cached_tokens: int
    outputs: list[list[int]]


def run_layout(path: str, dtype: str, layout: dict, prompts: list[list[int]], settings: Settings) -> Row:
    llm = LLM(model=path, dtype=dtype, kv_cache_memory=KV_CACHE_MEMORY, max_model_len=MAX_MODEL_LEN, **layout)
    try:
        params = SamplingParams(temperature=0, max_tokens=settings.new_tokens, ignore_eos=True)
        llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(temperature=0, max_tokens=2),
                     use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        seconds = time.perf_counter() - start
        weights = llm.group.rank_bytes if llm.group else [sum(p.numel() * p.element_size()
                                                              for p in llm.model.parameters())]
        block_size = llm.engine.config.block_size
        return Row(len(prompts) * settings.new_tokens / seconds, weights, llm.engine.num_free_blocks * block_size,
                   [o.outputs[0].token_ids for o in outputs])
    finally:
        llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quick", action="store_true", help="small workloads: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    settings = QUICK if args.quick else FULL
    config = bench_config()
    print(describe_checkpoint(config), flush=True)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, config.vocab_size, (settings.requests, settings.prompt_tokens),
                            generator=generator).tolist()
    total = time.perf_counter()
    rows: dict[str, Row] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(config, tmp)
        for name, layout in LAYOUTS.items():
            rows[name] = run_layout(tmp, args.dtype, layout, prompts, settings)
            print(f"{name}: {rows[name].tokens_per_s:.1f} tok/s", flush=True)

    base = rows["1 process"]
    print(f"\n{settings.requests} requests × {settings.prompt_tokens}-token prompts → {settings.new_tokens} new tokens "
          f"(greedy), {args.dtype}, {THREADS} cores in all; latent cache {KV_CACHE_MEMORY / 2**20:.0f} MiB per rank")
    print("| layout | output tok/s | vs 1 process | weights per rank, MB | tokens cached | "
          f"concurrent {MAX_MODEL_LEN}-token sequences | capacity vs 1 process | same tokens as 1 process |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        same = sum(a == b for a, b in zip(row.outputs, base.outputs, strict=True))
        weights = " / ".join(f"{b / 1e6:.0f}" for b in row.rank_weight_bytes)
        print(f"| {name} | {row.tokens_per_s:.1f} | {row.tokens_per_s / base.tokens_per_s:.2f}× | {weights} | "
              f"{row.cached_tokens:,} | {row.cached_tokens // MAX_MODEL_LEN} | "
              f"{row.cached_tokens / base.cached_tokens:.1f}× | {same}/{len(row.outputs)} |")
    print(f"\n(total {time.perf_counter() - total:.0f} s)")


if __name__ == "__main__":
    main()
