"""The ``dsv2`` command: one subcommand per job, each a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from dsv2.config import DTYPES, PRESETS, ModelConfig, parse_dtype


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
    from dsv2.bundled import resolve_model
    from dsv2.model import DeepseekV2ForCausalLM

    path = resolve_model(args.model)
    if path.is_dir() and not (path / "tokenizer.json").is_file():  # before reading gigabytes of weights
        raise SystemExit(f"dsv2 {args.command}: {path} has no tokenizer.json (copy the checkpoint's tokenizer.json "
                         "and tokenizer_config.json into it)")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=parse_dtype(args.dtype), device=device)
    if model.tokenizer is None:
        raise SystemExit(f"dsv2 {args.command}: {path} has no tokenizer.json")
    return model


def generate_kwargs(args: argparse.Namespace) -> dict:
    """Sampling flags that were given; the rest comes from the checkpoint's generation_config.json."""
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "ignore_eos")
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    # a temperature > 0, or a flag that only matters when sampling, samples, whatever the config's do_sample (a base
    # model's generation_config.json has none: greedy); --temperature 0 stays greedy
    if kwargs.get("temperature") or (kwargs.get("temperature") is None and SAMPLING_ONLY_FLAGS & kwargs.keys()):
        kwargs["do_sample"] = True
    return kwargs


SAMPLING_ONLY_FLAGS = frozenset({"top_p", "top_k", "min_p", "seed"})


def cmd_generate(args: argparse.Namespace) -> None:
    from dsv2.chat import without_leading_space
    from dsv2.generate import stream

    model = load_model(args)
    tokenizer = model.tokenizer
    if args.chat or args.system:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = tokenizer.apply_chat_template([*messages, {"role": "user", "content": args.prompt}],
                                               add_generation_prompt=True)
    else:
        prompt = tokenizer.encode(args.prompt)
    deltas = stream(model, tokenizer, prompt, **generate_kwargs(args))
    try:
        for delta in without_leading_space(deltas) if args.chat or args.system else deltas:
            print(delta, end="", flush=True)
    except KeyboardInterrupt:
        pass
    print()


def cmd_chat(args: argparse.Namespace) -> None:
    from dsv2.chat import ChatSession, run_repl

    model = load_model(args)
    # Ctrl-C stops an answer: make sure it raises KeyboardInterrupt even where SIGINT was inherited as ignored
    # (a process started in the background by a non-interactive shell, under nohup, ...)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_repl(ChatSession(model, model.tokenizer, system=args.system, **generate_kwargs(args)))


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from dsv2.server.serve import serve
    except ImportError as e:
        raise SystemExit(f"dsv2 serve needs the server extra: pip install 'dsv2[server]' ({e})") from None
    from dsv2.bundled import resolve_model

    serve(resolve_model(args.model), host=args.host, port=args.port, served_model_name=args.served_model_name,
          api_key=args.api_key, max_body_bytes=args.max_body_bytes,
          device=None if args.device == "auto" else args.device, dtype=args.dtype, **engine_arguments(args))


def engine_arguments(args: argparse.Namespace) -> dict:
    names = ("max_model_len", "kv_cache_memory", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens",
             "block_size")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {**given, "enable_prefix_caching": not args.no_prefix_caching,
            "enable_chunked_prefill": not args.no_chunked_prefill, "tensor_parallel_size": args.tensor_parallel_size,
            "data_parallel_size": args.data_parallel_size, "enable_expert_parallel": args.expert_parallel}


def check_device(device: str) -> None:
    """--device names a device this machine has ("auto" always does); else a ValueError that says what is missing."""
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ..., or auto)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "no CUDA device is visible" if torch.version.cuda else "this PyTorch build has no CUDA support"
            raise ValueError(f"--device {device}: CUDA is not available ({why}); use --device cpu, or leave --device "
                             "out to use CUDA when there is one")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available; use --device cpu")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                        help="weights dtype (default: the checkpoint's)")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request")
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the latent cache")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="share of device memory for weights + cache (CPU: of available RAM, halved)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="sequences in a batch at most")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per step at most")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per cache block")
    parser.add_argument("--no-prefix-caching", action="store_true", help="do not share computed prompt prefixes")
    parser.add_argument("--no-chunked-prefill", action="store_true", help="prefill each prompt in one step")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="devices (processes) to shard every layer over")
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                        help="devices (processes) with their own requests and latent cache (attention data parallel)")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="whole routed experts per device: E/W each (with -tp: instead of slices of every expert; "
                             "with -dp: instead of whole replicas)")


