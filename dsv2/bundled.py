"""The bundled model: a tiny DeepSeek-V2-architecture chat model trained by dsv2, used when no model is given."""

from __future__ import annotations

from pathlib import Path

BUNDLED_NAME = "dsv2-nano-chat"
BUNDLED_PATH = Path(__file__).resolve().parents[1] / "models" / BUNDLED_NAME  # in a source checkout


def bundled_model() -> Path | None:
    """The bundled model's folder, if this installation has it."""
    return BUNDLED_PATH if (BUNDLED_PATH / "config.json").exists() else None


def resolve_model(model: str | Path | None) -> Path:
    """``model`` as a path; the bundled model when it is None."""
    if model is not None:
        return Path(model)
    bundled = bundled_model()
    if bundled is None:
        raise ValueError(f"no model given, and the bundled model is not installed (expected at {BUNDLED_PATH}); "
                         "pass a checkpoint folder")
    return bundled
