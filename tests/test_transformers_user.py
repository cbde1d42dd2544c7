"""A transformers user's calls on dsv2's Tokenizer, GenerationConfig and generate, checked against transformers on the
same files (arguments that transformers honours must not be silently ignored)."""

import json
import shutil

import pytest
import torch

from dsv2 import DeepseekV2ForCausalLM, GenerationConfig, Tokenizer

from helpers import tiny_checkpoint

MESSAGES = [{"role": "user", "content": "hi"}]
TEXTS = ["a", "a b c d e"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), bos_token_id=0, eos_token_id=1)


@pytest.fixture(scope="module")
def model(checkpoint):
    return DeepseekV2ForCausalLM.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def tok(checkpoint):
    return Tokenizer.from_pretrained(checkpoint)


@pytest.fixture
def folder(checkpoint, tmp_path):
    """A copy of the checkpoint to edit."""
    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _transformers():
    return pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("kwargs", [
    {"padding_side": "right"}, {"add_bos_token": False}, {"model_max_length": 3}, {"truncation_side": "left"},
    {"pad_token": "<｜begin▁of▁sentence｜>"}, {"chat_template": "X{{ messages[0]['content'] }}"},
], ids=str)
def test_from_pretrained_arguments_override_the_config_like_transformers(checkpoint, kwargs):
    ours = Tokenizer.from_pretrained(checkpoint, trust_remote_code=True, use_fast=True, **kwargs)
    theirs = _transformers().AutoTokenizer.from_pretrained(checkpoint, **{"padding_side": "left", **kwargs})
    assert dict(ours(TEXTS, padding=True, truncation=True)) == dict(theirs(TEXTS, padding=True, truncation=True))
    assert ours.padding_side == kwargs.get("padding_side", "left")
    assert ours.apply_chat_template(MESSAGES, tokenize=False) == theirs.apply_chat_template(MESSAGES, tokenize=False)


def test_from_pretrained_refuses_unknown_arguments(checkpoint):
    with pytest.raises(TypeError, match=r"Tokenizer\.from_pretrained got unsupported arguments: spam"):
        Tokenizer.from_pretrained(checkpoint, spam=1)
    with pytest.raises(ValueError, match=r"padding_side='middle': expected 'left' or 'right'"):
        Tokenizer.from_pretrained(checkpoint, padding_side="middle")
    with pytest.raises(ValueError, match=r"Tokenizer\.from_pretrained: add_bos_token='no'"):
        Tokenizer.from_pretrained(checkpoint, add_bos_token="no")


def test_truncation_side_left_like_transformers(checkpoint, tok, monkeypatch):
    theirs = _transformers().AutoTokenizer.from_pretrained(checkpoint)
    monkeypatch.setattr(tok, "truncation_side", "left")
    theirs.truncation_side = "left"
    assert tok(TEXTS, truncation=True, max_length=3).input_ids == theirs(TEXTS, truncation=True, max_length=3).input_ids
    assert tok(TEXTS[1], max_length=3).input_ids[0] == tok.bos_token_id  # BOS kept


def test_padding_side_argument_of_call_and_chat_template_like_transformers(checkpoint, tok):
    theirs = _transformers().AutoTokenizer.from_pretrained(checkpoint)
    for side in ("left", "right"):
        assert dict(tok(TEXTS, padding=True, padding_side=side)) == dict(theirs(TEXTS, padding=True, padding_side=side))
        # transformers 5.2 passes apply_chat_template's padding_side to the template only (it pads on its
        # attribute's side); dsv2 pads on the side asked, as its __call__ does
        batch = [MESSAGES, MESSAGES * 2]
        texts = tok.apply_chat_template(batch, tokenize=False)
        assert tok.apply_chat_template(batch, padding=True, padding_side=side) == theirs(
            texts, add_special_tokens=False, padding=True, padding_side=side).input_ids
    assert tok.padding_side == "left"  # the attribute is left as it was


