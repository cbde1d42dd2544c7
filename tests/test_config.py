import json
import re

import pytest
import torch

from dsv2 import ConfigError, GenerationConfig, ModelConfig

# config.json of deepseek-ai/DeepSeek-V2-Lite as published (remote-code era layout).
OFFICIAL_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV2Config",
        "AutoModel": "modeling_deepseek.DeepseekV2Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}

# The same model as transformers 5 writes it.
TRANSFORMERS5_LITE = {
    **{k: v for k, v in OFFICIAL_LITE.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype", "auto_map")},
    "dtype": "bfloat16",
    "head_dim": 64,
    "qk_head_dim": 192,
    "transformers_version": "5.24.0",
    "rope_parameters": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                        "original_max_position_embeddings": 4096, "rope_theta": 10000, "rope_type": "yarn",
                        "type": "yarn"},
}


def test_official_config_round_trips_unchanged(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(OFFICIAL_LITE))
    config = ModelConfig.from_pretrained(tmp_path)
    assert config.q_lora_rank is None and config.n_routed_experts == 64 and config.kv_lora_rank == 512
    config.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written == {**OFFICIAL_LITE, "ep_size": 1, "pad_token_id": None}  # two remote-code defaults made explicit


def test_transformers5_layout_reads_as_the_official_one():
    official = ModelConfig.from_dict(OFFICIAL_LITE)
    v5 = ModelConfig.from_dict(TRANSFORMERS5_LITE)
    assert v5.rope_scaling == official.rope_scaling and v5.rope_theta == 10000
    assert v5.torch_dtype == "bfloat16"
    written = v5.to_dict()
    assert "rope_parameters" not in written and "head_dim" not in written and "dtype" not in written
    assert written["rope_scaling"]["type"] == "yarn" and written["rope_theta"] == 10000


def test_presets_equal_the_official_values():
    lite = ModelConfig.preset("v2-lite").to_dict()
    for key, value in OFFICIAL_LITE.items():
        if key not in ("auto_map", "transformers_version", "use_cache", "pretraining_tp", "initializer_range"):
            assert lite[key] == value, key
    v2 = ModelConfig.preset("v2")
    assert (v2.hidden_size, v2.num_hidden_layers, v2.num_attention_heads, v2.n_routed_experts) == (5120, 60, 128, 160)
    assert (v2.q_lora_rank, v2.topk_method, v2.n_group, v2.topk_group) == (1536, "group_limited_greedy", 8, 3)
    assert (v2.routed_scaling_factor, v2.intermediate_size, v2.moe_intermediate_size) == (16.0, 12288, 1536)
    nano = ModelConfig.preset("nano")
    assert nano.first_k_dense_replace == 1 and nano.n_shared_experts and nano.rope_scaling["type"] == "yarn"
    with pytest.raises(ValueError, match="unknown preset 'v3'"):
        ModelConfig.preset("v3")


def test_remote_code_quirks():
    cfg = {k: v for k, v in OFFICIAL_LITE.items() if k != "num_key_value_heads"}
    config = ModelConfig.from_dict({**cfg, "topk_method": "gready"})
    assert config.topk_method == "greedy"
    assert config.num_key_value_heads == 16
    assert ModelConfig.from_dict({**cfg, "q_lora_rank": 1536}).q_lora_rank == 1536


def test_softmax_scale_includes_mscale_squared():
    config = ModelConfig.preset("v2-lite")
    m = 0.1 * 0.707 * __import__("math").log(40) + 1
    assert m == pytest.approx(1.2608038, abs=1e-7)
    assert config.softmax_scale == pytest.approx(192**-0.5 * m * m)
    assert config.softmax_scale == pytest.approx(0.1147214, abs=1e-7)
    assert ModelConfig.from_dict({**OFFICIAL_LITE, "rope_scaling": None}).softmax_scale == 192**-0.5
    assert config.latent_dim == 576


