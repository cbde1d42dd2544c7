"""ModelConfig: the DeepSeek-V2 hyper-parameters, read from and written to the official ``config.json``.

The field names are those of the official ``config.json`` (and of the Hugging Face remote code), so a config round-trips
unchanged. Two spellings of RoPE settings are accepted on input: the official ``rope_theta`` + ``rope_scaling`` (with
``type``) and transformers 5's ``rope_parameters`` (with ``rope_type`` and ``rope_theta`` inside); the official one is
written back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv2.json_files import read_json_object, type_mismatch

MODEL_TYPE = "deepseek_v2"
TOPK_METHODS = ("greedy", "group_limited_greedy")
ROPE_SCALING_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
# transformers 5 adds these to config.json; they are derived from the fields below, so they are not carried along.
DERIVED_KEYS = ("head_dim", "qk_head_dim", "rope_parameters", "dtype")
# sizes (and rope_theta, a logarithm's base) that must be > 0 when set
POSITIVE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "n_routed_experts", "moe_layer_freq", "ep_size",
                   "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                   "rope_theta")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16"}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype argument as vLLM and transformers take it: a torch.dtype, a name ("bfloat16", "half", ...), or
    None / "auto" (→ None: the checkpoint's own)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of auto, {', '.join([*DTYPES, *DTYPE_ALIASES])}")
    return DTYPES[name]


class ConfigError(ValueError):
    """A config.json value that is missing, malformed or not implemented; the message names the field."""


@dataclass
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V2 model. Defaults are those of the official remote code's configuration."""

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    # DeepSeekMoE
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    ep_size: int = 1
    # Multi-head Latent Attention
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # positions
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    # the rest
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    # config.json fields this project does not interpret (auto_map, architectures, ...), written back unchanged
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.topk_method == "gready":  # the remote code's misspelled default
            self.topk_method = "greedy"
        self.validate()

    # ----------------------------------------------------------------------------------------------- derived values
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: the compressed latent c_KV and the shared RoPE key k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times m² when YaRN sets mscale_all_dim (m = yarn_get_mscale(factor, mscale_all_dim))."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.get("mscale_all_dim"):
            m = yarn_get_mscale(self.rope_scaling["factor"], self.rope_scaling["mscale_all_dim"])
            scale = scale * m * m
        return scale

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype (``torch_dtype``), float32 when unset."""
        return DTYPES[self.torch_dtype] if self.torch_dtype else torch.float32

    # ------------------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(name: str, message: str) -> None:
            raise ConfigError(f"config field {name!r} = {getattr(self, name)!r}: {message}")

        for name, hint in _field_types().items():  # first, so that the checks below compare numbers with numbers
            if name != "extra" and (problem := type_mismatch(getattr(self, name), hint)):
                fail(name, problem)
        for name in POSITIVE_FIELDS:
            value = getattr(self, name)
            if value is not None and value <= 0:
                fail(name, "must be positive")
        for name in ("qk_nope_head_dim", "n_shared_experts", "first_k_dense_replace"):
            value = getattr(self, name)
            if value is not None and value < 0:
                fail(name, "must be >= 0")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.hidden_act != "silu":
            fail("hidden_act", "only 'silu' is implemented")
        if self.scoring_func != "softmax":
            fail("scoring_func", "only 'softmax' is implemented (DeepSeek-V2); 'sigmoid' is DeepSeek-V3's gate")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"expected one of {TOPK_METHODS}")
        if self.torch_dtype is not None and self.torch_dtype not in DTYPES:
            fail("torch_dtype", f"expected one of {sorted(DTYPES)}")
        if self.n_routed_experts is not None:
            if not self.num_experts_per_tok or not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                fail("num_experts_per_tok", f"must be between 1 and n_routed_experts = {self.n_routed_experts}")
            if self.topk_method == "group_limited_greedy":
                if not self.n_group or self.n_routed_experts % self.n_group:
                    fail("n_group", f"must divide n_routed_experts = {self.n_routed_experts}")
                if not self.topk_group or not 0 < self.topk_group <= self.n_group:
                    fail("topk_group", f"must be between 1 and n_group = {self.n_group}")
                kept = self.topk_group * (self.n_routed_experts // self.n_group)
                if self.num_experts_per_tok > kept:
                    fail("num_experts_per_tok", f"exceeds the {kept} experts in the topk_group best groups")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                raise ConfigError(f"config field 'rope_scaling' has type {kind!r}: only 'yarn' (or no scaling) is "
                                  "implemented")
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ConfigError(f"config field 'rope_scaling' lacks {key!r}, which YaRN needs")
            for key in ROPE_SCALING_KEYS:
                value = self.rope_scaling.get(key, 1)
                if problem := type_mismatch(value, float):
                    raise ConfigError(f"config field 'rope_scaling' has {key!r} = {value!r}: {problem}")
                if key in ("factor", "original_max_position_embeddings") and value <= 0:
                    raise ConfigError(f"config field 'rope_scaling' has {key!r} = {value!r}: must be positive")

    # ----------------------------------------------------------------------------------------- config.json format
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a parsed config.json (official, remote-code or transformers-5 layout)."""
        data = dict(data)
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(f"config field 'model_type' = {model_type!r}: dsv2 implements {MODEL_TYPE!r} only")
        rope_parameters = data.pop("rope_parameters", None)
        if rope_parameters is not None and not isinstance(rope_parameters, dict):
            raise ConfigError(f"config field 'rope_parameters' = {rope_parameters!r}: expected an object or null")
        if rope_parameters:  # transformers 5: rope_theta and the scaling settings live in one dict
            rope = dict(rope_parameters)
            data.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            kind = rope.pop("rope_type", None) or rope.pop("type", "default")
            rope.pop("type", None)
            if kind != "default" and data.get("rope_scaling") is None:
                data["rope_scaling"] = {"type": kind, **rope}
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data["dtype"]
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k not in DERIVED_KEYS}
        if kwargs.get("rope_scaling") is not None:
            kwargs["rope_scaling"] = _normalize_rope_scaling(kwargs["rope_scaling"])
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The official config.json layout (``rope_theta`` + ``rope_scaling`` with ``type``)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data = {"architectures": ["DeepseekV2ForCausalLM"], **self.extra, "model_type": MODEL_TYPE, **data}
        if data["rope_scaling"] is not None:
            data["rope_scaling"] = dict(data["rope_scaling"])
        return dict(sorted(data.items()))

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = read_json_object(path, ConfigError)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file (a checkpoint folder needs a config.json)") from None
        try:
            return cls.from_dict(data)
        except TypeError as e:  # a field of the wrong kind, e.g. a string where a number belongs
            raise ConfigError(f"{path}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` from a checkpoint folder (or the file itself)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such checkpoint folder or config.json")
        return cls.from_json_file(path / "config.json" if path.is_dir() else path)

    def save_pretrained(self, folder: str | Path) -> Path:
        path = Path(folder) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """``"v2-lite"`` and ``"v2"`` (the official values) or ``"nano"`` (tiny, for tests and the bundled model)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict(PRESETS[name])

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


@functools.cache
def _field_types() -> dict[str, Any]:
    """ModelConfig's field name → declared type (the annotations, evaluated)."""
    return typing.get_type_hints(ModelConfig)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction, 0.1·mscale·ln(scale) + 1 (1 when the context is not stretched)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _normalize_rope_scaling(rope_scaling: Any) -> dict[str, Any]:
    if not isinstance(rope_scaling, dict):
        raise ConfigError(f"config field 'rope_scaling' = {rope_scaling!r}: expected an object or null")
    rope = {k: v for k, v in rope_scaling.items() if v is not None}  # null: unset, the setting's default
    kind = rope.pop("type", None) or rope.pop("rope_type", None)
    rope.pop("rope_type", None)
    rope.pop("rope_theta", None)
    return {"type": kind, **rope}


