"""What a vLLM user writes, run against dsv2's `LLM`: call patterns and arguments that were mishandled once (wrong
results, unclear errors, or vLLM arguments silently ignored though they would change the results)."""

import math

import pytest
import torch
from tqdm import tqdm

from dsv2 import LLM, SamplingParams
from dsv2.sampling import SamplingRow, filtered_probs

from helpers import TINY_LITE, tiny_checkpoint

PROMPT = [5, 17, 33, 60, 2, 9]
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("lite"), TINY_LITE)


@pytest.fixture(scope="module")
def llm(checkpoint):
    # vLLM arguments whose only value here is the one dsv2 does (raw logprobs, no sleep mode) are accepted
    return LLM(model=checkpoint, kv_cache_memory=4_000_000, max_model_len=128, max_logprobs=1000,
               logprobs_mode="raw_logprobs", enable_sleep_mode=False,
               override_generation_config={"temperature": 0.0, "max_new_tokens": 3})


def one(llm: LLM, params: SamplingParams, prompt: list[int] = PROMPT):
    return llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]


def test_sampling_params_of_the_wrong_type_are_named(llm):
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams or a list of them, got dict"):
        llm.generate("Hi", {"max_tokens": 2}, use_tqdm=False)
    with pytest.raises(TypeError, match=r"sampling_params\[1\] must be a SamplingParams, got dict"):
        llm.generate(["Hi", "Yo"], [SamplingParams(max_tokens=2), {"max_tokens": 2}], use_tqdm=False)
    assert len(one(llm, SamplingParams(max_tokens=2, **GREEDY)).outputs[0].token_ids) == 2


def test_prompt_token_ids_must_be_integers(llm):
    with pytest.raises(TypeError, match=r"prompts\[0\]\['prompt_token_ids'\] must hold token ids \(integers\), "
                                        r"got 1.5"):
        llm.generate({"prompt_token_ids": [1.5, 2.0]}, use_tqdm=False)  # was served as [1, 2]
    with pytest.raises(TypeError, match=r"prompts\[1\]\['prompt_token_ids'\] must be a list of token ids"):
        llm.generate([{"prompt_token_ids": [5]}, {"prompt_token_ids": None}], use_tqdm=False)
    with pytest.raises(TypeError, match=r"prompt_token_ids\[0\] must be a list of token ids \(integers\), got str"):
        llm.generate(prompt_token_ids=["abc"], use_tqdm=False)
    want = one(llm, SamplingParams(max_tokens=3, **GREEDY)).outputs[0].token_ids
    numpy_ids = torch.tensor(PROMPT).numpy()
    assert one(llm, SamplingParams(max_tokens=3, **GREEDY), numpy_ids).outputs[0].token_ids == want


def test_prompts_and_prompt_token_ids_together_are_refused(llm):
    with pytest.raises(ValueError, match="both prompts and prompt_token_ids"):
        llm.generate(["Hello"], prompt_token_ids=[PROMPT], use_tqdm=False)


def test_logprobs_beyond_the_vocabulary_are_the_whole_vocabulary(llm):
    vocab = llm.model.config.vocab_size
    out = one(llm, SamplingParams(max_tokens=2, logprobs=vocab + 88, prompt_logprobs=vocab + 88, **GREEDY))
    assert [len(entry) for entry in out.outputs[0].logprobs] == [vocab, vocab]  # was a RuntimeError mid-step
    assert len(out.prompt_logprobs[1]) == vocab
    assert math.isclose(sum(math.exp(e.logprob) for e in out.outputs[0].logprobs[0].values()), 1, rel_tol=1e-4)


def test_min_p_is_applied_before_top_p_as_in_vllm():
    """vLLM (V1) filters by min_p first, then takes the top_p nucleus of what is left: of [.5, .3, .2] min_p .5
    leaves [.625, .375], whose nucleus for top_p .6 is the first token alone."""
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    rows = [SamplingRow.start(SamplingParams(min_p=0.5, top_p=0.6), [])]
    assert filtered_probs(logits, rows).tolist() == [[1.0, 0.0, 0.0]]
    rows = [SamplingRow.start(SamplingParams(min_p=0.5), [])]  # min_p alone: unchanged
    assert filtered_probs(logits, rows)[0].tolist() == pytest.approx([0.625, 0.375, 0.0])


