"""A user's view of an official-layout checkpoint folder: loading options, saving over it, and the CLI's flags."""

import json
import os

import pytest
import torch

import dsv2.weights
from dsv2 import DeepseekV2ForCausalLM
from dsv2.cli import build_parser, generate_kwargs, main

from helpers import TINY_LITE, TINY_V2, make_tokenizer_files, tiny_model


def official_folder(folder, base=TINY_LITE, generation_config=None):
    """Sharded bf16 safetensors + index, config.json with architectures/auto_map, tokenizer files and a
    generation_config.json, as the published DeepSeek-V2(-Lite)(-Chat) folders hold them."""
    tiny_model(base, vocab_size=512).save_pretrained(folder, max_shard_size="100KB", dtype=torch.bfloat16)
    make_tokenizer_files(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation_config = generation_config or {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
                                              "temperature": 0.3, "top_p": 0.95}
    (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


def contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), KeyboardInterrupt()])
@pytest.mark.parametrize("fail_at", [2, 5, 9])
def test_a_save_over_a_checkpoint_that_fails_while_moving_files_keeps_the_old_one(tmp_path, fail_at, error,
                                                                                   monkeypatch):
    folder = official_folder(tmp_path / "ckpt", TINY_V2)
    before = contents(folder)
    ids = torch.tensor([[5, 9, 33, 7]])
    reference = DeepseekV2ForCausalLM.from_pretrained(folder)(ids)
    other = DeepseekV2ForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for p in other.parameters():
            p.neg_()
    calls, replace = [], os.replace

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise error
        replace(src, dst)

    monkeypatch.setattr(dsv2.weights.os, "replace", failing_replace)
    with pytest.raises(type(error)):
        other.save_pretrained(folder, max_shard_size="100KB")  # the same shard names: old and new could mix
    monkeypatch.undo()
    assert contents(folder) == before  # every old file back, no new one, no staging folder
    assert torch.equal(DeepseekV2ForCausalLM.from_pretrained(folder)(ids), reference)


def test_dtype_and_torch_dtype_both_count(tmp_path):
    folder = official_folder(tmp_path)
    def loaded_dtype(dtype, torch_dtype):
        return DeepseekV2ForCausalLM.from_pretrained(folder, dtype=dtype, torch_dtype=torch_dtype).dtype

    assert loaded_dtype("auto", torch.float16) == torch.float16  # "auto" is no choice: torch_dtype's counts
    assert loaded_dtype(None, "auto") == torch.bfloat16
    assert loaded_dtype("bf16", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype=torch\.float32 and torch_dtype=torch\.float16, which disagree"):
        loaded_dtype(torch.float32, torch.float16)


@pytest.mark.parametrize("command", [["generate", "Hi"], ["chat"]])
def test_a_folder_without_tokenizer_json_is_refused_before_the_weights_are_read(tmp_path, monkeypatch, command):
    folder = official_folder(tmp_path)
    (folder / "tokenizer.json").unlink()

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(dsv2.weights, "load_weights", no_loading)
    with pytest.raises(SystemExit, match=f"dsv2 {command[0]}: .*has no tokenizer.json"):
        main([*command, "--model", str(folder)])


def test_sampling_flags_sample_on_a_base_models_greedy_generation_config(tmp_path, capsys):
    def kwargs(*flags):
        return generate_kwargs(build_parser().parse_args(["generate", "x", *flags]))

    for flag, value in (("--seed", "1"), ("--top-p", "0.9"), ("--top-k", "5"), ("--min-p", "0.1")):
        assert kwargs(flag, value)["do_sample"] is True
    assert "do_sample" not in kwargs("--seed", "1", "--temperature", "0")  # explicitly greedy stays greedy
    assert "do_sample" not in kwargs("--max-new-tokens", "3")
    # DeepSeek-V2-Lite (base) ships a generation_config.json without do_sample: greedy by default
    folder = official_folder(tmp_path, generation_config={"bos_token_id": 0, "eos_token_id": 1})
    outputs = []
    for seed in ("1", "2", "1"):
        main(["generate", "--model", str(folder), "Hello", "--max-new-tokens", "8", "--ignore-eos", "--seed", seed])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[2] and outputs[0] != outputs[1]  # --seed was not silently ignored
