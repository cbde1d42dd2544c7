"""vLLM's sampling and engine arguments beyond the basics: stop tokens' text, min_tokens, logprob ranks, limits,
prompt truncation, the engine seed, the keyword arguments of generate / chat, and the padded prefill budget."""

import dataclasses

import pytest
import torch

from dsv2 import LLM, SamplingParams

from helpers import TINY_LITE, prefill_tokens, record_batches, tiny_checkpoint

PROMPT = [5, 17, 33, 60, 2, 9]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(model=tiny_checkpoint(tmp_path_factory.mktemp("lite"), TINY_LITE), kv_cache_memory=4_000_000,
               max_model_len=128)


def one(llm: LLM, params: SamplingParams, prompt: list[int] = PROMPT):
    return llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0].outputs[0]


def free_run(llm: LLM, n: int = 16):
    return one(llm, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))


def test_a_stop_tokens_text_is_left_out_unless_asked(llm):
    tok = llm.get_tokenizer()
    free = free_run(llm)
    # the first token whose text is not empty and does not occur before it
    i = next(i for i, t in enumerate(free.token_ids) if i >= 2 and t not in free.token_ids[:i] and tok.decode([t]))
    stop_id = free.token_ids[i]
    cut = one(llm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_id]))
    assert cut.token_ids == free.token_ids[: i + 1]  # the stop token is the last id, as in vLLM
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop_id)
    assert cut.text == tok.decode(free.token_ids[:i], skip_special_tokens=True)
    kept = one(llm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_id],
                                   include_stop_str_in_output=True))
    assert kept.text == tok.decode(free.token_ids[: i + 1], skip_special_tokens=True)


def test_include_stop_str_in_output_keeps_the_stop_string(llm):
    text = free_run(llm).text
    stop = text[4:6]
    at = text.index(stop)
    params = dict(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop])
    assert one(llm, SamplingParams(**params)).text == text[:at]
    assert one(llm, SamplingParams(**params, include_stop_str_in_output=True)).text == text[: at + len(stop)]


def test_min_tokens_bars_stop_tokens_and_stop_strings_until_reached(llm):
    free = free_run(llm)
    stop_id = free.token_ids[2]
    barred = one(llm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_id],
                                     min_tokens=8))
    assert len(barred.token_ids) >= 8 and stop_id not in barred.token_ids[:8]
    assert barred.token_ids[-1] == stop_id or barred.finish_reason == "length"
    stop = free.text[2:4]
    late = one(llm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop], min_tokens=16))
    assert late.token_ids == free.token_ids and late.finish_reason == "length"  # the early stop string did not count
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_a_sampled_tokens_logprob_has_its_true_rank(llm):
    greedy = one(llm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0))
    assert all(entry[t].rank == 1 and len(entry) == 1 for t, entry in zip(greedy.token_ids, greedy.logprobs,
                                                                          strict=True))
    hot = one(llm, SamplingParams(temperature=5.0, seed=3, max_tokens=24, ignore_eos=True, logprobs=3))
    outside = 0
    for t, entry in zip(hot.token_ids, hot.logprobs, strict=True):
        top = sorted((e for tid, e in entry.items() if e.rank <= 3), key=lambda e: e.rank)
        assert [e.rank for e in top] == list(range(1, len(top) + 1))
        if entry[t].rank > 3:  # not among the top 3: ranked after them, below their probability
            outside += 1
            assert len(entry) == 4 and entry[t].logprob <= min(e.logprob for e in top)
    assert outside  # at temperature 5 most draws fall outside the top 3


def test_limits_and_unsupported_values_are_named(llm):
    with pytest.raises(ValueError, match="logprobs=21 is more than max_logprobs=20"):
        one(llm, SamplingParams(max_tokens=2, logprobs=21))
    with pytest.raises(ValueError, match="prompt_logprobs=50 is more than max_logprobs=20"):
        one(llm, SamplingParams(max_tokens=2, prompt_logprobs=50))
    assert one(llm, SamplingParams(max_tokens=2, logprobs=20)).logprobs  # the engine still serves
    vocab = llm.engine.model.config.vocab_size
    with pytest.raises(ValueError, match=f"logit_bias token ids must lie in \\[0, {vocab}\\); got {vocab}"):
        one(llm, SamplingParams(max_tokens=2, logit_bias={vocab: 5.0}))
    assert one(llm, SamplingParams(temperature=0, max_tokens=4, logit_bias={7: 100}, ignore_eos=True)).token_ids \
        == [7] * 4
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=2, best_of=3)
    assert SamplingParams(n=2, best_of=2, spaces_between_special_tokens=False).best_of == 2
    with pytest.raises(TypeError):
        SamplingParams(temprature=0.5)  # a misspelled name is not swallowed
    with pytest.raises(ValueError, match=r"LLM\(kv_cache_dtype='fp8'\) is not supported"):
        LLM(model="unused", kv_cache_dtype="fp8")
    with pytest.raises(TypeError):
        llm.generate(prompt_token_ids=[PROMPT], sampling_param=SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="lora_request"):
        llm.generate(prompt_token_ids=[PROMPT], lora_request=object(), use_tqdm=False)


