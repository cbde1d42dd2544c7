"""TrainConfig: every setting of a training run, from a TOML file and/or command-line flags.

Defaults are the paper's recipe for V2-Lite (section 5 of the reference): AdamW β = (0.9, 0.95), weight decay 0.1,
gradient clipping at 1.0, init std 0.006, warm-up over 2,000 steps to 4.2e-4, ×0.316 after 80% and 90% of training,
sequence length 4K, expert-level balance loss α1 = 0.001.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv2.config import DTYPE_ALIASES, DTYPES, PRESETS, ModelConfig
from dsv2.json_files import type_mismatch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class TrainConfigError(ValueError):
    """A training setting of the wrong type or out of range; ``name`` is the setting."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass
class TrainConfig:
    # the model: a preset ("nano", "v2-lite", "v2") or a checkpoint folder to continue from
    model: str = "nano"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # config.json fields to change (presets only)
    tokenizer: str | None = None  # folder with tokenizer.json, copied into checkpoints (default: the model folder)
    init_std: float = 0.006
    # data (from `dsv2 tokenize`)
    data: str = ""
    seq_len: int = 4096
    val_fraction: float = 0.01
    # batch: sequences per optimizer step, split over ranks and micro-batches (gradient accumulation)
    batch_size: int = 4608
    micro_batch_size: int = 1
    # length: optimizer steps, training tokens (steps = tokens / (batch_size · seq_len)) or epochs over the data
    steps: int | None = None
    train_tokens: int | None = None
    epochs: float | None = None
    # optimizer and schedule
    lr: float = 4.2e-4
    warmup_steps: int = 2000
    decay_at: list[float] = field(default_factory=lambda: [0.8, 0.9])
    decay_factor: float = 0.316
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    aux_loss_alpha: float | None = None  # expert-level balance loss α1 (default: the model config's)
    # expert-parallel extras (section 5): device-level α2, communication α3, device-limited routing to M devices
    device_balance_alpha: float = 0.0
    comm_balance_alpha: float = 0.0
    device_limit: int | None = None
    # device-level token dropping (expert parallel): each rank computes at most this factor × the average load of
    # the assignments it receives, the lowest-affinity ones dropped (the paper: 1.0); None: off. The share
    # token_drop_protected of the sequences (evenly spaced in the batch; the paper: ~10%) is never dropped.
    token_drop_capacity: float | None = None
    token_drop_protected: float = 0.1
    # precision: bfloat16 autocast over float32 master weights, or plain float32
    precision: str = "bfloat16"
    # output
    out: str = "runs/train"
    save_every: int = 1000
    keep_last: int = 3
    eval_every: int = 200
    eval_sequences: int = 64
    log_every: int = 10
    export_dtype: str = "bfloat16"  # dtype of the final model in out/model
    seed: int = 0
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    # distributed (torchrun)
    data_parallel: str = "ddp"  # "ddp" or "fsdp"
    expert_parallel: int = 1  # ranks the routed experts are spread over (1 = replicated)
    # SFT: chat JSONL instead of a token file; loss on assistant tokens only
    sft_data: str | None = None

    def validate(self) -> None:
        """Every field against its declared type, then the ranges and combinations; a `TrainConfigError` naming the
        first setting that is wrong."""

        def fail(name: str, rule: str) -> None:
            raise TrainConfigError(name, f"train config {name} = {getattr(self, name)!r}: {rule}")

        for name, hint in _field_types().items():  # first, so that the checks below compare numbers with numbers
            if problem := type_mismatch(getattr(self, name), hint):
                fail(name, problem)
        if not self.data and not self.sft_data:
            fail("data", "give a token file from `dsv2 tokenize` (or chat JSONL for sft)")
        if self.steps is None and self.train_tokens is None and self.epochs is None:
            fail("steps", "give steps, train_tokens or epochs")
        for name in ("seq_len", "batch_size", "micro_batch_size", "save_every", "eval_every", "log_every",
                     "keep_last", "max_bad_steps", "expert_parallel", "steps", "train_tokens", "device_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                fail(name, "must be >= 1")
        for name in ("warmup_steps", "eval_sequences"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        for name in ("lr", "init_std", "decay_factor", "epochs"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                fail(name, "must be a positive number")
        if not self.grad_clip > 0:  # clipping at 0 would zero every gradient, below 0 flip them
            fail("grad_clip", "must be > 0 (the maximum gradient norm; the paper uses 1.0)")
        for name in ("weight_decay", "aux_loss_alpha", "device_balance_alpha", "comm_balance_alpha"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:
                fail(name, "must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                fail(name, "must be in [0, 1)")
        if self.batch_size % self.micro_batch_size:
            fail("batch_size", f"must be a multiple of micro_batch_size = {self.micro_batch_size}")
        if self.precision not in ("bfloat16", "float32"):
            fail("precision", "'bfloat16' (autocast, fp32 master weights) or 'float32'")
        if self.export_dtype not in DTYPES and self.export_dtype not in DTYPE_ALIASES:
            fail("export_dtype", f"one of {', '.join([*DTYPES, *DTYPE_ALIASES])}")
        if self.data_parallel not in ("ddp", "fsdp"):
            fail("data_parallel", "'ddp' or 'fsdp'")
        if not 0 <= self.val_fraction < 1:
            fail("val_fraction", "must be in [0, 1)")
        if any(not 0 < f <= 1 for f in self.decay_at):
            fail("decay_at", "fractions of training in (0, 1]")
        if self.token_drop_capacity is not None:
            if not self.token_drop_capacity > 0:
                fail("token_drop_capacity", "must be > 0 (the paper uses 1.0)")
            if self.expert_parallel < 2:
                fail("token_drop_capacity", "device-level token dropping needs expert_parallel >= 2")
        for name in ("device_limit", "device_balance_alpha", "comm_balance_alpha"):
            if getattr(self, name) and self.expert_parallel < 2:
                fail(name, "device-limited routing and the device-level losses need expert_parallel >= 2")
        if not 0 <= self.token_drop_protected <= 1:
            fail("token_drop_protected", "a fraction of the sequences in [0, 1]")
        if self.model_overrides and self.model not in PRESETS:
            fail("model_overrides", f"apply to a preset ({', '.join(PRESETS)}) only; model = {self.model!r} is a "
                 "checkpoint, whose config.json decides the model (and its weights fit only that config)")
        model_fields = sorted(f.name for f in dataclasses.fields(ModelConfig) if f.name != "extra")
        for key in self.model_overrides:
            if key not in model_fields:
                close = difflib.get_close_matches(key, model_fields, n=3)
                hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "see a config.json for them"
                fail("model_overrides", f"{key!r} is not a model config field: {hint}")

    def total_steps(self, num_train_sequences: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.train_tokens is not None:
            return max(1, self.train_tokens // (self.batch_size * self.seq_len))
        return max(1, math.ceil(self.epochs * num_train_sequences / self.batch_size))

    @classmethod
    def load(cls, path: str | Path | None = None, defaults: dict[str, Any] | None = None,
             **overrides: Any) -> TrainConfig:
        """``defaults`` (a command's own, e.g. SFT's), then a TOML file's settings (flat keys, or grouped in
        tables), then ``overrides`` (flags that were given): each layer wins over the one before."""
        values: dict[str, Any] = dict(defaults or {})
        from_file: set[str] = set()
        if path is not None:
            try:
                raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: no such training config") from None
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not valid TOML ({e})") from None
            for key, value in raw.items():
                if isinstance(value, dict) and key != "model_overrides":
                    values.update(value)  # [model], [data], [optim] ... tables are for readability only
                    from_file.update(value)
                else:
                    values[key] = value
                    from_file.add(key)
        values.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(unknown)}")
        config = cls(**values)
        try:
            config.validate()
        except TrainConfigError as e:  # a setting from the file (no flag over it): name the file too
            if path is not None and e.name in from_file and overrides.get(e.name) is None:
                raise TrainConfigError(e.name, f"{path}: {e}") from None
            raise
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def _field_types() -> dict[str, Any]:
    """TrainConfig's field name → declared type (the annotations, evaluated)."""
    return typing.get_type_hints(TrainConfig)
