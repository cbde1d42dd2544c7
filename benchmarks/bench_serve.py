"""Serving under load: dsv2's OpenAI-compatible server — throughput and latency at 1, 8 and 32 concurrent clients.

    python benchmarks/bench_serve.py [--concurrency 1 8 32] [--requests 16 64 128] [--max-tokens 64] [--quick]

The server runs in this process as tests/test_server.py runs it (`LLM(...)`, `AsyncEngine(llm.engine)`,
`create_app(...)`, uvicorn on a free loopback port in a thread) over the shared mid-size random checkpoint (see
bench_generate.py) in bfloat16, on 2 threads, with a small byte-level BPE tokenizer (tests/helpers.py's
`make_tokenizer_files`). The checkpoint's output-head rows for ids the tokenizer cannot turn into text on their own
(ids past its vocabulary, special tokens, partial UTF-8 bytes) are zero, so that greedy decoding picks printable
tokens and every generated token reaches the client as its own streamed chunk; the model's compute is unchanged.

The clients run in a separate process (httpx, asyncio), so that their work does not hold this process's GIL: at each
concurrency level C, C clients send streaming `/v1/chat/completions` requests one after the other (a closed loop)
until the level's requests are done. Each request is a random ~64-token chat prompt (distinct words, so no prefix
cache hits), greedy, `max_tokens` 64, `ignore_eos: true`. Measured per level: output tokens/s and requests/s over
the level's wall time, time to first token (request sent → first chunk with text), inter-token latency (gaps between
text chunks), time per output token ((last − first token) / (tokens − 1)), and the engine steps taken. For reference,
the offline engine (`LLM.generate`) runs the same kind of batch, at the highest concurrency, before the server
starts. A warm-up level (C requests of 16 tokens at the highest concurrency) runs first.

``--quick``: levels 1 and 4 with 2 and 8 requests of 16 tokens (a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsv2 import LLM
    from dsv2.tokenizer import Tokenizer

THREADS = 2
MODEL_NAME = "bench"
PROMPT_TOKENS = 64
KV_CACHE_MEMORY = 256 * 2**20
MAX_MODEL_LEN = 1024
OFFLINE_SHARE_CHECK = 0.80  # the server at the highest concurrency vs the offline engine on the same kind of batch
TESTS = Path(__file__).resolve().parents[1] / "tests"


# ------------------------------------------------------------------------------------------------------- client
async def one_request(client: Any, body: dict) -> dict:
    """Send one streaming chat request. → seconds from sending to each text chunk and to the end, and the tokens."""
    start = time.perf_counter()
    chunks: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(choice["delta"].get("content") for choice in chunk["choices"]):
                chunks.append(time.perf_counter() - start)
    return {"chunks": chunks, "end": time.perf_counter() - start, "tokens": tokens}


async def load(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """`concurrency` clients send the prompts' requests in a closed loop. → per-request records and wall time."""
    import httpx

    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    records: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "stream": True,
                        "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": max_tokens,
                        "ignore_eos": True}
                records.append(await one_request(client, body))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"records": records, "wall": wall}


def client_main(spec_file: str) -> None:
    """The client process: read the level's spec, run it, print the records as JSON."""
    spec = json.loads(Path(spec_file).read_text())
    result = asyncio.run(load(spec["url"], spec["prompts"], spec["concurrency"], spec["max_tokens"]))
    print(json.dumps(result))


def run_level(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"url": url, "prompts": prompts, "concurrency": concurrency, "max_tokens": max_tokens}, f)
    try:
        out = subprocess.run([sys.executable, __file__, "--client", f.name], capture_output=True, text=True,
                             check=True)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"the client process failed:\n{e.stderr}") from None
    finally:
        Path(f.name).unlink()
    return json.loads(out.stdout)


# ------------------------------------------------------------------------------------------------------ prompts
def word_pool() -> list[str]:
    """The ASCII words of the tokenizer's training corpus (each one or a few tokens)."""
    sys.path.insert(0, str(TESTS))
    from helpers import CORPUS

    return sorted({w for line in CORPUS for w in line.split() if w.isascii()})