def test_detokenize_off_and_prompt_truncation(llm):
    free = free_run(llm, 6)
    ids_only = one(llm, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, detokenize=False))
    assert ids_only.token_ids == free.token_ids and ids_only.text == ""
    long_prompt = [7, 8, 9, 10, *PROMPT]
    cut = llm.generate(prompt_token_ids=[long_prompt], use_tqdm=False,
                       sampling_params=SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                      truncate_prompt_tokens=len(PROMPT)))[0]
    assert cut.prompt_token_ids == PROMPT and cut.outputs[0].token_ids == free.token_ids


def test_the_engine_seed_repeats_unseeded_sampling(llm, tmp_path):
    path = tiny_checkpoint(tmp_path, TINY_LITE)
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)

    def draws(seed: int) -> list[list[int]]:
        engine = LLM(model=path, kv_cache_memory=4_000_000, max_model_len=128, seed=seed)
        out = engine.generate(prompt_token_ids=[PROMPT, PROMPT[:3]], sampling_params=params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in out]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


def test_prompt_token_ids_as_a_tensor_and_the_chat_keywords(llm):
    want = one(llm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)).token_ids
    got = llm.generate(prompt_token_ids=torch.tensor(PROMPT), use_tqdm=False,
                       sampling_params=SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(got) == 1 and got[0].outputs[0].token_ids == want  # one prompt, not one per token
    messages = [{"role": "user", "content": "hi"}]
    template = "{% for m in messages %}<{{ m.role }}|{{ m.content }}|{{ mood }}>{% endfor %}"
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False, chat_template=template,
                   chat_template_kwargs={"mood": "calm"})[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode("<user|hi|calm>", add_special_tokens=False)


def test_outputs_are_snapshots(llm):
    engine = llm.engine
    engine.add_request("snap", PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1))
    first = next(o for o in engine.step() if o.request_id == "snap")
    seen = (list(first.outputs[0].token_ids), len(first.outputs[0].logprobs))
    while engine.has_unfinished_requests():
        engine.step()
    assert (first.outputs[0].token_ids, len(first.outputs[0].logprobs)) == seen


def test_a_prefill_step_counts_its_padded_tokens(tmp_path):
    """The runner pads every chunk of a step to the longest: a long prompt among short ones may not make the step
    (sequences × longest chunk) exceed max_num_batched_tokens, and the outputs stay those of one at a time."""
    path = tiny_checkpoint(tmp_path, TINY_LITE)
    engine = LLM(model=path, kv_cache_memory=4_000_000, max_model_len=256, max_num_batched_tokens=256)
    batches = record_batches(engine)
    prompts = [[5 + i, 6, 7] for i in range(6)] + [list(range(2, 202))] + [[9, 10 + i] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in engine.generate(prompt_token_ids=prompts, sampling_params=params,
                                                                 use_tqdm=False)]
    steps = [(len(b.items), max(item.end - item.start for item in b.items)) for b in batches if b.is_prefill]
    assert steps and all(n * widest <= 256 for n, widest in steps), steps
    assert max(widest for _, widest in steps) > 100  # the long prompt ran in big chunks, not just crumbs
    alone = [one(engine, params, p).token_ids for p in prompts]
    assert together == alone