@pytest.mark.parametrize(("change", "field"), [
    ({"model_type": "llama"}, "model_type"),
    ({"scoring_func": "sigmoid"}, "scoring_func"),
    ({"topk_method": "noaux_tc"}, "topk_method"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "yarn", "factor": 40}}, "rope_scaling"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
    ({"hidden_size": "2048"}, "hidden_size"),
    ({"num_experts_per_tok": 65}, "num_experts_per_tok"),
    ({"topk_method": "group_limited_greedy", "n_group": 5, "topk_group": 2}, "n_group"),
    ({"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 9}, "topk_group"),
    ({"topk_method": "group_limited_greedy", "n_group": 16, "topk_group": 1}, "num_experts_per_tok"),
    ({"torch_dtype": "float8"}, "torch_dtype"),
])
def test_unsupported_values_name_the_field(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.from_dict({**OFFICIAL_LITE, **change})


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**OFFICIAL_LITE, "scoring_func": "sigmoid"}))
    with pytest.raises(ConfigError, match=r"config\.json: .*'scoring_func'"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**OFFICIAL_LITE, "kv_lora_rank": None}))
    with pytest.raises(ConfigError, match=r"config\.json: .*'kv_lora_rank'"):
        ModelConfig.from_pretrained(tmp_path)


def test_dtype_names_as_vllm_and_transformers_take_them():
    from dsv2.config import parse_dtype

    assert parse_dtype("half") is torch.float16 and parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("auto") is None and parse_dtype(None) is None and parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="dtype='bfloat61' is not one of auto, float32"):
        parse_dtype("bfloat61")


YARN_LITE = OFFICIAL_LITE["rope_scaling"]


@pytest.mark.parametrize(("change", "error"), [
    ({"rms_norm_eps": "1e-6"}, "'rms_norm_eps' = '1e-6': expected a number, got str"),
    ({"rope_theta": "10000"}, "'rope_theta' = '10000': expected a number"),
    ({"rope_scaling": {**YARN_LITE, "factor": "4"}}, "'rope_scaling' has 'factor' = '4': expected a number"),
    ({"rope_scaling": {**YARN_LITE, "mscale": True}}, "'rope_scaling' has 'mscale' = True: expected a number"),
    ({"rope_scaling": {**YARN_LITE, "factor": 0}}, "'rope_scaling' has 'factor' = 0: must be positive"),
    ({"first_k_dense_replace": "1"}, "'first_k_dense_replace' = '1': expected an integer, got str"),
    ({"first_k_dense_replace": -1}, "'first_k_dense_replace' = -1: must be >= 0"),
    ({"intermediate_size": "10944"}, "'intermediate_size' = '10944': expected an integer"),
    ({"intermediate_size": 10944.0}, "'intermediate_size' = 10944.0: expected an integer, got float"),
    ({"intermediate_size": -1}, "'intermediate_size' = -1: must be positive"),
    ({"moe_intermediate_size": "1408"}, "'moe_intermediate_size' = '1408': expected an integer"),
    ({"moe_intermediate_size": 0}, "'moe_intermediate_size' = 0: must be positive"),
    ({"n_shared_experts": "2"}, "'n_shared_experts' = '2': expected an integer or null, got str"),
    ({"n_shared_experts": -2}, "'n_shared_experts' = -2: must be >= 0"),
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' = 'false': expected true or false, got str"),
    ({"attention_bias": 0}, "'attention_bias' = 0: expected true or false, got int"),
    ({"qk_nope_head_dim": "128"}, "'qk_nope_head_dim' = '128': expected an integer"),
    ({"n_routed_experts": "64"}, "'n_routed_experts' = '64': expected an integer or null"),
    ({"num_experts_per_tok": "6"}, "'num_experts_per_tok' = '6': expected an integer or null"),
    ({"num_key_value_heads": True}, "'num_key_value_heads' = True: expected an integer or null, got bool"),
    ({"eos_token_id": "100001"}, "'eos_token_id' = '100001': expected an integer, a list of integers or null"),
    ({"eos_token_id": [100001, None]}, r"'eos_token_id' = \[100001, None\]: expected an integer, a list of integers"),
    ({"torch_dtype": 16}, "'torch_dtype' = 16: expected a string or null, got int"),
    ({"rope_parameters": "yarn"}, "'rope_parameters' = 'yarn': expected an object or null"),
])
def test_wrong_typed_fields_name_the_file_field_and_value(tmp_path, change, error):
    (tmp_path / "config.json").write_text(json.dumps({**OFFICIAL_LITE, **change}))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(tmp_path / 'config.json'))}: config field {error}"):
        ModelConfig.from_pretrained(tmp_path)


