"""Training checkpoints: a complete model folder (official layout, loadable anywhere) plus the trainer's state.

``OUT/checkpoints/step-00001000/`` holds config.json, model.safetensors, the tokenizer files, trainer_state.pt (step,
data position, settings) and one rank-NNNNN.pt per rank (its optimizer state and random state). A checkpoint is
written into a hidden staging folder and renamed into place only when every file is there, so a crash or a kill
mid-save leaves the previous checkpoints as they were; only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def resume_hint(checkpoint: Path) -> str:
    """What to do about a checkpoint that cannot be read."""
    return f"remove {checkpoint} to resume from the checkpoint before it (or give another --out to start over)"


def checkpoint_step(checkpoint: Path) -> int:
    """The step of a checkpoint folder, from its name."""
    match = STEP_DIR.match(checkpoint.name)
    assert match, f"{checkpoint} is not a checkpoint folder"
    return int(match.group(1))


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


def staging_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f".step-{step:08d}.tmp"


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.pt"


def copy_tokenizer(source: Path | None, target: Path) -> None:
    if source is None:
        return
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def commit(out: Path, staging: Path, step: int, keep_last: int) -> Path:
    """Move a fully written staging folder into place, then drop older checkpoints and torn stagings."""
    final = out / "checkpoints" / f"step-{step:08d}"
    replaced = None
    if final.exists():  # a checkpoint of the same step from an earlier attempt: kept until the new one is in place
        replaced = final.with_name(f".{final.name}.replaced.tmp")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    if replaced is not None:
        shutil.rmtree(replaced)
    for old in checkpoint_dirs(out)[:-keep_last]:
        shutil.rmtree(old)
    for torn in (out / "checkpoints").glob(".step-*.tmp"):  # left by runs killed mid-save
        shutil.rmtree(torn, ignore_errors=True)
    return final


def load_state(checkpoint: Path, rank: int | None = None) -> dict[str, Any]:
    """The trainer's state, or (with ``rank``) that rank's optimizer and random state; a missing or unreadable file
    is named, with what to do about it."""
    path = checkpoint / STATE_FILE if rank is None else rank_file(checkpoint, rank)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing from the checkpoint; {resume_hint(checkpoint)}") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torn or not a torch file
        why = str(e).split(". ")[0]  # torch's first sentence: "PytorchStreamReader failed reading zip archive: ..."
        raise ValueError(f"{path}: not a readable checkpoint file ({why}); {resume_hint(checkpoint)}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint file (it holds a {type(state).__name__}); "
                         f"{resume_hint(checkpoint)}")
    return state