def test_n_samples_compute_their_prompt_once(tmp_path):
    """With n > 1 the other samples, scheduled in the same step, take sample 0's blocks from the prefix cache: the
    prompt's full blocks are computed once, and the samples are what they are without prefix caching."""
    path = tiny_checkpoint(tmp_path, TINY_LITE)
    prompt = [(7 * i) % 400 + 2 for i in range(70)]  # 4 full blocks of 16 and 6 tokens
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=4, ignore_eos=True)
    results = {}
    for caching in (True, False):
        engine = LLM(model=path, kv_cache_memory=4_000_000, max_model_len=128, enable_prefix_caching=caching)
        batches = record_batches(engine)
        out = engine.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
        results[caching] = ([c.token_ids for c in out.outputs], sum(prefill_tokens(batches)))
    assert results[True][0] == results[False][0]
    assert results[False][1] == 3 * 70
    assert results[True][1] == 70 + 2 * (70 - 64)  # the 64 tokens of 4 full blocks once


def test_n_samples_with_prompt_logprobs_compute_their_prompt_once(tmp_path):
    """The prompt's log-probabilities are the first sample's: the others still take its blocks from the prefix
    cache (each would otherwise compute the whole prompt again to report values nobody reads)."""
    path = tiny_checkpoint(tmp_path, TINY_LITE)
    prompt = [(7 * i) % 400 + 2 for i in range(70)]  # 4 full blocks of 16 and 6 tokens
    engine = LLM(model=path, kv_cache_memory=4_000_000, max_model_len=128)
    batches = record_batches(engine)
    params = SamplingParams(n=3, temperature=0, max_tokens=2, prompt_logprobs=1, ignore_eos=True)
    out = engine.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
    assert sum(prefill_tokens(batches)) == 70 + 2 * 6  # the full blocks once, each sample's last 6 tokens
    alone = engine.generate(prompt_token_ids=[prompt], sampling_params=dataclasses.replace(params, n=1),
                            use_tqdm=False)[0]
    assert len(out.prompt_logprobs) == 70 and out.prompt_logprobs[0] is None
    assert [e[t].logprob for e, t in zip(out.prompt_logprobs[1:], prompt[1:], strict=True)] == pytest.approx(
        [e[t].logprob for e, t in zip(alone.prompt_logprobs[1:], prompt[1:], strict=True)], abs=1e-5)


def test_running_answers_decode_between_prefill_steps(tmp_path):
    """A long prompt in chunks (or a stream of new prompts) takes every other step at most: the answers already
    running decode in between, and the outputs are those of one request at a time."""
    path = tiny_checkpoint(tmp_path, TINY_LITE)
    engine = LLM(model=path, kv_cache_memory=4_000_000, max_model_len=256, max_num_batched_tokens=32)
    batches = record_batches(engine)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    short, long = [5, 6, 7], [(3 * i) % 300 + 2 for i in range(150)]  # the long one: 5 chunks of 32 tokens
    engine.engine.add_request("short", short, params)
    engine.engine.step()  # the short prompt's prefill: it now decodes
    engine.engine.add_request("long", long, params)
    outputs = {}
    while engine.engine.has_unfinished_requests():
        outputs.update({o.request_id: o.outputs[0].token_ids for o in engine.engine.step() if o.finished})
    kinds = ["prefill" if b.is_prefill else "decode" for b in batches]
    assert kinds.count("prefill") == 1 + 5 and "prefill,prefill" not in ",".join(kinds), kinds  # chunks between decodes
    assert outputs["short"] == one(engine, params, short).token_ids
    assert outputs["long"] == one(engine, params, long).token_ids


def test_extreme_values_fail_alone_or_are_served(llm, monkeypatch):
    """A huge top_k is served (capped at the vocabulary); a seed past 2**63 - n is refused up front; a request whose
    samples cannot all be made leaves none of them queued."""
    assert len(one(llm, SamplingParams(top_k=10**20, top_p=0.5, max_tokens=2, seed=1)).token_ids) == 2
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**63 - 1, n=2)
    assert SamplingParams(seed=2**63 - 2, n=2).seed == 2**63 - 2
    from dsv2.engine import engine as engine_module

    start = engine_module.SamplingRow.start

    def second_sample_fails(params, *args, **kwargs):
        if params.seed == 8:
            raise ValueError("no generator for you")
        return start(params, *args, **kwargs)

    monkeypatch.setattr(engine_module.SamplingRow, "start", second_sample_fails)
    with pytest.raises(ValueError, match="no generator"):
        llm.engine.add_request("half", PROMPT, SamplingParams(n=2, seed=7, max_tokens=2))
    assert not llm.engine.scheduler.waiting and not llm.engine.has_unfinished_requests()