_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
         "mscale": 0.707, "mscale_all_dim": 0.707}
_OFFICIAL = {
    "vocab_size": 102400, "num_key_value_heads": None, "n_shared_experts": 2, "num_experts_per_tok": 6,
    "scoring_func": "softmax", "norm_topk_prob": False, "aux_loss_alpha": 0.001, "seq_aux": True,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128, "v_head_dim": 128, "rope_theta": 10000, "rope_scaling": _YARN,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "bos_token_id": 100000, "eos_token_id": 100001,
    "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16",
}
PRESETS: dict[str, dict[str, Any]] = {
    "v2-lite": {
        **_OFFICIAL, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 27, "num_attention_heads": 16, "n_routed_experts": 64, "topk_method": "greedy",
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "q_lora_rank": None,
    },
    "v2": {
        **_OFFICIAL, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
        "num_hidden_layers": 60, "num_attention_heads": 128, "n_routed_experts": 160,
        "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3, "routed_scaling_factor": 16.0,
        "q_lora_rank": 1536,
    },
    # Tiny but complete: a dense first layer, MoE with shared + routed experts, latent attention, YaRN.
    "nano": {
        **_OFFICIAL, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "n_shared_experts": 1, "n_routed_experts": 16,
        "num_experts_per_tok": 4, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "q_lora_rank": None, "kv_lora_rank": 64, "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32, "v_head_dim": 32, "max_position_embeddings": 8192,
        "rope_scaling": {**_YARN, "factor": 4, "original_max_position_embeddings": 2048},
        "bos_token_id": 0, "eos_token_id": 1,
    },
}