@contextlib.contextmanager
def reported_as_one_line(command: str, interrupted: str = "") -> Iterator[None]:
    """A file error (a path that is a file, not writable, ...) or a Ctrl-C inside as one line on stderr, not a
    traceback: ``dsv2 COMMAND: path: why``, exit status 1 (130 for Ctrl-C: the interrupt's message, else
    ``interrupted``). Errors with our own message (no path attached) go on to main()."""
    try:
        yield
    except KeyboardInterrupt as e:
        message = str(e) or ("interrupted; " + interrupted if interrupted else "interrupted")
        print(f"dsv2 {command}: {message}", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as e:
        if e.filename is None:
            raise
        where = f"{e.filename} → {e.filename2}" if e.filename2 is not None else e.filename
        print(f"dsv2 {command}: {where}: {e.strerror or e}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_tokenize(args: argparse.Namespace) -> None:
    try:
        from dsv2.train.data import tokenize_files
    except ImportError as e:
        raise SystemExit(f"dsv2 tokenize needs the train extra: pip install 'dsv2[train]' ({e})") from None

    with reported_as_one_line("tokenize", interrupted="nothing was written"):
        index = tokenize_files(args.tokenizer, [Path(p) for p in args.input], Path(args.output),
                               workers=args.workers)
    print(f"{index['num_documents']} documents, {index['num_tokens']:,} tokens → {args.output}")


def train_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given as flags."""
    from dsv2.train.config import TrainConfig

    overrides = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            overrides[f.name] = parse_json_flag("--model-overrides", value) if f.name == "model_overrides" else value
    return overrides


def parse_json_flag(flag: str, value: str) -> object:
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {value!r}: not valid JSON ({e})") from None


def cmd_train(args: argparse.Namespace) -> None:
    try:
        from dsv2.train.trainer import TrainingStopped, run_training
    except ImportError as e:
        raise SystemExit(f"dsv2 {args.command} needs the train extra: pip install 'dsv2[train]' ({e})") from None
    from dsv2.train.config import TrainConfig

    overrides = train_overrides(args)
    if args.command == "sft":
        overrides["sft_data"] = overrides.pop("data", None)
    defaults = SFT_DEFAULTS if args.command == "sft" else None  # below the --config file and the flags
    config = TrainConfig.load(args.config, defaults=defaults, **overrides)
    if config.sft_data:  # now, not after the model is built
        from dsv2.train.sft import require_chat_file

        require_chat_file(config.sft_data)
    with reported_as_one_line(args.command):
        try:
            summary = run_training(config)
        except TrainingStopped as e:
            print(f"dsv2 {args.command}: {e}", file=sys.stderr)
            raise SystemExit(1) from None
    if "val_loss" in summary:
        print(f"validation loss {summary['val_loss']:.4f} (unigram entropy {summary['unigram_entropy']:.4f})")


# The paper's SFT: learning rate 5e-6, 2 epochs; short sequences and a small warm-up suit chat data.
# its own --out too: run in runs/train, it would resume a pre-training run's checkpoint there
SFT_DEFAULTS = {"lr": 5e-6, "epochs": 2.0, "warmup_steps": 10, "seq_len": 2048, "batch_size": 16, "eval_every": 50,
                "save_every": 200, "out": "runs/sft"}


def add_train_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """One flag per TrainConfig field (--seq-len, --batch-size, ...); given flags override the --config file. The
    help shows the command's own ``defaults`` (SFT_DEFAULTS for sft) where it has them, else TrainConfig's."""
    from dsv2.train.config import TrainConfig

    defaults = defaults or {}
    parser.add_argument("--config", default=None, help="a TOML file of training settings")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name == "decay_at":
            parser.add_argument(flag, type=float, nargs="+", default=None, help="fractions of training (0.8 0.9)")
        elif f.name == "model_overrides":
            parser.add_argument(flag, default=None,
                                help="config.json fields as JSON (presets only): '{\"num_hidden_layers\": 2}'")
        elif f.name == "sft_data":
            continue
        else:
            kind = {"int | None": int, "float | None": float, "str | None": str}.get(str(f.type), type(default))
            kind = str if kind is type(None) else kind
            parser.add_argument(flag, type=kind, default=None, help=f"(default: {defaults.get(f.name, default)})")


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from dsv2.train.tokenizer_training import train_tokenizer

    out = train_tokenizer([Path(p) for p in args.input], args.vocab_size, Path(args.out))
    print(f"tokenizer with {args.vocab_size} entries → {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from dsv2.eval.runner import evaluate

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate(args.model, tasks, args.data_dir, args.out, limit=args.limit, chat=args.chat, shots=args.shots,
                       batch_size=args.batch_size, dtype=args.dtype,
                       device=None if args.device == "auto" else args.device, **engine_arguments(args))
    print(Path(args.out, "results.md").read_text(encoding="utf-8"))
    print(f"every prompt, completion and verdict: {Path(args.out, 'results.json')}")
    assert len(results) == len(tasks)


def cmd_bench(args: argparse.Namespace) -> None:
    """Throughput of the engine on this machine: a batch of random prompts, greedy, EOS ignored."""
    import time

    from dsv2.engine.llm import LLM
    from dsv2.sampling import SamplingParams

    # before the model is loaded: a count below 1 would time nothing (and print a negative or infinite rate)
    for flag in ("requests", "prompt_len", "max_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    llm = LLM(model=args.model, dtype=args.dtype, device=None if args.device == "auto" else args.device,
              **engine_arguments(args))
    generator = torch.Generator().manual_seed(0)
    vocab = min(llm.model.config.vocab_size, llm.tokenizer.vocab_size if llm.tokenizer else 10**9)
    prompts = [torch.randint(2, vocab, (args.prompt_len,), generator=generator).tolist() for _ in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:1], sampling_params=params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{args.requests} requests × ({args.prompt_len} prompt + {args.max_tokens} generated tokens) in "
          f"{seconds:.2f} s: {generated / seconds:.1f} generated tokens/s, "
          f"{(generated + args.requests * args.prompt_len) / seconds:.1f} tokens/s in all "
          f"({llm.model.dtype}, {llm.model.device}, {torch.get_num_threads()} threads)")


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

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, streaming)")
    serve.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="the model id clients ask for (default: folder name)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body accepted")
    add_device_arguments(serve)
    add_engine_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    evaluate = commands.add_parser("eval", help="the model card's benchmarks from local data files")
    evaluate.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    evaluate.add_argument("--tasks", default="mmlu,bbh,ceval,cmmlu,humaneval,mbpp,gsm8k,math",
                          help="comma-separated: mmlu, bbh, ceval, cmmlu, humaneval, mbpp, gsm8k, math")
    evaluate.add_argument("--data-dir", required=True, help="folder with the benchmarks' published files")
    evaluate.add_argument("--limit", type=int, default=None, help="questions per task at most")
    evaluate.add_argument("--shots", type=int, default=None,
                          help="few-shot examples per question (default: each benchmark's protocol: MMLU, C-Eval, "
                               "CMMLU 5, BBH 3, GSM8K 8, MATH 4, HumanEval 0, MBPP 3); every selected task must allow "
                               "it (MMLU, C-Eval, CMMLU 0-5, BBH 0 or 3, GSM8K, MATH 0-8, HumanEval 0, MBPP 0-3)")
    evaluate.add_argument("--chat", action="store_true", help="prompt through the chat template (chat models)")
    evaluate.add_argument("--batch-size", type=int, default=64, help="sequences the engine runs together")
    evaluate.add_argument("--out", default="results", help="folder for results.md and results.json")
    add_device_arguments(evaluate)
    add_engine_arguments(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    bench = commands.add_parser("bench", help="engine throughput on this machine (random prompts, greedy)")
    bench.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    bench.add_argument("--requests", type=int, default=32)
    bench.add_argument("--prompt-len", type=int, default=128)
    bench.add_argument("--max-tokens", type=int, default=64)
    add_device_arguments(bench)
    add_engine_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    tokenize = commands.add_parser("tokenize", help="text files → memory-mapped token ids for training")
    tokenize.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (+ tokenizer_config.json)")
    tokenize.add_argument("--input", nargs="+", required=True, help=".txt files (one document each) or .jsonl")
    tokenize.add_argument("--output", required=True, help="the .bin file to write (its index goes next to it)")
    tokenize.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: up to 4)")
    tokenize.set_defaults(func=cmd_tokenize)

    train_tok = commands.add_parser("train-tokenizer", help="byte-level BPE laid out like DeepSeek-V2's tokenizer")
    train_tok.add_argument("--input", nargs="+", required=True, help="UTF-8 text files")
    train_tok.add_argument("--vocab-size", type=int, default=4096)
    train_tok.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    train_tok.set_defaults(func=cmd_train_tokenizer)

    train = commands.add_parser("train", help="pre-train (or continue training) with the paper's recipe")
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    sft = commands.add_parser("sft", help="chat fine-tuning on {'messages': [...]} JSONL, loss on assistant turns")
    add_train_arguments(sft, SFT_DEFAULTS)
    sft.set_defaults(func=cmd_train)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    add_device_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 is greedy (default: generation_config.json's; greedy when it does not sample)")
    parser.add_argument("--top-p", type=float, default=None, help="samples (unless --temperature 0)")
    parser.add_argument("--top-k", type=int, default=None, help="samples (unless --temperature 0)")
    parser.add_argument("--min-p", type=float, default=None, help="samples (unless --temperature 0)")
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seeds the sampling; samples (unless --temperature 0)")
    parser.add_argument("--ignore-eos", action="store_true", default=None, help="keep going past end-of-sequence")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)  # before a model is loaded
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: config/weights problems name the file and field
        print(f"dsv2 {args.command}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
