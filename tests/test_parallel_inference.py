"""Tensor- and expert-parallel inference on 2 processes (gloo, CPU) against one process."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dsv2 import LLM, DeepseekV2ForCausalLM, ModelConfig, SamplingParams
from dsv2.parallel.group import WorkerDiedError
from dsv2.parallel.tensor_parallel import shard_model

from helpers import TINY_V2, make_tokenizer_files, tiny_model

pytestmark = pytest.mark.distributed
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[0, *range(5 + i, 12 + 3 * i)] for i in range(8)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model(TINY_V2, vocab_size=512).save_pretrained(path)
    make_tokenizer_files(path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, dtype="float32")
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY,
                                                          use_tqdm=False)]


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tensor-parallel", "expert-parallel"])
def test_two_ranks_generate_what_one_does(checkpoint, reference, expert_parallel):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, dtype="float32", tensor_parallel_size=2,
              enable_expert_parallel=expert_parallel)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY,
                                                             use_tqdm=False)]
        assert got == reference
        # every rank holds half of every sharded tensor, plus the replicated ones (latent projection, norms, gate)
        config = ModelConfig.from_pretrained(checkpoint)
        with torch.device("meta"):
            full, shard = DeepseekV2ForCausalLM(config), DeepseekV2ForCausalLM(config)
        plan = shard_model(shard, 0, 2, expert_parallel)
        sizes = {n: p.numel() * 4 for n, p in full.named_parameters()}
        split = sum(v for n, v in sizes.items() if n in plan.dims or n in plan.experts_per_rank)
        expected = split // 2 + sum(sizes.values()) - split
        assert llm.group.rank_bytes == [expected, expected]
        assert split / sum(sizes.values()) > 0.8  # most of the model is sharded
    finally:
        llm.shutdown()


def test_a_dead_worker_stops_the_engine_with_a_clear_error(checkpoint):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, dtype="float32", tensor_parallel_size=2)
    try:
        llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=GREEDY, use_tqdm=False)
        os.kill(llm.group.workers[0].pid, signal.SIGKILL)
        llm.group.workers[0].join(10)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="worker rank 1 exited"):
            llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 30
    finally:
        llm.shutdown()


def test_workers_exit_when_rank_0_dies(checkpoint):
    script = textwrap.dedent(f"""
        import os, sys
        from dsv2 import LLM
        if __name__ == "__main__":
            llm = LLM(model={str(checkpoint)!r}, kv_cache_memory=4_000_000, dtype="float32", tensor_parallel_size=2)
            print(llm.group.workers[0].pid, flush=True)
            os._exit(3)  # rank 0 dies without any clean-up
    """)
    path = checkpoint.parent / "rank0.py"
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    worker = int(out.stdout.split()[0])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived rank 0")
