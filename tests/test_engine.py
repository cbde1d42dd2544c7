"""The engine against the reference `generate`, under prefix caching, preemption and chunked prefill."""

import pytest
import torch

from dsv2 import LLM, DeepseekV2ForCausalLM, SamplingParams
from dsv2.engine.block_manager import BlockManager
from dsv2.engine.sequence import Sequence
from dsv2.generate import generate
from dsv2.sampling import SamplingRow

from helpers import TINY_LITE, TINY_V2, record_batches, tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", params=["lite", "v2"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return tiny_checkpoint(path, TINY_LITE if request.param == "lite" else TINY_V2)


@pytest.fixture(scope="module")
def prompts():
    """36 prompts of 1 to 70 tokens, several sharing long prefixes."""
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(2, 400, (40,), generator=gen).tolist()
    out = []
    for i in range(36):
        n = int(torch.randint(1, 70, (1,), generator=gen))
        tail = torch.randint(2, 400, (n,), generator=gen).tolist()
        out.append(shared[: i % 3 * 20] + tail)
    return out


@pytest.fixture(scope="module")
def reference(checkpoint, prompts):
    model = DeepseekV2ForCausalLM.from_pretrained(checkpoint)
    return [generate(model, torch.tensor([p]), max_new_tokens=12, ignore_eos=True)[0, len(p):].tolist()
            for p in prompts]


def run(checkpoint, prompts, **engine_args):
    llm = LLM(model=checkpoint, **engine_args)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_engine_equals_reference_generate(checkpoint, prompts, reference, prefix_caching):
    llm, got = run(checkpoint, prompts, kv_cache_memory=4_000_000, enable_prefix_caching=prefix_caching,
                   max_num_batched_tokens=512)  # several prefill steps: later prompts find earlier prefixes
    assert got == reference
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks  # everything given back
    assert (llm.engine.blocks.prefix_hits > 0) == prefix_caching


def test_preemption_under_a_tiny_cache(checkpoint, prompts, reference):
    # 16 blocks of 8 tokens: a few sequences at a time, so decoding runs out of blocks and preempts
    per_token = 3 * 40 * 4  # tiny config: 3 layers × (32 + 8) values × fp32
    llm, got = run(checkpoint, prompts, kv_cache_memory=16 * 8 * per_token, block_size=8, max_model_len=128)
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == reference


def test_chunked_prefill_forced(checkpoint, prompts, reference):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, max_num_batched_tokens=16)
    batches = record_batches(llm)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    split = {id(item.seq) for batch in batches if batch.is_prefill for item in batch.items
             if item.start > item.seq.num_cached_tokens}  # prompts whose later chunks ran in later steps
    assert len(split) > len(prompts) // 2  # most of the prompts (1-110 tokens) were split into chunks of ≤ 16


def test_prefix_cache_serves_shared_prompts(checkpoint, prompts, reference):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, block_size=8)
    first = llm.generate(prompt_token_ids=prompts[:3], sampling_params=GREEDY, use_tqdm=False)
    hits_before = llm.engine.blocks.prefix_hits
    rest = llm.generate(prompt_token_ids=prompts[3:], sampling_params=GREEDY, use_tqdm=False)
    assert llm.engine.blocks.prefix_hits - hits_before >= 20 * 8  # the 40-token shared prefix, many times
    assert any(o.num_cached_tokens > 0 for o in rest)
    assert [o.outputs[0].token_ids for o in first + rest] == reference


def test_abort_frees_every_block(checkpoint, prompts):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, enable_prefix_caching=False)
    engine = llm.engine
    for i, p in enumerate(prompts[:6]):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=50))
    for _ in range(4):
        engine.step()
    assert engine.num_free_blocks < engine.blocks.num_blocks
    for i in range(6):
        out = engine.abort_request(f"r{i}")
        assert out.finished and out.outputs[0].finish_reason in ("abort", "stop", "length")
    assert engine.num_free_blocks == engine.blocks.num_blocks and not engine.has_unfinished_requests()
    assert engine.abort_request("r0") is None  # already gone


def test_aborting_a_waiting_request_leaves_the_others_queued(checkpoint, prompts):
    """An aborted request behind others in the queue leaves it; the ones before and after it still run."""
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000)
    engine = llm.engine
    for i, p in enumerate(prompts[:3]):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert engine.abort_request("r1").outputs[0].finish_reason == "abort"
    assert [seq.request_id for seq in engine.scheduler.waiting] == ["r0", "r2"]
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {out.request_id for out in engine.step() if out.finished}
    assert finished == {"r0", "r2"} and engine.num_free_blocks == engine.blocks.num_blocks


