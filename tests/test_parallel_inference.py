"""Tensor-, expert- and data-parallel inference on 2 processes (gloo, CPU) against one process."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import dsv2.parallel.group as group_module
from dsv2 import LLM, DeepseekV2ForCausalLM, ModelConfig, SamplingParams, WeightsError
from dsv2.engine.async_engine import AsyncEngine
from dsv2.engine.engine import EngineConfig, LLMEngine
from dsv2.engine.runner import ModelRunner
from dsv2.parallel.group import DistributedRunner, ParallelGroup, ParallelGroupError, WorkerDiedError
from dsv2.parallel.tensor_parallel import shard_model

from helpers import TINY_V2, tiny_checkpoint

pytestmark = pytest.mark.distributed
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[0, *range(5 + i, 12 + 3 * i)] for i in range(8)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    return tiny_checkpoint(path, TINY_V2)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """One process, on one thread as each of the 2 ranks runs here (sums in another order could flip a near-tie of
    this random model's logits whichever side is right)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, dtype="float32")
        return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY,
                                                              use_tqdm=False)]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tensor-parallel", "expert-parallel"])
def test_two_ranks_generate_what_one_does(checkpoint, reference, expert_parallel):
    threads = torch.get_num_threads()
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, dtype="float32", tensor_parallel_size=2,
              enable_expert_parallel=expert_parallel)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY,
                                                             use_tqdm=False)]
        assert got == reference
        # every rank holds half of every sharded tensor, plus the replicated ones (latent projection, norms, gate)
        with torch.device("meta"):
            shard = DeepseekV2ForCausalLM(ModelConfig.from_pretrained(checkpoint))
        plan = shard_model(shard, 0, 2, expert_parallel)
        sizes = _parameter_bytes(checkpoint)
        split = sum(v for n, v in sizes.items() if n in plan.dims or n in plan.experts_per_rank)
        expected = split // 2 + sum(sizes.values()) - split
        assert llm.group.rank_bytes == [expected, expected]
        assert split / sum(sizes.values()) > 0.8  # most of the model is sharded
    finally:
        llm.shutdown()
    assert torch.get_num_threads() == threads  # rank 0's share of the cores is given back


def test_tensor_parallel_attention_of_kernel_sizes_generates_what_one_process_does(tmp_path):
    """Sizes the CPU decoding kernels take (on AVX-512 machines): one process decodes through them (`decode_layers`);
    the ranks' row-parallel o_proj must keep its all-reduce, so their attention stays on the modules."""
    checkpoint = tiny_checkpoint(tmp_path, TINY_V2, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32,
                                 q_lora_rank=32)
    prompts = PROMPTS[:4]
    one = LLM(model=checkpoint, kv_cache_memory=4_000_000, dtype="float32")
    want = [o.outputs[0].token_ids for o in one.generate(prompt_token_ids=prompts, sampling_params=GREEDY,
                                                         use_tqdm=False)]
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, dtype="float32", tensor_parallel_size=2)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY,
                                                             use_tqdm=False)]
    finally:
        llm.shutdown()
    assert got == want


def _parameter_bytes(checkpoint) -> dict[str, int]:
    with torch.device("meta"):
        full = DeepseekV2ForCausalLM(ModelConfig.from_pretrained(checkpoint))
    return {n: p.numel() * 4 for n, p in full.named_parameters()}


@pytest.mark.parametrize("expert_parallel", [True, False], ids=["attention-dp+expert-parallel", "replicas"])
def test_data_parallel_attention_generates_what_one_process_does(checkpoint, reference, expert_parallel):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, dtype="float32", data_parallel_size=2,
              enable_expert_parallel=expert_parallel)
    try:
        engine, engines = llm.engine, llm.engine.engines
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, GREEDY)
        outputs = {o.request_id: o for o in engine.step()}
        tables = [{block for seq in e.scheduler.running for block in seq.block_table} for e in engines]
        assert tables[0] & tables[1]  # the same block numbers hold different sequences on the two ranks
        while engine.has_unfinished_requests():
            outputs.update({o.request_id: o for o in engine.step()})
        # ... and every token is still right: each rank reads its own cache
        assert [outputs[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))] == reference
        assert all(e.num_steps > 0 for e in engines) and not engine.owner  # both served requests; none left over
        # a lone request: the other rank idles through every step (a dummy token for the MoE all-to-alls)
        before, total = [e.num_steps for e in engines], llm.engine.num_steps
        one = llm.generate(prompt_token_ids=PROMPTS[3:4], sampling_params=GREEDY, use_tqdm=False)
        assert one[0].outputs[0].token_ids == reference[3]
        assert sorted(e.num_steps - b for e, b in zip(engines, before, strict=True)) == [0, llm.engine.num_steps
                                                                                         - total]
        # resident weights: the routed experts halved (expert parallel) or whole replicas; the rest whole
        sizes = _parameter_bytes(checkpoint)
        experts = sum(v for n, v in sizes.items() if ".mlp.experts." in n)
        expected = sum(sizes.values()) - (experts // 2 if expert_parallel else 0)
        assert llm.group.rank_bytes == [expected, expected]
        if expert_parallel:  # the server's engine thread drives the data-parallel engine like a single one
            server_engine = AsyncEngine(llm.engine)

            async def answer(prompt):
                async for output in server_engine.generate(prompt, GREEDY):
                    final = output
                return final.outputs[0].token_ids

            async def answers():
                return await asyncio.gather(*(answer(p) for p in PROMPTS[:4]))

            try:
                assert asyncio.run(answers()) == reference[:4]
                assert server_engine.stats()["total_blocks"] == 2 * engines[0].blocks.num_blocks
            finally:
                server_engine.shutdown()
    finally:
        llm.shutdown()


def test_tensor_and_data_parallel_together_or_bad_sizes_are_refused(checkpoint):
    with pytest.raises(ValueError, match="tensor_parallel_size=2 with data_parallel_size=2"):
        LLM(model=checkpoint, tensor_parallel_size=2, data_parallel_size=2)
    with pytest.raises(ValueError, match="data_parallel_size=0 must be an integer >= 1"):
        LLM(model=checkpoint, data_parallel_size=0)
    assert not dist.is_initialized()


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2},
                                    {"data_parallel_size": 2, "enable_expert_parallel": True}],
                         ids=["tensor-parallel", "data-parallel"])
