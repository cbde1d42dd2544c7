"""Checkpoint I/O in the official layout: safetensors (one file, or shards + ``model.safetensors.index.json``).

The only difference between checkpoint keys and our parameter names is the routed experts: checkpoints hold one tensor
per expert (``mlp.experts.{e}.gate_proj.weight`` [I, H]), the model one stacked parameter (``mlp.experts.gate_proj``
[E, I, H]). `checkpoint_layout` is that mapping table, used both ways.

Loading reads each file through a memory map, tensor by tensor, copying straight into the preallocated parameters; the
map is closed and reopened every `REMAP_BYTES` so the file pages it touched stop counting towards resident memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from dsv2.json_files import read_json

SAFETENSORS_SINGLE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
PICKLE_SINGLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
STACKED_EXPERTS = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<proj>gate_proj|up_proj|down_proj)$")
IGNORED_KEYS = re.compile(r"rotary_emb\.inv_freq$")  # buffers some old exports saved; recomputed here
REMAP_BYTES = 64 * 2**20
PROGRESS_BYTES = 2**30


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the tensor."""


@dataclass(frozen=True)
class Slot:
    """Where a checkpoint tensor lives in the model: a parameter, or one expert of a stacked parameter."""

    param: str
    expert: int | None = None


def checkpoint_layout(model: nn.Module) -> dict[str, Slot]:
    """Checkpoint key → model slot, in the model's order (tied weights appear once, under their first name)."""
    layout = {}
    for name, param in model.named_parameters():
        match = STACKED_EXPERTS.match(name)
        if match is None:
            layout[name] = Slot(name)
            continue
        for e in range(param.shape[0]):
            layout[f"{match['prefix']}.{e}.{match['proj']}.weight"] = Slot(name, e)
    return layout


def _target(params: dict[str, nn.Parameter], slot: Slot) -> torch.Tensor:
    param = params[slot.param]
    return param if slot.expert is None else param[slot.expert]


# ------------------------------------------------------------------------------------------------------------ loading
def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint folder, checking that every shard its index names exists."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a checkpoint folder (expected config.json and model*.safetensors)")
    for index_name, single_name, pickled in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE, False),
                                             (PICKLE_INDEX, PICKLE_SINGLE, True)):
        index, single = folder / index_name, folder / single_name
        if not (index.exists() or single.exists()):
            continue
        if pickled and not allow_pickle:
            found = index_name if index.exists() else single_name
            raise WeightsError(f"{folder} holds only pickled weights ({found}); "
                               "unpickling can run arbitrary code, so pass allow_pickle=True only if you trust them")
        if not index.exists():
            return [single]
        weight_map = _read_weight_map(index)
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise WeightsError(f"{index} names shard(s) that are not in {folder}: {', '.join(missing)}")
        return shards
    raise FileNotFoundError(f"{folder}: no weights found (expected {SAFETENSORS_SINGLE}, or shards listed in "
                            f"{SAFETENSORS_INDEX})")


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's weight_map (tensor name → shard file name), checked: every shard a plain name in the folder."""
    data = read_json(index, WeightsError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index}: not a valid index file (expected an object with a 'weight_map' object of "
                           f"tensor name → file name)")
    for key, name in weight_map.items():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise WeightsError(f"{index}: weight_map[{key!r}] = {name!r}: expected the name of a file in "
                               f"{index.parent}")
    return weight_map


