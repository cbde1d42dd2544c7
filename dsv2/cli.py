"""The ``dsv2`` command: one subcommand per job, each a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dsv2.config import DTYPES, PRESETS, ModelConfig


def load_config(path_or_preset: str) -> tuple[ModelConfig, str]:
    """A preset name or a checkpoint folder / config.json → (config, display name)."""
    if path_or_preset in PRESETS:
        return ModelConfig.preset(path_or_preset), f"preset {path_or_preset}"
    path = Path(path_or_preset)
    if not path.exists():
        raise SystemExit(f"dsv2: {path_or_preset!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    return ModelConfig.from_pretrained(path), str(path)


def load_model(args: argparse.Namespace):
    """The --model folder (or the bundled model) on --device in --dtype, with its tokenizer."""
    from dsv2.model import DeepseekV2ForCausalLM

    if args.model is None:
        raise SystemExit("dsv2: --model is required (a checkpoint folder with config.json, weights and tokenizer.json)")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    model = DeepseekV2ForCausalLM.from_pretrained(args.model, dtype=dtype, device=device)
    if model.tokenizer is None:
        raise SystemExit(f"dsv2: {args.model} has no tokenizer.json")
    return model


def generate_kwargs(args: argparse.Namespace) -> dict:
    """Sampling flags that were given; the rest comes from the checkpoint's generation_config.json."""
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "ignore_eos")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_generate(args: argparse.Namespace) -> None:
    from dsv2.generate import stream

    model = load_model(args)
    tokenizer = model.tokenizer
    if args.chat or args.system:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = tokenizer.apply_chat_template([*messages, {"role": "user", "content": args.prompt}],
                                               add_generation_prompt=True)
    else:
        prompt = tokenizer.encode(args.prompt)
    try:
        for delta in stream(model, tokenizer, prompt, **generate_kwargs(args)):
            print(delta, end="", flush=True)
    except KeyboardInterrupt:
        pass
    print()


def cmd_chat(args: argparse.Namespace) -> None:
    from dsv2.chat import ChatSession, run_repl

    model = load_model(args)
    run_repl(ChatSession(model, model.tokenizer, system=args.system, **generate_kwargs(args)))


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

    generate = commands.add_parser("generate", help="complete a prompt, streaming the text")
    generate.add_argument("prompt", help="the text to complete")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    add_model_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    chat = commands.add_parser("chat", help="interactive chat with history; /reset, /exit, Ctrl-C stops an answer")
    add_model_arguments(chat)
    chat.set_defaults(func=cmd_chat)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder (config.json, safetensors, tokenizer.json)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                        help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: generation_config)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true", default=None, help="keep going past end-of-sequence")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: config/weights problems name the file and field
        print(f"dsv2 {args.command}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
