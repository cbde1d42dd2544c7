"""GenerationConfig: a checkpoint's generation defaults (``generation_config.json``), as transformers names them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def generate_kwargs(self) -> dict[str, Any]:
        """The fields that are set, as keyword arguments of `generate`."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "bos_token_id"}
