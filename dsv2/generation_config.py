"""GenerationConfig: a checkpoint's generation defaults (``generation_config.json``), as transformers names them."""

from __future__ import annotations

import dataclasses
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv2.json_files import read_json_object, type_mismatch

# transformers' generation_config.json fields that change what generate returns but that dsv2 does not implement,
# with the value that means "off": another value is ignored with a warning that names it.
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "min_length": 0, "min_new_tokens": None,
    "no_repeat_ngram_size": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "penalty_alpha": None,
    "diversity_penalty": 0.0, "encoder_repetition_penalty": 1.0, "bad_words_ids": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
    "exponential_decay_length_penalty": None, "guidance_scale": None, "max_time": None, "stop_strings": None,
    "renormalize_logits": False, "top_h": None,
}
# transformers' hub arguments of from_pretrained: they mean nothing for a local folder.
HUB_ARGUMENTS = frozenset({"trust_remote_code", "revision", "cache_dir", "force_download", "local_files_only",
                           "token", "proxies", "subfolder", "_from_pipeline", "_from_auto"})


@dataclass
class GenerationConfig:
    """Generation defaults of a checkpoint (``generation_config.json``), with transformers' field names and defaults.

    ``generate`` starts from the model's generation_config and lets keyword arguments override it. Setting a field
    dsv2 lacks (``config.num_beams = 4``) is an AttributeError rather than a value generate would never read.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None  # transformers': prompt included; max_new_tokens wins where both are set
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 50
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.__dataclass_fields__:
            raise AttributeError(f"GenerationConfig has no field {name!r}: dsv2's generate reads only "
                                 f"{', '.join(self.__dataclass_fields__)}")
        super().__setattr__(name, value)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> GenerationConfig:
        """Read generation_config.json from a checkpoint folder (defaults where the folder has none); keyword
        arguments override its fields, as in transformers. transformers' hub arguments (``trust_remote_code``,
        ``revision``, ...) are accepted and ignored; other names are a TypeError."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"GenerationConfig.from_pretrained: {folder} is not a checkpoint folder")
        hints = typing.get_type_hints(cls)
        overrides = {k: v for k, v in kwargs.items() if k not in HUB_ARGUMENTS}
        unknown = sorted(set(overrides) - set(hints))
        if unknown:
            raise TypeError(f"GenerationConfig.from_pretrained got unsupported arguments: {', '.join(unknown)} "
                            f"(fields: {', '.join(hints)})")
        file = folder / "generation_config.json"
        data: dict[str, Any] = {}
        if file.exists():  # null: unset, the default (as transformers reads it)
            data = {k: v for k, v in read_json_object(file).items() if v is not None}
            _warn_unsupported(data, file)
        for name, value in {**data, **overrides}.items():
            if name in hints and value is not None and (problem := type_mismatch(value, hints[name])):
                where = f"{file}: field" if name not in overrides else "GenerationConfig.from_pretrained:"
                raise ValueError(f"{where} {name!r} = {value!r}: {problem}")
        return cls(**{k: v for k, v in {**data, **overrides}.items() if k in hints})

    def generate_kwargs(self) -> dict[str, Any]:
        """The fields that are set, as keyword arguments of `generate`."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "bos_token_id"}


def _warn_unsupported(data: dict[str, Any], file: Path) -> None:
    """A warning naming the fields of ``data`` that would change transformers' results but that dsv2 ignores."""
    ignored = [f"{name}={value!r}" for name, value in data.items()
               if name in UNSUPPORTED_FIELDS and value != UNSUPPORTED_FIELDS[name]]
    if ignored:
        warnings.warn(f"{file}: {', '.join(ignored)} not supported by dsv2's generate and ignored (transformers "
                      "would use them)", stacklevel=3)