def test_a_dead_worker_stops_the_engine_with_a_clear_error(checkpoint, layout):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, dtype="float32", **layout)
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


def test_the_cache_is_sized_after_loading_in_the_given_block_size(checkpoint, reference, monkeypatch):
    events, load_sharded = [], group_module.load_sharded

    def load_then_record(*args, **kwargs):
        model = load_sharded(*args, **kwargs)
        events.append("rank 0 loaded")
        return model

    def num_blocks_for(config, dtype):
        events.append("cache sized")
        return 16

    monkeypatch.setattr(group_module, "load_sharded", load_then_record)
    group = ParallelGroup(checkpoint, 2, False, torch.float32, torch.device("cpu"), num_blocks_for,
                                block_size=32)
    monkeypatch.undo()
    try:
        assert events == ["rank 0 loaded", "cache sized"] and group.block_size == 32
        # prompts and outputs span several 32-token blocks: the workers' caches must be laid out like rank 0's
        engine = LLMEngine(group.model, None, EngineConfig(num_blocks=group.num_blocks, block_size=32,
                                                           max_model_len=256), runner_factory=group.make_runner)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, GREEDY)
        got = {}
        while engine.has_unfinished_requests():
            got.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        assert [got[str(i)] for i in range(len(PROMPTS))] == reference
    finally:
        group.close()


def test_a_failed_start_up_leaves_nothing_behind(checkpoint, reference, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"model\.norm\.weight: missing"):
        LLM(model=broken, kv_cache_memory=4_000_000, dtype="float32", tensor_parallel_size=2)
    assert not dist.is_initialized()
    assert not [p for p in mp.active_children() if p.name.startswith("dsv2-rank")]
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, dtype="float32", tensor_parallel_size=2)
    try:
        got = llm.generate(prompt_token_ids=PROMPTS[:2], sampling_params=GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == reference[:2]
    finally:
        llm.shutdown()


def test_an_error_on_rank_0_is_not_blamed_on_the_workers(checkpoint, monkeypatch):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, dtype="float32", tensor_parallel_size=2)

    def execute_then_fail(self, step):
        ModelRunner.execute(self, step)  # every rank completes the step
        raise RuntimeError("rank 0 went wrong")

    monkeypatch.setattr(DistributedRunner, "execute", execute_then_fail)
    try:
        with pytest.raises(RuntimeError, match="rank 0 went wrong") as failure:
            llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=GREEDY, use_tqdm=False)
        assert failure.type is RuntimeError  # not WorkerDiedError: both workers are alive
        # the workers may be anywhere in that step now: no further step may pair its collectives with theirs
        with pytest.raises(ParallelGroupError, match="out of step"):
            llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()


def test_a_worker_dying_mid_step_is_reported_as_such(checkpoint, monkeypatch):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, dtype="float32", tensor_parallel_size=2)

    def kill_then_execute(self, step):  # the worker dies under the step's collectives
        os.kill(llm.group.workers[0].pid, signal.SIGKILL)
        return ModelRunner.execute(self, step)

    monkeypatch.setattr(DistributedRunner, "execute", kill_then_execute)
    try:
        with pytest.raises(WorkerDiedError, match="worker rank 1 exited"):
            llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=GREEDY, use_tqdm=False)
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


def test_serve_flags_reach_the_engine():
    from dsv2.cli import build_parser, engine_arguments

    args = build_parser().parse_args(["serve", "-dp", "2", "--expert-parallel"])
    wanted = {"data_parallel_size": 2, "enable_expert_parallel": True, "tensor_parallel_size": 1}
    assert wanted.items() <= engine_arguments(args).items()
    args = build_parser().parse_args(["serve", "--tensor-parallel-size", "2"])
    assert engine_arguments(args)["tensor_parallel_size"] == 2 and engine_arguments(args)["data_parallel_size"] == 1
