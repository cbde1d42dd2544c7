"""The JSON and text files dsv2 reads and writes: read with errors that name the file, values checked against
declared types, written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
               list: "a list", type(None): "null"}


def read_text(path: Path, error: type[ValueError] = ValueError) -> str:
    """The UTF-8 text of ``path``; a folder or undecodable bytes raise ``error`` naming the file (a missing file
    raises FileNotFoundError, for the caller to explain)."""
    try:
        return path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a file") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from None


def write_text_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file in the same folder and os.replace: an interrupt or a full
    disk mid-write leaves the previous file (or none), never a torn one."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # the permissions a plain write would give
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def read_json(path: Path, error: type[ValueError] = ValueError) -> Any:
    """The parsed JSON of ``path``, with `read_text`'s errors; malformed JSON raises ``error`` naming the file."""
    text = read_text(path, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def read_json_object(path: Path, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """`read_json` of a file that must hold a JSON object; anything else raises ``error`` naming the file."""
    data = read_json(path, error)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def type_mismatch(value: Any, hint: Any) -> str | None:
    """None if ``value`` (as parsed from JSON) fits the type ``hint``, else what was expected and what came, e.g.
    "expected a number, got str". An int fits a float; a bool is no int nor float."""
    if _fits(value, hint):
        return None
    return f"expected {_describe(hint)}, got {type(value).__name__}"


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is Any:
        return True
    if origin is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        *others, last = [_describe(arg) for arg in args]
        return f"{', '.join(others)} or {last}"
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    return _TYPE_NAMES.get(origin or hint, str(hint))
