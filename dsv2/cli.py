"""The ``dsv2`` command: one subcommand per job, each a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsv2.config import DTYPES, PRESETS, ModelConfig


def load_config(path_or_preset: str) -> tuple[ModelConfig, str]:
    """A preset name or a checkpoint folder / config.json → (config, display name)."""
    if path_or_preset in PRESETS:
        return ModelConfig.preset(path_or_preset), f"preset {path_or_preset}"
    path = Path(path_or_preset)
    if not path.exists():
        raise SystemExit(f"dsv2: {path_or_preset!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    return ModelConfig.from_pretrained(path), str(path)


def cmd_info(args: argparse.Namespace) -> None:
    from dsv2.info import format_summary

    config, name = load_config(args.model)
    print(format_summary(config, name, DTYPES[args.dtype]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv2", description="DeepSeek-V2 in readable PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="config summary, parameter counts and KV-cache size per token")
    info.add_argument("model", help=f"a checkpoint folder, a config.json, or a preset ({', '.join(PRESETS)})")
    info.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="cache dtype for the byte counts")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: config/weights problems name the file and field
        print(f"dsv2 {args.command}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