def test_prompts_of_one_step_share_their_common_blocks_and_a_failed_step_shares_nothing(tmp_path):
    """Blocks enter the prefix cache as their step is scheduled: prompts with a common 64-token prefix, submitted
    together, compute it once. A step that fails takes its blocks back out: the next call may not reuse blocks
    that were never written."""
    path = tiny_checkpoint(tmp_path, TINY_LITE)
    engine = LLM(model=path, kv_cache_memory=4_000_000, max_model_len=128)
    common = [(5 * i) % 300 + 2 for i in range(64)]  # 4 full blocks of 16
    prompts = [[*common, 7 + i, 8, 9] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    alone = [one(engine, params, p).token_ids for p in prompts]
    fresh = LLM(model=path, kv_cache_memory=4_000_000, max_model_len=128)
    run = fresh.engine.runner.run

    def failing(*args):
        raise RuntimeError("out of memory, say")

    fresh.engine.runner.run = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        fresh.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert not fresh.engine.blocks.cached  # nothing of the failed step stays shareable
    fresh.engine.runner.run = run
    batches = record_batches(fresh)
    together = fresh.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert prefill_tokens(batches)[0] == 67 + 3 * 3  # the common 64 tokens once, then each prompt's own 3


def test_default_sampling_params_come_from_the_checkpoints_generation_config(tmp_path):
    """As vLLM: generate() without SamplingParams samples with generation_config.json's settings (those that differ
    from transformers' defaults; max_new_tokens as max_tokens), unless LLM(generation_config="vllm")."""
    folder = tiny_checkpoint(tmp_path, TINY_LITE)
    (folder / "generation_config.json").write_text(
        '{"do_sample": true, "temperature": 0.3, "top_p": 0.95, "top_k": 50, "max_new_tokens": 5}')
    llm = LLM(model=folder, kv_cache_memory=4_000_000, max_model_len=128)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.max_tokens) == (0.3, 0.95, 0, 5)
    out = llm.generate(prompt_token_ids=[PROMPT], use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 or out.finish_reason == "stop"
    assert llm.get_default_sampling_params() is not llm.get_default_sampling_params()  # a copy each time
    plain = LLM(model=folder, kv_cache_memory=4_000_000, max_model_len=128, generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()


def test_a_tiny_temperature_is_greedy_and_eos_ends_before_stop_token_ids(llm):
    greedy = one(llm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    tiny = one(llm, SamplingParams(temperature=1e-38, max_tokens=8, ignore_eos=True, logprobs=1))
    assert tiny.token_ids == greedy.token_ids  # logits / 1e-38 overflowed: NaN probabilities drew token 0
    eos = llm.get_tokenizer().eos_token_id
    ended = one(llm, SamplingParams(temperature=0, max_tokens=8, logit_bias={eos: 100}, stop_token_ids=[eos]))
    assert (ended.token_ids, ended.finish_reason, ended.stop_reason) == ([eos], "stop", None)  # as vLLM


@pytest.mark.parametrize(("settings", "message"), [
    ({"block_size": 0}, "block_size=0 must be an integer >= 1"),
    ({"max_num_seqs": 0}, "max_num_seqs=0 must be an integer >= 1"),
    ({"max_model_len": 0}, "max_model_len=0 must be an integer >= 1"),
])
def test_engine_sizes_are_checked_before_use(settings, message):
    with pytest.raises(ValueError, match=message):
        LLM(model="unused", **settings)


@pytest.mark.parametrize(("settings", "field"), [
    ({"temperature": "0.5"}, "temperature"), ({"stop": 5}, "stop"), ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"n": True}, "n"), ({"logprobs": True}, "logprobs"), ({"top_p": None}, "top_p"),
])
def test_wrongly_typed_sampling_params_name_their_field(settings, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} = ") as error:
        SamplingParams(**settings)
    assert error.value.field == field


def test_prompts_of_the_wrong_type_are_named(llm):
    with pytest.raises(TypeError, match="prompts must be a string, a dict or a list of them, got int"):
        llm.generate(5, use_tqdm=False)


def test_chat_can_continue_the_final_assistant_message(llm):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "I am"}]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    [out] = llm.chat(messages, params, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)
    tok = llm.get_tokenizer()
    assert out.prompt_token_ids == tok.apply_chat_template(messages, continue_final_message=True)
    assert tok.decode(out.prompt_token_ids).endswith("Assistant: I am")  # left open, no EOS after it
