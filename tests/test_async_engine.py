import asyncio

import pytest

from dsv2 import LLM, SamplingParams
from dsv2.engine.async_engine import AsyncEngine, EngineDeadError

from helpers import TINY_LITE, make_tokenizer_files, tiny_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model(TINY_LITE, vocab_size=512).save_pretrained(path)
    make_tokenizer_files(path)
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
        assert len(results[0]) == 16  # streamed token by token
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
