"""The run's metrics log (JSON lines) and its plots (PNG, matplotlib)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from dsv2.json_files import read_text, write_text_atomically

log = logging.getLogger("dsv2.train")


class MetricsLog:
    """Appends one JSON object per line to OUT/metrics.jsonl; a resumed run keeps appending (and on resume, lines
    beyond the checkpoint's step are dropped, so the log matches the run that is continued: the file is rewritten
    atomically, and a torn last line, from a crash mid-write, is dropped with a warning)."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            kept = [json.dumps(r) for r in self.read(drop_torn_end=True) if r.get("step", 0) <= resume_step]
            write_text_atomically(path, "".join(line + "\n" for line in kept))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        """Append a record; a non-finite number (a skipped step's loss) is written as null: JSON has no NaN."""
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(finite, allow_nan=False) + "\n")

    def read(self, drop_torn_end: bool = False) -> list[dict[str, Any]]:
        """The records; a line that is not a JSON object raises a ValueError naming the file and line, except (with
        ``drop_torn_end``) a last one, which is dropped with a warning."""
        if not self.path.exists():
            return []
        lines = read_text(self.path).splitlines()
        records = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                record, problem = None, f"not valid JSON ({e})"
            else:
                problem = None if isinstance(record, dict) else f"expected an object, got {type(record).__name__}"
            if problem is None:
                records.append(record)
            elif drop_torn_end and n == len(lines):
                log.warning("%s:%d: dropping a torn last line (%s), left by a run that stopped mid-write",
                            self.path, n, problem)
            else:
                raise ValueError(f"{self.path}:{n}: {problem}; fix or remove that line")
        return records


def plot_metrics(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """loss, learning rate, grad norm, balance loss, tokens/s and the per-layer expert load heatmap, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    written = []

    def series(name: str, ylabel: str, extra=None, log_y: bool = False) -> None:
        points = [(r["step"], r[name]) for r in train if r.get(name) is not None]
        if not points:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*points, strict=True), label=f"train {name}" if extra else None)
        if extra:
            extra(ax)
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    def with_val(ax) -> None:
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
        if val and val[-1].get("unigram_entropy") is not None:
            ax.axhline(val[-1]["unigram_entropy"], color="gray", ls="--", label="unigram entropy (validation)")

    series("loss", "cross-entropy (nats/token)", with_val)
    series("lr", "learning rate")
    series("grad_norm", "gradient norm (before clipping)", log_y=True)
    series("balance_loss", "expert balance loss")
    series("tokens_per_s", "training tokens / s")
    loads = [r for r in records if r.get("expert_load")]
    if loads:
        load = loads[-1]["expert_load"]  # [moe layers][experts], fractions of the routed assignments
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(load) + 1.5))
        image = ax.imshow(load, aspect="auto", cmap="viridis")
        ax.set_xlabel("routed expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"expert load at step {loads[-1]['step']} (share of routed tokens)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = folder / "expert_load.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
