"""Training checkpoints: a complete model folder (official layout, loadable anywhere) plus the trainer's state.

``OUT/checkpoints/step-00001000/`` holds config.json, model.safetensors, the tokenizer files and trainer_state.pt
(optimizer, step, data position, random states). A checkpoint is written into a hidden temporary folder and renamed
into place only when complete, so a crash or a kill mid-save leaves the previous checkpoints as they were; only the
last ``keep_last`` are kept.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoint_dirs(out)
    return found[-1] if found else None


def copy_tokenizer(source: Path | None, target: Path) -> None:
    if source is None:
        return
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    tokenizer_dir: Path | None, keep_last: int) -> Path:
    """Write step ``step`` atomically (temp folder + rename), then drop all but the newest ``keep_last``."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp, dtype=torch.float32)  # master weights, exact for resuming
    copy_tokenizer(tokenizer_dir, tmp)
    torch.save(state, tmp / STATE_FILE)
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out)[:-keep_last]:
        shutil.rmtree(old)
    for stale in root.glob(".step-*.tmp-*"):  # left by runs that were killed mid-save
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