def test_seeded_sampling_repeats_whatever_the_batch(checkpoint, prompts):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=10, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[prompts[5]], sampling_params=params, use_tqdm=False)[0]
    others = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    batch = llm.generate(prompt_token_ids=prompts[:8], sampling_params=[others] * 5 + [params] + [others] * 2,
                         use_tqdm=False)
    assert batch[5].outputs[0].token_ids == alone.outputs[0].token_ids


def test_vllm_api(checkpoint):
    llm = LLM(model=checkpoint, tensor_parallel_size=1, max_model_len=256, trust_remote_code=True, enforce_eager=True,
              kv_cache_memory=4_000_000)
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.3, max_tokens=8, stop_token_ids=[tok.eos_token_id], n=3, seed=1, logprobs=2)
    messages_list = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "你好 🚀"}]]
    prompt_token_ids = [tok.apply_chat_template(m, add_generation_prompt=True) for m in messages_list]
    outputs = llm.generate(prompt_token_ids=prompt_token_ids, sampling_params=params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompt_token_ids
    for out in outputs:
        assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
        for c in out.outputs:
            assert c.finish_reason in ("stop", "length") and len(c.logprobs) == len(c.token_ids)
            assert all(tid in entry for tid, entry in zip(c.token_ids, c.logprobs, strict=True))
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    chat = llm.chat(messages_list[1], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    text = llm.generate([tok.decode(prompt_token_ids[1])], SamplingParams(temperature=0, max_tokens=5),
                        use_tqdm=False)
    assert chat[0].outputs[0].token_ids == text[0].outputs[0].token_ids
    assert llm.generate({"prompt_token_ids": prompt_token_ids[0]}, use_tqdm=False)[0].outputs[0].token_ids


def test_stop_strings_and_length(checkpoint):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, max_model_len=64)
    free = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    text = free.outputs[0].text
    stop = text[5:7]
    cut = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    long = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), use_tqdm=False)
    assert long[0].outputs[0].finish_reason == "length"
    assert len(long[0].prompt_token_ids) + len(long[0].outputs[0].token_ids) == 64  # capped by max_model_len