class _SafetensorsFile:
    """One safetensors file: header at construction, tensors on demand, the memory map renewed every REMAP_BYTES."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None
        self._mapped_bytes = 0
        with self._open() as f:
            self.shapes = {k: list(f.get_slice(k).get_shape()) for k in f.offset_keys()}

    def _open(self):
        try:
            return safe_open(self.path, framework="pt", device="cpu")
        except SafetensorError as e:
            raise WeightsError(f"{self.path}: not a readable safetensors file, truncated or corrupt ({e})") from None
        except OSError as e:
            raise WeightsError(f"{self.path}: cannot be opened ({e})") from None

    def get(self, key: str, index: tuple | None = None) -> torch.Tensor:
        """The tensor, or only its ``index`` slice (read without reading the rest)."""
        if self._handle is None or self._mapped_bytes > REMAP_BYTES:
            self.close()
            self._handle = self._open()
            self._handle.__enter__()
        tensor = self._handle.get_tensor(key) if index is None else self._handle.get_slice(key)[index]
        self._mapped_bytes += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._mapped_bytes = None, 0


class _PickleFile:
    """A pytorch_model*.bin file, loaded with weights_only=True and memory-mapped (only with allow_pickle)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise WeightsError(f"{path}: cannot be read as a PyTorch weights file ({e})") from None
        self.shapes = {k: list(v.shape) for k, v in self._tensors.items()}

    def get(self, key: str, index: tuple | None = None) -> torch.Tensor:
        return self._tensors[key] if index is None else self._tensors[key][index]

    def close(self) -> None:
        self._tensors = {}


def _check_keys_and_shapes(files: list, layout: dict[str, Slot], params: dict[str, nn.Parameter],
                           folder: Path) -> None:
    """Compare every file's header with the model before any data is read; raise one error listing all problems."""
    problems, seen = [], {}
    for file in files:
        for key, shape in file.shapes.items():
            if IGNORED_KEYS.search(key):
                continue
            if key in seen:
                problems.append(f"{key}: in both {seen[key].name} and {file.path.name}")
                continue
            seen[key] = file.path
            if key not in layout:
                problems.append(f"{key} in {file.path.name}: unexpected tensor (not part of this config's model)")
                continue
            expected = list(_target(params, layout[key]).shape)
            if shape != expected:
                problems.append(f"{key} in {file.path.name}: shape {shape} in the file, but config.json implies "
                                f"{expected}")
    problems += [f"{key}: missing from every weight file" for key in layout if key not in seen]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise WeightsError(f"{folder}: the weights do not match config.json ({len(problems)} problem(s)):\n  {shown}")


def load_weights(model: nn.Module, folder: str | Path, progress: bool | None = None, allow_pickle: bool = False,
                 full_model: nn.Module | None = None, place=None) -> None:
    """Fill ``model``'s parameters (any dtype/device) from a checkpoint folder, one tensor at a time.

    For a shard of a model (tensor parallelism), ``full_model`` is the unsharded model (on the meta device: its
    names and shapes are checked against the checkpoint) and ``place(slot, file_shape)`` returns where a checkpoint
    tensor goes: None to skip it, or (target tensor, index of the slice to read).
    """
    folder = Path(folder)
    paths = weight_files(folder, allow_pickle)
    files = []
    try:
        for path in paths:
            files.append((_PickleFile if path.suffix == ".bin" else _SafetensorsFile)(path))
        layout = checkpoint_layout(full_model or model)
        _check_keys_and_shapes(files, layout, dict((full_model or model).named_parameters()), folder)
        params = dict(model.named_parameters())
        if place is None:
            def place(slot: Slot, shape: list[int]) -> tuple[torch.Tensor, tuple | None]:
                return _target(params, slot), None
        work = [(file, _copies(file, layout, place)) for file in files]
        total = sum(len(copies) for _, copies in work)
        show = sum(p.stat().st_size for p in paths) >= PROGRESS_BYTES if progress is None else progress
        with torch.no_grad(), tqdm(total=total, unit="tensor", desc="loading weights", disable=not show) as bar:
            for file, copies in work:
                for key, target, index in copies:
                    target.copy_(file.get(key, index))
                    bar.update(1)
                file.close()  # unmap what this file's reads touched before the next file's
    finally:
        for file in files:
            file.close()


def _copies(file, layout: dict[str, Slot], place) -> list[tuple[str, torch.Tensor, tuple | None]]:
    """(key, target, index) for every tensor of ``file`` that this model loads (ignored and skipped keys left out)."""
    copies = []
    for key, shape in file.shapes.items():
        where = place(layout[key], shape) if key in layout else None  # after the key check, only ignored keys miss
        if where is not None:
            copies.append((key, *where))
    return copies


