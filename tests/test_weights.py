import io
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv2.weights
from dsv2 import DeepseekV2ForCausalLM, WeightsError
from dsv2.weights import parse_size

from helpers import TINY_V2, tiny_model


@pytest.fixture
def model():
    return tiny_model(TINY_V2)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_single_file_round_trip_with_official_key_names(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    keys = set(safe_open(tmp_path / "model.safetensors", "pt").keys())
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in keys  # experts one by one, as published
    assert "model.layers.1.mlp.experts.down_proj" not in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys and "model.layers.1.self_attn.q_a_layernorm.weight" in keys
    # embed/norm/lm_head + 3 layers × (2 norms + 7 attention) + dense MLP (3) + 2 × (gate + 16 × 3 experts + 3 shared)
    assert len(keys) == 3 + 3 * 9 + 3 + 2 * (1 + 16 * 3 + 3)
    assert_same_weights(DeepseekV2ForCausalLM.from_pretrained(tmp_path), model)
    umask = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "shared")
    finally:
        os.umask(umask)
    assert {(p.name, p.stat().st_mode & 0o777) for p in (tmp_path / "shared").iterdir()} == {
        ("config.json", 0o644), ("generation_config.json", 0o644),
        ("model.safetensors", 0o644)}  # readable by others, like any file written


def test_sharded_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    assert shards[0] == f"model-00001-of-{len(shards):06d}.safetensors"  # the official six-digit total
    assert sum(os.path.getsize(tmp_path / s) for s in shards) >= index["metadata"]["total_size"]
    assert_same_weights(DeepseekV2ForCausalLM.from_pretrained(tmp_path), model)


def test_dtype_follows_the_checkpoint_unless_asked(model, tmp_path):
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    bf16 = DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    fp32 = DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(fp32.model.layers[1].mlp.experts.up_proj, bf16.model.layers[1].mlp.experts.up_proj.float())


def rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_tensors_are_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    rewrite(file, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight: missing"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    rewrite(file, lambda t: t.update({"model.layers.9.mlp.gate.weight": torch.zeros(16, 64)}))
    with pytest.raises(WeightsError, match=r"model\.layers\.9\.mlp\.gate\.weight in model\.safetensors: unexpected"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)


def test_config_that_does_not_match_the_weights(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "kv_lora_rank": 48}))
    with pytest.raises(WeightsError, match=r"kv_b_proj\.weight in model\.safetensors: shape \[160, 32\] in the file, "
                                           r"but config\.json implies \[160, 48\]"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    with pytest.raises(WeightsError, match=r"model\.layers\.3\.input_layernorm\.weight: missing"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)


def test_missing_truncated_and_corrupt_files_are_named(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    shard = tmp_path / "model-00002-of-{:06d}.safetensors".format(len(list(tmp_path.glob("model-*"))))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=rf"{shard.name}: not a readable safetensors file, truncated or corrupt"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    shard.write_bytes(b"\x07" * 64)
    with pytest.raises(WeightsError, match=rf"{shard.name}: not a readable safetensors file"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    shard.unlink()
    with pytest.raises(WeightsError, match=rf"index\.json names shard\(s\) that are not in .*: {shard.name}"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(WeightsError, match=r"index\.json: not a valid index file"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    for path in tmp_path.glob("model*"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere: no such checkpoint folder"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(("index", "error"), [
    (b'{"weight_map": []}', "not a valid index file"),
    (b'{"weight_map": {"lm_head.weight": 5}}', r"weight_map\['lm_head\.weight'\] = 5: expected the name of a file in"),
    (b'{"weight_map": {"lm_head.weight": null}}', r"weight_map\['lm_head\.weight'\] = None: expected the name"),
    (b'{"weight_map": {"lm_head.weight": "."}}', r"weight_map\['lm_head\.weight'\] = '\.': expected the name"),
    (b'{"weight_map": {"lm_head.weight": "../x.safetensors"}}', r".* = '\.\./x\.safetensors': expected the name"),
    (b'{"weight_map": {"lm_head.weight": "\xe9.safetensors"}}', r"not UTF-8 text \(.*byte 0xe9"),
])
def test_bad_index_files_are_named(model, tmp_path, index, error):
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    path = tmp_path / "model.safetensors.index.json"
    path.write_bytes(index)
    with pytest.raises(WeightsError, match=rf"{re.escape(str(path))}: {error}"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)


def test_a_shard_that_cannot_be_opened_is_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    shard.unlink()
    shard.mkdir()
    with pytest.raises(WeightsError, match=rf"{re.escape(str(shard))}: cannot be opened \("):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)


def mapped(folder) -> bool:
    """Whether any file of ``folder`` is memory-mapped into this process."""
    with open("/proc/self/maps") as f:
        return str(folder) in f.read()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_a_load_that_fails_midway_leaves_no_file_open(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    params, calls = dict(model.named_parameters()), []

    def place(slot, shape):
        calls.append(slot)
        if len(calls) == 20:  # a target that cannot take the tensor: copy_ fails with a file open
            return torch.empty(3, 5), None
        return dsv2.weights._target(params, slot), None

    with pytest.raises(RuntimeError) as failure:
        dsv2.weights.load_weights(model, tmp_path, place=place)
    assert not mapped(tmp_path), failure.value  # with the traceback, and so the loader's frames, still alive


def test_progress_counts_only_the_tensors_loaded(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path)
    rewrite(tmp_path / "model.safetensors",
            lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))  # ignored on load
    bars, real_tqdm = [], dsv2.weights.tqdm

    def recording_tqdm(**kwargs):
        bars.append(real_tqdm(**kwargs, file=io.StringIO()))
        return bars[-1]

    params = dict(model.named_parameters())
    experts_skipped = []

    def place(slot, shape):  # like a tensor-parallel rank: skip the odd experts
        if slot.expert is not None and slot.expert % 2:
            experts_skipped.append(slot)
            return None
        return dsv2.weights._target(params, slot), None

    monkeypatch.setattr(dsv2.weights, "tqdm", recording_tqdm)
    dsv2.weights.load_weights(model, tmp_path, progress=True, place=place)
    loaded = len(dsv2.weights.checkpoint_layout(model)) - len(experts_skipped)
    assert experts_skipped and bars[0].total == bars[0].n == loaded


def test_pickled_weights_need_explicit_permission(model, tmp_path):
    model.save_pretrained(tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"pickled weights.*allow_pickle=True"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    assert_same_weights(DeepseekV2ForCausalLM.from_pretrained(tmp_path, allow_pickle=True), model)


def test_a_failed_save_keeps_the_last_good_checkpoint(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = tiny_model(TINY_V2)
    with torch.no_grad():
        other.lm_head.weight.add_(1.0)
    calls = []

    def failing_save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(dsv2.weights, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(tmp_path, max_shard_size="50KB")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched, no staging folder left
    assert_same_weights(DeepseekV2ForCausalLM.from_pretrained(tmp_path), model)


def test_resaving_with_fewer_shards_removes_the_stale_ones(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    (tmp_path / "README.md").write_text("notes")  # other files of the folder are left alone
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "generation_config.json",
                                            "model.safetensors"]
    assert_same_weights(DeepseekV2ForCausalLM.from_pretrained(tmp_path), model)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    assert parse_size("1.5 MB") == 1_500_000
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        parse_size("lots")


def test_device_map_names_one_device_and_unknown_keywords_warn(model, tmp_path, monkeypatch, recwarn):
    from dsv2.model.transformer import device_from_map

    model.save_pretrained(tmp_path)
    for device_map in ("cpu", "auto", {"": "cpu"}, torch.device("cpu")):
        assert DeepseekV2ForCausalLM.from_pretrained(tmp_path, device_map=device_map).device.type == "cpu"
    assert device_from_map("cuda:1") == torch.device("cuda", 1) and device_from_map(0) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_from_map("auto") == torch.device("cuda")
    monkeypatch.undo()
    with pytest.raises(NotImplementedError, match=r"several devices.*dsv2\.engine"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path, device_map={"model.embed_tokens": "cpu", "lm_head": "cuda"})
    with pytest.raises(ValueError, match="disagree"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path, device="cpu", device_map="meta")
    with pytest.raises(ValueError, match="names no device"):
        DeepseekV2ForCausalLM.from_pretrained(tmp_path, device_map="gpu0")
    # transformers-only keywords are accepted quietly; anything else is named in a warning, not refused
    DeepseekV2ForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, low_cpu_mem_usage=True,
                                          attn_implementation="sdpa", revision="main")
    assert not [w for w in recwarn if "ignores" in str(w.message)]
    with pytest.warns(UserWarning, match="unknown keyword argument dtpye"):
        loaded = DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtpye=torch.bfloat16)
    assert loaded.dtype == torch.float32


def test_generation_config_survives_save_and_reload(model, tmp_path):
    model.generation_config.temperature, model.generation_config.top_p = 0.6, 0.95
    model.save_pretrained(tmp_path / "a")
    reloaded = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "a")
    assert reloaded.generation_config == model.generation_config
    reloaded.save_pretrained(tmp_path / "b")  # and once more, from a folder that had one
    again = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "b").generation_config
    assert (again.temperature, again.top_p) == (0.6, 0.95)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path / "b")
    assert (theirs.temperature, theirs.top_p, theirs.eos_token_id) == (0.6, 0.95, model.generation_config.eos_token_id)


def test_only_safetensors_are_written(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match="safetensors only: safe_serialization=False"):
        model.save_pretrained(tmp_path, safe_serialization=False)
