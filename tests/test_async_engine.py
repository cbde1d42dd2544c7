import asyncio

import pytest

from dsv2 import LLM, SamplingParams
from dsv2.engine.async_engine import AsyncEngine, EngineDeadError

from helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_checkpoint(path)
    return LLM(model=path, kv_cache_memory=4_000_000, max_model_len=256)


async def collect(engine, ids, params):
    outputs = [out async for out in engine.generate(ids, params)]
    assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
    return outputs


def test_concurrent_requests_share_the_batch_and_match_offline(llm):
    prompts = [[0, 5 + i, 7, 9 + i] for i in range(12)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params,
                                                              use_tqdm=False)]
    engine = AsyncEngine(llm.engine)
    try:
        steps_before = llm.engine.num_steps

        async def main():
            return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

        results = asyncio.run(main())
        assert [r[-1].outputs[0].token_ids for r in results] == expected
        # streamed as it goes: several cumulative outputs (one per step while the consumer keeps up; a slower one
        # gets the newest), each a prefix of the last
        first = [o.outputs[0].token_ids for o in results[0]]
        assert len(first) > 4 and all(first[-1][: len(ids)] == ids for ids in first)
        assert llm.engine.num_steps - steps_before < 2 * 16  # one batch, not 12 sequential generations
    finally:
        engine.shutdown()


def test_abandoned_stream_aborts_and_frees_blocks(llm):
    engine = AsyncEngine(llm.engine)
    try:
        free = llm.engine.num_free_blocks

        async def main():
            agen = engine.generate([0, 1, 2, 3], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
            async for out in agen:
                if len(out.outputs[0].token_ids) >= 3:
                    break
            await agen.aclose()  # what a disconnecting client's handler does
            for _ in range(100):
                await asyncio.sleep(0.02)
                if llm.engine.num_free_blocks == free and not llm.engine.has_unfinished_requests():
                    return True
            return False

        assert asyncio.run(main())
    finally:
        engine.shutdown()


def test_bad_requests_raise_and_shutdown_releases_waiters(llm):
    engine = AsyncEngine(llm.engine)

    async def too_long():
        return [o async for o in engine.generate([1] * 300, SamplingParams())]

    with pytest.raises(ValueError, match="max_model_len is 256"):
        asyncio.run(too_long())

    async def cut_off():
        agen = engine.generate([0, 1], SamplingParams(temperature=0, max_tokens=250, ignore_eos=True))
        await agen.__anext__()
        engine.shutdown()
        async for _ in agen:
            pass

    with pytest.raises(EngineDeadError):
        asyncio.run(asyncio.wait_for(cut_off(), timeout=30))
    assert not engine.is_alive and not llm.engine.has_unfinished_requests()


def test_a_duplicate_request_id_is_refused_and_the_first_request_is_unharmed(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = llm.generate(prompt_token_ids=[[0, 5, 7]], sampling_params=params, use_tqdm=False)[0]
    engine = AsyncEngine(llm.engine)
    try:
        async def main():
            first = engine.generate([0, 5, 7], params, request_id="same")
            await first.__anext__()
            with pytest.raises(ValueError, match="'same' is already in flight"):
                await engine.generate([0, 5, 7], params, request_id="same").__anext__()
            return [out async for out in first][-1]

        final = asyncio.run(asyncio.wait_for(main(), timeout=30))
        assert final.finished and final.outputs[0].token_ids == expected.outputs[0].token_ids
    finally:
        engine.shutdown()


def test_a_request_racing_the_engine_stopping_fails_instead_of_hanging(llm, monkeypatch):
    engine = AsyncEngine(llm.engine)
    alive_check = engine._check_alive

    def check_then_stop():  # the engine thread ends between generate's alive check and its registering
        alive_check()
        engine.shutdown()
        assert not engine._thread.is_alive()

    monkeypatch.setattr(engine, "_check_alive", check_then_stop)

    async def main():
        return [out async for out in engine.generate([0, 1], SamplingParams(max_tokens=2))]

    with pytest.raises(EngineDeadError, match="shut down"):
        asyncio.run(asyncio.wait_for(main(), timeout=10))


def test_a_stalled_consumer_holds_one_output_not_one_per_step():
    from dsv2.engine.async_engine import _put_latest

    async def main():
        queue = asyncio.Queue()
        for item in ("step 1", "step 2", "step 3"):
            _put_latest(queue, item)
        return queue.qsize(), await queue.get()

    assert asyncio.run(main()) == (1, "step 3")


def test_a_request_that_cannot_be_queued_fails_alone(llm, monkeypatch):
    engine = AsyncEngine(llm.engine)
    try:
        add = llm.engine.add_request
        calls = []

        def add_once_broken(*args, **kwargs):
            calls.append(args[0])
            if len(calls) == 1:
                raise RuntimeError("boom")
            return add(*args, **kwargs)

        monkeypatch.setattr(llm.engine, "add_request", add_once_broken)
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

        async def main():
            with pytest.raises(ValueError, match="could not be queued: RuntimeError"):
                await collect(engine, [0, 1, 2], params)
            return await collect(engine, [0, 1, 2], params)

        assert len(asyncio.run(main())[-1].outputs[0].token_ids) == 3 and engine.is_alive
    finally:
        engine.shutdown()
