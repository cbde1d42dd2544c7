"""GenerationConfig: a checkpoint's generation defaults (``generation_config.json``), as transformers names them."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv2.json_files import read_json, type_mismatch


@dataclass
class GenerationConfig:
    """Generation defaults of a checkpoint (``generation_config.json``), with transformers' field names and defaults.

    ``generate`` starts from the model's generation_config and lets keyword arguments override it.
    """

    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 50
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, **ignored: Any) -> GenerationConfig:
        """Read generation_config.json from a checkpoint folder; defaults where there is none."""
        file = Path(path) / "generation_config.json"
        if not file.exists():
            return cls()
        data = read_json(file)
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if v is not None}  # null: unset, the default (as transformers reads it)
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            if name in hints and (problem := type_mismatch(value, hints[name])):
                raise ValueError(f"{file}: field {name!r} = {value!r}: {problem}")
        return cls(**{k: v for k, v in data.items() if k in hints})

    def generate_kwargs(self) -> dict[str, Any]:
        """The fields that are set, as keyword arguments of `generate`."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "bos_token_id"}