def test_json_numbers_and_nulls_the_official_files_use_are_accepted():
    config = ModelConfig.from_dict({**OFFICIAL_LITE, "rms_norm_eps": 1, "routed_scaling_factor": 16, "rope_theta": 1e4,
                                    "n_shared_experts": None, "num_key_value_heads": None, "eos_token_id": [1, 2],
                                    "pad_token_id": None, "torch_dtype": None, "rope_scaling": None})
    assert (config.rms_norm_eps, config.routed_scaling_factor, config.num_key_value_heads) == (1, 16, 16)
    assert ModelConfig.from_dict({**OFFICIAL_LITE, "n_shared_experts": 0}).n_shared_experts == 0


def test_unreadable_files_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(json.dumps({**OFFICIAL_LITE, "architectures": ["é"]}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: not UTF-8 text \(.*byte 0xe9"):
        ModelConfig.from_pretrained(tmp_path)
    path.unlink()
    path.mkdir()
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: is a folder, not a file"):
        ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(("content", "error"), [
    ("[]", "expected a JSON object, got list"),
    ('{"temperature": "hot"}', "field 'temperature' = 'hot': expected a number or null, got str"),
    ('{"top_k": 5.5}', "field 'top_k' = 5.5: expected an integer, got float"),
    ('{"do_sample": "true"}', "field 'do_sample' = 'true': expected true or false or null, got str"),
    ('{"eos_token_id": ["1"]}', r"field 'eos_token_id' = \['1'\]: expected an integer, a list of integers or null"),
    ("{not json", "not valid JSON"),
    (b'{"temperature": "\xe9"}', "not UTF-8 text"),
])
def test_bad_generation_config_names_the_file_and_field(tmp_path, content, error):
    path = tmp_path / "generation_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {error}"):
        GenerationConfig.from_pretrained(tmp_path)


def test_generation_config_accepts_what_the_official_file_holds(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "_from_model_config": True, "bos_token_id": 100000, "eos_token_id": 100001, "do_sample": True,
        "temperature": 0.3, "top_p": 0.95, "transformers_version": "4.39.3"}))
    config = GenerationConfig.from_pretrained(tmp_path)
    assert (config.do_sample, config.temperature, config.top_p, config.eos_token_id) == (True, 0.3, 0.95, 100001)
    (tmp_path / "generation_config.json").write_text('{"temperature": 1, "eos_token_id": [1, 2], "top_k": 0}')
    assert GenerationConfig.from_pretrained(tmp_path).temperature == 1


def test_nulls_mean_unset_in_rope_scaling_and_generation_config(tmp_path):
    """A null there is transformers' "not set": the default, not an error."""
    yarn = {**OFFICIAL_LITE["rope_scaling"], "mscale": None, "beta_fast": None}
    config = ModelConfig.from_dict({**OFFICIAL_LITE, "rope_scaling": yarn})
    assert "mscale" not in config.rope_scaling and "beta_fast" not in config.rope_scaling
    assert config.rope_scaling["factor"] == OFFICIAL_LITE["rope_scaling"]["factor"]
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.3, "top_p": null, "top_k": null}')
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert (loaded.temperature, loaded.top_p, loaded.top_k) == (0.3, GenerationConfig().top_p, GenerationConfig().top_k)