def test_apply_chat_template_takes_a_chat_template_and_refuses_options_it_lacks(checkpoint, tok):
    theirs = _transformers().AutoTokenizer.from_pretrained(checkpoint)
    template = "{{ messages[0]['content'] }}!"
    assert tok.apply_chat_template(MESSAGES, chat_template=template, tokenize=False) == "hi!" == \
        theirs.apply_chat_template(MESSAGES, chat_template=template, tokenize=False)
    assert tok.apply_chat_template(MESSAGES, chat_template=template) == tok.encode("hi!", add_special_tokens=False)
    assert tok.apply_chat_template(MESSAGES, tokenize=False).startswith(tok.bos_token)  # its own template again
    with pytest.raises(ValueError, match=r"return_assistant_tokens_mask=True is not supported"):
        tok.apply_chat_template(MESSAGES, return_assistant_tokens_mask=True, return_dict=True)
    with pytest.raises(ValueError, match=r"tokenizer_kwargs=.* is not supported"):
        tok.apply_chat_template(MESSAGES, tokenizer_kwargs={"add_special_tokens": True})


def test_encode_takes_return_tensors_and_truncation_like_transformers(checkpoint, tok):
    theirs = _transformers().AutoTokenizer.from_pretrained(checkpoint)
    text = TEXTS[1]
    assert torch.equal(tok.encode(text, return_tensors="pt"), theirs.encode(text, return_tensors="pt"))
    for kwargs in ({"truncation": True, "max_length": 3}, {"truncation": False, "max_length": 3}):
        assert tok.encode(text, **kwargs) == theirs.encode(text, **kwargs), kwargs
    with pytest.raises(TypeError, match=r"add_special_tokens must be a bool, got .b. \(text pairs are not supported\)"):
        tok.encode("a", "b")


# ----------------------------------------------------------------------------------------------- generation config
def test_max_length_of_generation_config_json_and_attribute_like_transformers(folder):
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "max_length": 9}))
    ours = DeepseekV2ForCausalLM.from_pretrained(folder)
    theirs = _transformers().AutoModelForCausalLM.from_pretrained(folder)
    prompt = torch.tensor([[0, 5, 6, 7, 8]])
    assert ours.generate(prompt, eos_token_id=None).tolist() == theirs.generate(prompt, eos_token_id=None).tolist()
    assert ours.generate(prompt, eos_token_id=None).shape == (1, 9)
    assert ours.generate(prompt, max_new_tokens=2).shape == (1, 7)  # the call's arguments beat the config
    assert ours.generate(prompt, max_length=7).shape == (1, 7)
    ours.generation_config.max_length = 6
    assert ours.generate(prompt, eos_token_id=None).shape == (1, 6)


def test_unsupported_generation_config_fields_are_not_silent(folder):
    (folder / "generation_config.json").write_text(json.dumps({"num_beams": 3, "min_new_tokens": 4,
                                                                "no_repeat_ngram_size": 0, "use_cache": True}))
    with pytest.warns(UserWarning, match=r"num_beams=3, min_new_tokens=4 not supported by dsv2's generate"):
        GenerationConfig.from_pretrained(folder)
    config = GenerationConfig()
    with pytest.raises(AttributeError, match=r"GenerationConfig has no field 'num_beams'"):
        config.num_beams = 4
    config.pad_token_id = 3  # the model card's line
    assert config.pad_token_id == 3


def test_generation_config_from_pretrained_takes_overrides_and_needs_a_folder(folder, tmp_path_factory):
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "do_sample": True}))
    config = GenerationConfig.from_pretrained(folder, max_new_tokens=7, temperature=0.5, trust_remote_code=True)
    theirs = _transformers().GenerationConfig.from_pretrained(folder, max_new_tokens=7, temperature=0.5)
    assert (config.max_new_tokens, config.temperature, config.do_sample) == (7, 0.5, True) == (
        theirs.max_new_tokens, theirs.temperature, theirs.do_sample)
    with pytest.raises(TypeError, match=r"unsupported arguments: num_beams"):
        GenerationConfig.from_pretrained(folder, num_beams=2)
    with pytest.raises(ValueError, match=r"'max_new_tokens' = 'x'"):
        GenerationConfig.from_pretrained(folder, max_new_tokens="x")
    missing = tmp_path_factory.mktemp("x") / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"no-such-model is not a checkpoint folder"):
        GenerationConfig.from_pretrained(missing)
    assert GenerationConfig.from_pretrained(missing.parent) == GenerationConfig()  # a folder without the file