def test_bad_requests_and_settings(checkpoint):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len is 64"):
        llm.generate(prompt_token_ids=[[5] * 64], use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.engine.add_request("x", [], SamplingParams())
    with pytest.raises(TypeError, match="unexpected arguments: frobnicate"):
        LLM(model=checkpoint, frobnicate=True)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        LLM(model=checkpoint, kv_cache_memory=1000, max_model_len=64)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(model=checkpoint, max_model_len=10**6)


def test_a_bad_prompt_queues_nothing_and_later_calls_get_their_own_outputs(checkpoint, prompts, reference):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000)
    with pytest.raises(ValueError, match=r"prompt 1: prompt token ids must lie in \[0, 512\); got 512"):
        llm.generate(prompt_token_ids=[prompts[0], [5, 512]], sampling_params=GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # prompt 0 was not left behind
    llm.engine.add_request("someone else's", [5, 6], SamplingParams(max_tokens=1))  # finishes first: not ours
    got = llm.generate(prompt_token_ids=prompts[1:3], sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == reference[1:3]


def test_generate_raises_if_its_requests_leave_the_engine_unanswered(checkpoint, monkeypatch):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000)

    def lose_every_request():
        for request_id in list(llm.engine.requests):
            llm.engine.abort_request(request_id)
        return []

    monkeypatch.setattr(llm.engine, "step", lose_every_request)
    with pytest.raises(RuntimeError, match="1 requests unanswered"):  # a loop forever under python -O before
        llm.generate(prompt_token_ids=[[5, 6]], use_tqdm=False)


def test_block_manager_shares_and_evicts_in_order():
    bm = BlockManager(num_blocks=6, block_size=4)

    def seq(tokens):
        return Sequence("r", 0, list(tokens), len(tokens), GREEDY, 10, SamplingRow(GREEDY, tokens))

    a = seq(range(13))  # 3 full blocks + 1
    bm.attach_prefix(a)
    bm.grow(a, 13)
    a.num_computed_tokens = 13
    bm.commit(a)
    assert a.num_hashed_blocks == 3 and bm.num_free_blocks == 2
    b = seq([*range(8), 99, 98, 97, 96, 95])  # shares the first two blocks only
    bm.attach_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.release(a)
    bm.release(b)
    assert bm.num_free_blocks == 6
    c = seq(range(13))  # a's blocks are free but still cached
    bm.attach_prefix(c)
    assert c.num_computed_tokens == 12
    bm.release(c)
    for _ in range(6):  # hand every block out: the cached contents are overwritten, oldest freed first
        bm._take_free_block()
    assert bm.cached == {}


def test_a_chunked_prefill_waiting_for_blocks_is_not_overtaken():
    from dsv2.engine.scheduler import Scheduler

    def seq(tokens):
        tokens = list(tokens)
        return Sequence("r", 0, tokens, len(tokens), GREEDY, 10, SamplingRow(GREEDY, tokens))

    def run(batch):  # what the engine does after a step: the chunk's latents are computed
        for item in batch.items:
            item.seq.num_computed_tokens = item.end

    scheduler = Scheduler(BlockManager(num_blocks=6, block_size=4), max_num_seqs=4, max_num_batched_tokens=8)
    decoding, long, late = seq(range(100, 107)), seq(range(200, 220)), seq([1, 2, 3])
    scheduler.add(decoding)
    run(scheduler.schedule())  # its 7 prompt tokens: 2 blocks
    decoding.token_ids.append(5)
    scheduler.add(long)
    batch = scheduler.schedule()  # after a prefill step the running answer decodes (position 7: still 2 blocks)
    assert not batch.is_prefill and [item.seq for item in batch.items] == [decoding]
    run(batch)
    decoding.token_ids.append(6)
    batch = scheduler.schedule()  # the long prompt's first chunk of 8: 2 more blocks
    assert batch.is_prefill and [item.seq for item in batch.items] == [long]
    run(batch)
    run(scheduler.schedule())  # decoding position 8 takes a 3rd block: 1 left; the long prompt's next chunk needs 2
    decoding.token_ids.append(7)
    scheduler.add(late)
    batch = scheduler.schedule()
    assert not batch.is_prefill and [item.seq for item in batch.items] == [decoding]
    assert list(scheduler.waiting) == [late]  # it would take the block the long prompt waits for


def test_the_model_card_vllm_program_runs_with_only_the_import_changed(tmp_path, capsys):
    pytest.importorskip("transformers")
    tiny_checkpoint(tmp_path, max_position_embeddings=16384)
    program = f'model_name = "{tmp_path}"\n' + '''
from transformers import AutoTokenizer
from dsv2 import LLM, SamplingParams

max_model_len, tp_size = 8192, 1
tokenizer = AutoTokenizer.from_pretrained(model_name)
llm = LLM(model=model_name, tensor_parallel_size=tp_size, max_model_len=max_model_len, trust_remote_code=True, enforce_eager=True)
sampling_params = SamplingParams(temperature=0.3, max_tokens=256, stop_token_ids=[tokenizer.eos_token_id])

messages_list = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "Translate the following content into Chinese directly: DeepSeek-V2 adopts innovative architectures to guarantee economical training and efficient inference."}],
    [{"role": "user", "content": "Write a piece of quicksort code in C++."}],
]

prompt_token_ids = [tokenizer.apply_chat_template(messages, add_generation_prompt=True) for messages in messages_list]

outputs = llm.generate(prompt_token_ids=prompt_token_ids, sampling_params=sampling_params)

generated_text = [output.outputs[0].text for output in outputs]
print(generated_text)
'''
    scope = {}
    exec(compile(program, "model_card_vllm", "exec"), scope)
    assert len(scope["generated_text"]) == 3 and capsys.readouterr().out.startswith("[")
    outputs = scope["outputs"]
    assert all(o.outputs[0].finish_reason in ("stop", "length") for o in outputs)


def test_prompt_logprobs_match_a_full_forward_and_allow_the_prefix_cache(checkpoint, prompts):
    llm = LLM(model=checkpoint, kv_cache_memory=4_000_000, block_size=8, max_num_batched_tokens=16)
    context, continuation = prompts[2][:40], prompts[5][:6]  # chunked: 46 tokens in steps of ≤ 16
    ids = context + continuation
    with torch.no_grad():
        expected = llm.model(torch.tensor([ids]))[0].log_softmax(-1)  # [T, vocab]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, prompt_logprobs_start=len(context))
    first, second = (llm.generate(prompt_token_ids=[ids], sampling_params=params, use_tqdm=False)[0]
                     for _ in range(2))
    assert second.num_cached_tokens >= 32  # the context came from the prefix cache the second time
    for out in (first, second):
        logprobs = out.prompt_logprobs
        assert logprobs[: len(context)] == [None] * len(context)
        for p in range(len(context), len(ids)):
            entry = logprobs[p][ids[p]]
            assert entry.logprob == pytest.approx(expected[p - 1, ids[p]].item(), abs=1e-4)
            assert entry.rank == int((expected[p - 1] > expected[p - 1, ids[p]]).sum()) + 1