def make_prompts(tokenizer: Tokenizer, count: int, seed: int) -> list[str]:
    """`count` random word sequences whose chat-templated prompt has about PROMPT_TOKENS tokens."""
    words, rng = word_pool(), random.Random(seed)
    cost = {w: len(tokenizer.encode(" " + w, add_special_tokens=False)) for w in words}
    overhead = len(tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True))
    prompts = []
    for _ in range(count):
        chosen, tokens = [], overhead
        while tokens < PROMPT_TOKENS:
            word = rng.choice(words)
            chosen.append(word)
            tokens += cost[word]
        while prompt_lengths(tokenizer, [" ".join(chosen)])[0] < PROMPT_TOKENS:  # the estimate can fall short
            chosen.append(rng.choice(words))
        prompts.append(" ".join(chosen))
    return prompts


def prompt_lengths(tokenizer: Tokenizer, prompts: list[str]) -> list[int]:
    return [len(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
            for p in prompts]


# ------------------------------------------------------------------------------------------------------- server
def write_model(folder: Path) -> int:
    """The mid-size checkpoint (bfloat16) and a tokenizer in `folder`; output-head rows of ids that are not
    printable on their own set to zero. → how many ids remain printable."""
    import torch

    sys.path.insert(0, str(TESTS))
    from dsv2 import DeepseekV2ForCausalLM
    from dsv2.tokenizer import Tokenizer

    from bench_generate import bench_config
    from helpers import make_tokenizer_files

    make_tokenizer_files(folder, vocab_size=2000)
    tokenizer = Tokenizer.from_pretrained(folder)
    config = bench_config()
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, the checkpoint only {config.vocab_size}")
    printable = [i for i in range(tokenizer.vocab_size)
                 if i not in tokenizer.special_ids and "\ufffd" not in (text := tokenizer.decode([i])) and text]
    model = DeepseekV2ForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        keep = model.lm_head.weight[printable].clone()
        model.lm_head.weight.zero_()
        model.lm_head.weight[printable] = keep
    model.save_pretrained(folder, dtype=torch.bfloat16)
    return len(printable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app on uvicorn in a thread of this process, as tests/test_server.py runs it."""

    def __init__(self, llm: LLM) -> None:
        import uvicorn

        from dsv2.engine.async_engine import AsyncEngine
        from dsv2.server.app import create_app

        self.llm = llm
        self.engine = AsyncEngine(llm.engine)
        app = create_app(self.engine, llm.tokenizer, MODEL_NAME)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.shutdown()


def offline_tokens_per_s(llm: LLM, prompts: list[str], warm_up: list[str], max_tokens: int) -> float:
    """The engine without the server: one LLM.generate over the prompts' chat-templated ids, after one over the
    warm-up prompts (other words: no prefix cache hits)."""
    from dsv2 import SamplingParams

    def templated(texts: list[str]) -> list[list[int]]:
        return [llm.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
                for t in texts]

    ids = templated(prompts)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompt_token_ids=templated(warm_up), use_tqdm=False,
                 sampling_params=SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    start = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=ids, sampling_params=params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------ results
def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


@dataclass
class Level:
    concurrency: int
    requests: int
    wall: float
    tokens: int
    steps: int
    ttft: list[float]
    itl: list[float]
    tpot: list[float]
    short: int  # requests that returned fewer tokens (or text chunks) than max_tokens

    @classmethod
    def from_run(cls, concurrency: int, run: dict, steps: int, max_tokens: int) -> Level:
        records = run["records"]
        ttft = [r["chunks"][0] for r in records if r["chunks"]]
        itl = [b - a for r in records for a, b in zip(r["chunks"], r["chunks"][1:], strict=False)]
        tpot = [(r["chunks"][-1] - r["chunks"][0]) / (len(r["chunks"]) - 1) for r in records if len(r["chunks"]) > 1]
        short = sum(r["tokens"] != max_tokens or len(r["chunks"]) != max_tokens for r in records)
        return cls(concurrency, len(records), run["wall"], sum(r["tokens"] for r in records), steps, ttft, itl, tpot,
                   short)

    def row(self) -> str:
        ms = 1e3
        return (f"| {self.concurrency} | {self.requests} | {self.wall:.1f} | {self.tokens / self.wall:,.1f} | "
                f"{self.requests / self.wall:.2f} | {percentile(self.ttft, 50) * ms:,.0f} | "
                f"{percentile(self.ttft, 99) * ms:,.0f} | {percentile(self.itl, 50) * ms:,.1f} | "
                f"{percentile(self.itl, 99) * ms:,.1f} | {statistics.mean(self.tpot) * ms:,.1f} | "
                f"{self.tokens / self.steps:.1f} |")


# --------------------------------------------------------------------------------------------------------- main
def serve_main(args: argparse.Namespace) -> None:
    import torch

    from dsv2 import LLM

    from bench_generate import CpuAccount, mark

    torch.set_num_threads(THREADS)
    levels = list(zip(args.concurrency, args.requests, strict=True))
    account = CpuAccount()
    with tempfile.TemporaryDirectory() as tmp:
        printable = write_model(Path(tmp))
        llm = LLM(model=tmp, dtype="bfloat16", kv_cache_memory=KV_CACHE_MEMORY, max_model_len=MAX_MODEL_LEN)
    tokenizer = llm.tokenizer
    top = max(args.concurrency)
    offline_prompts = make_prompts(tokenizer, top, seed=1000)
    lengths = prompt_lengths(tokenizer, offline_prompts)
    print(f"mid-size checkpoint in bfloat16, {llm.engine.config.num_blocks} cache blocks; tokenizer of "
          f"{tokenizer.vocab_size} ids ({printable} printable ones keep their output-head rows); prompts of "
          f"{min(lengths)}–{max(lengths)} tokens (chat template included), {args.max_tokens} new tokens each; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    offline = offline_tokens_per_s(llm, offline_prompts, make_prompts(tokenizer, top, seed=1001), args.max_tokens)
    print(f"offline engine (LLM.generate), {top} requests at once: {offline:,.1f} output tokens/s", flush=True)

    server = Server(llm)
    results = []
    try:
        run_level(server.url, make_prompts(tokenizer, top, seed=999), top, 16)  # warm-up
        for n, (concurrency, count) in enumerate(levels):
            prompts = make_prompts(tokenizer, count, seed=n)
            steps = llm.engine.num_steps
            run = run_level(server.url, prompts, concurrency, args.max_tokens)
            results.append(Level.from_run(concurrency, run, llm.engine.num_steps - steps, args.max_tokens))
            print(f"{concurrency} clients: {results[-1].tokens / results[-1].wall:,.1f} output tokens/s", flush=True)
    finally:
        server.close()

    print()
    print("| clients | requests | wall, s | output tokens/s | requests/s | TTFT p50, ms | TTFT p99, ms | ITL p50, ms | "
          "ITL p99, ms | TPOT mean, ms | tokens per engine step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(level.row() for level in results))
    print()
    short = sum(level.short for level in results)
    print(f"check: every request streamed {args.max_tokens} tokens, each in its own text chunk: "
          f"{sum(level.requests for level in results) - short} of {sum(level.requests for level in results)} "
          f"{mark(short == 0)}")
    at_top = next((level for level in results if level.concurrency == top), None)
    if at_top is not None:
        share = at_top.tokens / at_top.wall / offline
        print(f"check (this benchmark's own bar, not a project goal): the server at {top} clients keeps ≥ "
              f"{OFFLINE_SHARE_CHECK:.0%} of the offline engine's output tokens/s on {top} requests: {share:.0%} "
              f"{mark(share >= OFFLINE_SHARE_CHECK)}")
    print(f"\n{account.summary()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32], help="concurrent clients per level")
    parser.add_argument("--requests", nargs="+", type=int, default=[16, 64, 128], help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="levels 1 and 4, 2 and 8 requests of 16 tokens")
    parser.add_argument("--client", metavar="SPEC", help=argparse.SUPPRESS)  # internal: the client process
    args = parser.parse_args()
    if args.client:
        client_main(args.client)
        return
    if args.quick:
        args.concurrency, args.requests, args.max_tokens = [1, 4], [2, 8], 16
    if len(args.concurrency) != len(args.requests):
        parser.error("--concurrency and --requests need the same number of values")
    serve_main(args)


if __name__ == "__main__":
    main()