# ------------------------------------------------------------------------------------------------------- generate
def test_none_arguments_mean_unset_as_in_transformers(model):
    prompt = torch.tensor([[0, 5, 6, 7]])
    want = model.generate(prompt, max_new_tokens=4, ignore_eos=True)
    got = model.generate(prompt, max_new_tokens=4, ignore_eos=True, top_p=None, top_k=None, temperature=None,
                         do_sample=None, repetition_penalty=None, max_length=None)
    assert torch.equal(got, want)


def test_max_new_tokens_below_one_names_the_argument(model):
    with pytest.raises(ValueError, match=r"max_new_tokens=0: must be an integer >= 1"):
        model.generate(torch.tensor([[0, 5]]), max_new_tokens=0)


def test_generation_config_argument_overrides_the_models(model):
    prompt = torch.tensor([[0, 5, 6, 7]])
    out = model.generate(prompt, generation_config=GenerationConfig(max_new_tokens=3, eos_token_id=None))
    assert out.shape == (1, 7)
    assert model.generate(prompt, generation_config=GenerationConfig(max_new_tokens=3), max_new_tokens=2,
                          ignore_eos=True).shape == (1, 6)
    with pytest.raises(TypeError, match=r"generation_config must be a dsv2\.GenerationConfig, got dict"):
        model.generate(prompt, generation_config={"max_new_tokens": 3})


def test_output_is_int64_whatever_the_prompts_dtype_like_transformers(model):
    out = model.generate(torch.tensor([[0, 5, 6, 7]], dtype=torch.int32), max_new_tokens=2, ignore_eos=True)
    assert out.dtype == torch.int64


def test_bad_inputs_name_the_argument(model):
    with pytest.raises(TypeError, match=r"input_ids must be a torch\.Tensor"):
        model.generate([[0, 5, 6]])
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of input_ids' shape \(1, 3\), got \(1, 2\)"):
        model.generate(torch.tensor([[0, 5, 6]]), attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"input_ids must hold integer token ids, got dtype torch\.float32"):
        model.generate(torch.tensor([[0.0, 5.0]]))


# ------------------------------------------------------------------------------------------------------- sampling
def test_generate_sets_the_min_p_floor_after_top_p_as_transformers(model, monkeypatch):
    """transformers applies min_p after top_k / top_p (the engine, as vLLM V1, before): of [.5, .3, .2] with top_p
    .6 and min_p .5 it keeps the first two tokens, where vLLM keeps the first alone."""
    from dsv2 import generate as generate_module
    from dsv2.sampling import SamplingParams, SamplingRow, filtered_probs
    transformers = _transformers()
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log()
    warped = transformers.MinPLogitsWarper(0.5)(None, transformers.TopPLogitsWarper(0.6)(None, logits.clone()))
    rows = [SamplingRow.start(SamplingParams(min_p=0.5, top_p=0.6), [])]
    ours = filtered_probs(logits, rows, min_p_first=False)
    assert torch.equal(ours > 0, warped.isfinite()) and ours[0].tolist() == pytest.approx([0.625, 0.375, 0, 0])
    seen = []
    real_sample = generate_module.sample
    monkeypatch.setattr(generate_module, "sample", lambda *a, **k: seen.append(k) or real_sample(*a, **k))
    model.generate(torch.tensor([[0, 5, 6]]), max_new_tokens=2, do_sample=True, min_p=0.1, seed=0)
    assert seen and all(k == {"min_p_first": False} for k in seen)