# ------------------------------------------------------------------------------------------------------------- saving
def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"max_shard_size={size!r}: expected bytes as an int or a string like '5GB'")
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    return int(float(match[1]) * units[(match[2] or "").lower()])


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i:05d}-of-{count:06d}.safetensors" for i in range(1, count + 1)]  # the official spelling


def _plan_shards(layout: dict[str, Slot], params: dict[str, nn.Parameter], max_bytes: int,
                 dtype: torch.dtype) -> list[list[str]]:
    shards, current, current_bytes = [], [], 0
    for key, slot in layout.items():
        nbytes = _target(params, slot).numel() * dtype.itemsize
        if current and current_bytes + nbytes > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += nbytes
    return [*shards, current] if current else shards


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def _staging_dir(folder: Path) -> Iterator[Path]:
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_weights(model: nn.Module, folder: str | Path, max_shard_size: int | str = "5GB",
                 dtype: torch.dtype | None = None) -> None:
    """Write config.json, the model's generation_config.json and the weights in the official layout.

    Everything is written to a staging folder first and moved into place only when complete, so a failed save (full
    disk, interrupted process) leaves the previous checkpoint in ``folder`` intact.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layout = checkpoint_layout(model)
    params = dict(model.named_parameters())
    dtype = dtype or next(iter(params.values())).dtype
    shards = _plan_shards(layout, params, parse_size(max_shard_size), dtype)
    names = _shard_names(len(shards))
    config = model.config.replace(torch_dtype=str(dtype).removeprefix("torch."))
    with _staging_dir(folder) as staging, torch.no_grad():
        weight_map, total_size = {}, 0
        for name, keys in zip(names, shards, strict=True):
            tensors = {}
            for key in keys:
                tensor = _target(params, layout[key]).detach()
                # an expert is a view into its stacked parameter: copy it so safetensors sees separate storage
                tensors[key] = tensor.to("cpu", dtype, copy=layout[key].expert is not None).contiguous()
                total_size += tensors[key].numel() * tensors[key].element_size()
                weight_map[key] = name
            save_file(tensors, staging / name, metadata={"format": "pt"})
            os.chmod(staging / name, _new_file_mode())  # safetensors writes 0600; a checkpoint is for sharing
            del tensors
        written = [*names, "config.json"]
        if len(names) > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (staging / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            written.append(SAFETENSORS_INDEX)
        config.save_pretrained(staging)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:  # as transformers: always, the fields that differ from the defaults
            (staging / GENERATION_CONFIG).write_text(
                json.dumps(_non_default_fields(generation_config), indent=2) + "\n", encoding="utf-8")
            written.append(GENERATION_CONFIG)
        stale = [p.name for p in folder.glob("model*.safetensors*") if p.name not in written]
        _swap_in(staging, folder, written, stale)


def _swap_in(staging: Path, folder: Path, written: list[str], stale: list[str]) -> None:
    """Move the ``written`` files from ``staging`` into ``folder`` and drop the ``stale`` ones (weight files of the
    checkpoint this one replaces). The previous files are moved aside first and put back if any move fails (or is
    interrupted), so the folder never holds a mix of old and new shards under one index."""
    previous = staging / ".previous"
    previous.mkdir()
    moved_aside, moved_in = [], []
    try:
        for name in [*written, *stale]:
            if (folder / name).exists():
                os.replace(folder / name, previous / name)
                moved_aside.append(name)
        for name in written:
            os.replace(staging / name, folder / name)
            moved_in.append(name)
    except BaseException:
        for name in moved_in:
            (folder / name).unlink(missing_ok=True)
        for name in moved_aside:
            os.replace(previous / name, folder / name)
        raise


def _non_default_fields(generation_config: object) -> dict:
    """A GenerationConfig's fields whose values differ from the defaults, as transformers writes them."""
    return {f.name: getattr(generation_config, f.name) for f in dataclasses.fields(generation_config)
            if getattr(generation_config, f.name) != f.default}