def test_logprobs_without_detokenize_have_no_decoded_token(llm):
    out = one(llm, SamplingParams(max_tokens=2, logprobs=2, prompt_logprobs=1, detokenize=False, **GREEDY))
    entries = [*out.outputs[0].logprobs, *out.prompt_logprobs[1:]]
    assert all(e.decoded_token is None for entry in entries for e in entry.values())  # as vLLM
    assert out.outputs[0].text == ""
    decoded = one(llm, SamplingParams(max_tokens=2, logprobs=2, **GREEDY)).outputs[0]
    assert all(e.decoded_token is not None for entry in decoded.logprobs for e in entry.values())


@pytest.mark.parametrize("setting", [{"quantization": "fp8"}, {"load_format": "dummy"}, {"task": "embed"},
                                     {"hf_overrides": {"max_position_embeddings": 64}}, {"runner": "pooling"},
                                     {"logprobs_mode": "processed_logprobs"}])
def test_vllm_arguments_that_would_change_the_results_are_refused(setting):
    """They were accepted and ignored: quantized or random weights, an edited config or pooling asked for, and the
    full-precision model's generation served instead."""
    name = next(iter(setting))
    with pytest.raises(ValueError, match=rf"LLM\({name}=.*\) is not supported"):
        LLM(model="unused", **setting)


def test_use_tqdm_may_be_the_progress_bar_class(llm):
    made = []

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    llm.generate(["Hi", "Yo"], SamplingParams(max_tokens=1), use_tqdm=Bar)
    assert len(made) == 1 and made[0]["total"] == 2


def test_sampling_params_clone_is_a_deep_copy():
    params = SamplingParams(stop=["x"], logit_bias={3: 1.0})
    copy = params.clone()
    copy.stop.append("y")
    assert copy == SamplingParams(stop=["x", "y"], logit_bias={3: 1.0}) and params.stop == ["x"]


def test_chat_reads_openai_style_text_parts(llm):
    params = SamplingParams(max_tokens=2, **GREEDY)
    plain = llm.chat([{"role": "user", "content": "Hi\nthere"}], params, use_tqdm=False)[0]
    parts = llm.chat([{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}],
                     params, use_tqdm=False)[0]
    assert parts.prompt_token_ids == plain.prompt_token_ids  # as vLLM: text parts joined by newlines
    assert parts.outputs[0].token_ids == plain.outputs[0].token_ids
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\]\[1\]: only text parts .* got 'image_url'"):
        llm.chat([{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]}], params,
                 use_tqdm=False)
    with pytest.raises(ValueError, match="chat_template_content_format='xml'"):
        llm.chat([{"role": "user", "content": "Hi"}], params, use_tqdm=False, chat_template_content_format="xml")


def test_prompt_dicts_with_other_inputs_are_refused(llm):
    with pytest.raises(ValueError, match=r"prompts\[0\]\['multi_modal_data'\] is not supported"):
        llm.generate({"prompt": "Hi", "multi_modal_data": {"image": object()}}, use_tqdm=False)  # was ignored
    with pytest.raises(TypeError, match=r"prompts\[0\]\['prompt'\] must be a string, got int"):
        llm.generate({"prompt": 5}, use_tqdm=False)
    salted = llm.generate({"prompt_token_ids": PROMPT, "cache_salt": "a", "multi_modal_data": None},
                          SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)[0]
    assert salted.outputs[0].token_ids == one(llm, SamplingParams(max_tokens=3, **GREEDY)).outputs[0].token_ids


def test_override_generation_config_sets_the_default_sampling_params(llm, checkpoint, caplog):
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens) == (0.0, 3)
    assert len(llm.generate("Hi", use_tqdm=False)[0].outputs[0].token_ids) <= 3
    with caplog.at_level("WARNING", logger="dsv2.engine"):
        plain = LLM(model=checkpoint, kv_cache_memory=4_000_000, max_model_len=128, generation_config="vllm",
                    override_generation_config={"top_k": 5, "do_sample": True})
    assert plain.get_default_sampling_params() == SamplingParams(top_k=5)
    assert "do_sample ignored" in caplog.text


@pytest.mark.parametrize("method", ["encode", "embed", "classify", "score", "reward", "beam_search"])
def test_vllms_pooling_and_beam_search_entry_points_say_they_are_not_offered(llm, method):
    with pytest.raises(NotImplementedError, match=rf"LLM.{method}\(\) is not offered by dsv2"):
        getattr(llm, method)(["Hi"])
