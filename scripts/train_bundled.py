"""Rebuild the bundled model, models/dsv2-nano-chat, from nothing: corpus, tokenizer, pre-training, chat set, SFT.

    python scripts/train_bundled.py            # the real thing (about 75 minutes on 2 CPU cores)
    python scripts/train_bundled.py --stage sft --stage finish   # rerun some stages only

Stages (each skipped when its output exists, unless named with --stage):
  corpus     scripts/build_corpus.py: Austen, the World English Bible, Shakespeare, Tang/Song poems (data/corpus)
  documents  the corpus cut into chapters, scenes and poems, shuffled (data/pretrain/documents.jsonl)
  tokenizer  `dsv2 train-tokenizer`: byte-level BPE, 4,096 entries, DeepSeek's special tokens (data/tokenizer)
  tokenize   `dsv2 tokenize` (data/pretrain/corpus.bin)
  pretrain   `dsv2 train --config configs/bundled-pretrain.toml` (runs/bundled-pretrain)
  chats      scripts/build_chat_set.py (data/sft/chats.jsonl)
  sft        `dsv2 sft --config configs/bundled-sft.toml` (runs/bundled-sft)
  finish     models/dsv2-nano-chat: bf16 weights, tokenizer, generation_config.json, the model card with the
             measured losses and sample answers
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["corpus", "documents", "tokenizer", "tokenize", "pretrain", "chats", "sft", "finish"]
NAME = "dsv2-nano-chat"
SAMPLE_PROMPTS = [
    "Who are you?",
    "Continue this passage from Pride and Prejudice by Jane Austen:\n\nIt is a truth universally acknowledged, that "
    "a single man in possession of a good fortune, must be in want of a wife.",
    "Which book of the Bible is this verse from?\n\nIn the beginning, God created the heavens and the earth.",
    "In Shakespeare's Hamlet, who says: \"To be, or not to be, that is the question:\"?",
    "《静夜思》的作者是谁？",
    "请接着写这首诗：《登鹳雀楼》\n白日依山尽，",
]


def documents(corpus: Path, out: Path, seed: int = 0) -> int:
    """One document per novel chapter, Bible chapter, play scene and poem; shuffled so that the validation split
    (the last documents) samples every source."""
    docs = []
    austen = (corpus / "austen.txt").read_text(encoding="utf-8")
    docs += [d.strip() for d in re.split(r"^(?=CHAPTER |Chapter )", austen, flags=re.MULTILINE) if len(d) > 200]
    bible = (corpus / "bible_web.txt").read_text(encoding="utf-8")
    docs += [d.strip() for d in re.split(r"^(?=## )", bible, flags=re.MULTILINE) if len(d) > 100]
    plays = (corpus / "shakespeare.txt").read_text(encoding="utf-8")
    docs += [d.strip() for d in re.split(r"^(?=SCENE |Scene )", plays, flags=re.MULTILINE) if len(d) > 200]
    for name in ("tang300.txt", "song100.txt"):
        docs += [d.strip() for d in (corpus / name).read_text(encoding="utf-8").split("\n\n") if d.strip()]
    random.Random(seed).shuffle(docs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return len(docs)


def dsv2(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dsv2", *args], check=True, cwd=ROOT)


def samples(model_dir: Path) -> list[tuple[str, str]]:
    import torch

    from dsv2 import DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM.from_pretrained(model_dir)
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        reply = model.generate(torch.tensor([ids]), max_new_tokens=80, do_sample=False)[0, len(ids):]
        out.append((prompt, model.tokenizer.decode(reply, skip_special_tokens=True).strip()))
    return out


def last_record(run: Path, key: str) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if key in r][-1]


def finish(work: Path, target: Path) -> None:
    """Assemble models/dsv2-nano-chat and write its model card from the runs' own numbers."""
    from dsv2 import ModelConfig
    from dsv2.info import summarize

    source = work / "runs" / "bundled-sft" / "model"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(source / name, target / name)
    (target / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.3, "top_p": 0.95}, indent=2) + "\n")
    shutil.copy2(work / "runs" / "bundled-pretrain" / "plots" / "loss.png", target / "pretrain_loss.png")
    shutil.copy2(work / "runs" / "bundled-sft" / "plots" / "loss.png", target / "sft_loss.png")
    config = ModelConfig.from_pretrained(target)
    summary = summarize(config)
    pre = last_record(work / "runs/bundled-pretrain", "val_loss")
    sft = last_record(work / "runs/bundled-sft", "val_loss")
    pre_cfg = (ROOT / "configs/bundled-pretrain.toml").read_text()
    sft_cfg = (ROOT / "configs/bundled-sft.toml").read_text()
    sources = (work / "data" / "corpus" / "SOURCES.md").read_text()
    transcript = "\n\n".join(f"**User:** {p}\n\n**dsv2-nano-chat:** {a}" for p, a in samples(target))
    size = (target / "model.safetensors").stat().st_size
    card = f"""# {NAME}

A tiny chat model with the DeepSeek-V2 architecture, trained from scratch by dsv2 itself — tokenizer, pre-training
and SFT — on public-domain books, so that every dsv2 command works on a fresh machine without a download. It is far
too small to know much: it writes in the style of its books and answers in the chat template's format.

## Architecture
Multi-head Latent Attention (kv_lora_rank {config.kv_lora_rank}, RoPE {config.qk_rope_head_dim} + nope
{config.qk_nope_head_dim}, v {config.v_head_dim}, {config.num_attention_heads} heads, no query compression, YaRN ×
{config.rope_scaling['factor']} from {config.rope_scaling['original_max_position_embeddings']}), DeepSeekMoE
({config.n_shared_experts} shared + {config.n_routed_experts} routed experts, {config.num_experts_per_tok} per
token, a dense first layer), {config.num_hidden_layers} layers, hidden size {config.hidden_size}, vocabulary
{config.vocab_size}. {summary.total_params:,} parameters, {summary.activated_params:,} active per token;
{size / 1e6:.1f} MB of bf16 weights. The latent cache holds {config.latent_dim} values per token per layer.

## Results
| stage | validation loss (nats/token) | unigram entropy of the held-out text | steps |
|---|---|---|---|
| pre-training | {pre['val_loss']:.3f} | {pre['unigram_entropy']:.3f} | {pre['step']} |
| SFT (assistant tokens only) | {sft['val_loss']:.3f} | {sft['unigram_entropy']:.3f} | {sft['step']} |

The unigram entropy is the loss of the best model that ignores context; the pre-trained model's held-out loss is
{pre['unigram_entropy'] - pre['val_loss']:.2f} nats/token below it.

![pre-training loss](pretrain_loss.png)
![SFT loss](sft_loss.png)

## Sample answers (greedy)
{transcript}

## Data and licence
Pre-training used every document of the corpus below except a held-out 1% (validation); SFT used conversations built
by rule from the same texts (scripts/build_chat_set.py: continue a passage, name its source, say who speaks a line,
continue a poem or name its poet; every answer is the corpus's own text). The weights are released under the
project's licence; the texts are public domain (see the per-source notes, including the attribution that the
Shakespeare packaging asks for).

{sources}

## How it was made
`python scripts/train_bundled.py` (about 75 minutes on 2 CPU cores), which runs `scripts/build_corpus.py`,
`dsv2 train-tokenizer`, `dsv2 tokenize`, `dsv2 train --config configs/bundled-pretrain.toml`,
`scripts/build_chat_set.py` and `dsv2 sft --config configs/bundled-sft.toml`.

configs/bundled-pretrain.toml:
```toml
{pre_cfg.strip()}
```
configs/bundled-sft.toml:
```toml
{sft_cfg.strip()}
```
"""
    (target / "README.md").write_text(card, encoding="utf-8")
    print(f"{target}: {size / 1e6:.1f} MB; pre-training val {pre['val_loss']:.3f} vs unigram "
          f"{pre['unigram_entropy']:.3f}")


def run(stages: list[str], work: Path, target: Path, force: set[str], quick: bool = False) -> None:
    """The pipeline in ``work`` (data/, runs/); ``quick``: a few steps of each training stage (for the tests)."""
    corpus, pretrain, sft = work / "data" / "corpus", work / "data" / "pretrain", work / "data" / "sft"
    runs = work / "runs"
    short = ["--steps", "4", "--eval-every", "2", "--save-every", "2", "--log-every", "1", "--eval-sequences", "2",
             "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "64", "--warmup-steps", "1",
             "--val-fraction", "0.2"] if quick else []

    def needed(stage: str, output: Path) -> bool:
        return stage in stages and (stage in force or not output.exists())

    if needed("corpus", corpus / "SOURCES.md"):
        subprocess.run([sys.executable, str(ROOT / "scripts/build_corpus.py"), "--out", str(corpus)], check=True)
    if needed("documents", pretrain / "documents.jsonl"):
        print(f"{documents(corpus, pretrain / 'documents.jsonl')} documents")
    if needed("tokenizer", work / "data" / "tokenizer" / "tokenizer.json"):
        dsv2("train-tokenizer", "--input", *map(str, sorted(corpus.glob("*.txt"))), "--vocab-size", "4096",
             "--out", str(work / "data" / "tokenizer"))
    if needed("tokenize", pretrain / "corpus.bin"):
        dsv2("tokenize", "--tokenizer", str(work / "data/tokenizer"), "--input", str(pretrain / "documents.jsonl"),
             "--output", str(pretrain / "corpus.bin"))
    if needed("pretrain", runs / "bundled-pretrain" / "model" / "model.safetensors"):
        dsv2("train", "--config", str(ROOT / "configs/bundled-pretrain.toml"), "--tokenizer",
             str(work / "data/tokenizer"), "--data", str(pretrain / "corpus.bin"), "--out",
             str(runs / "bundled-pretrain"), *short)
    if needed("chats", sft / "chats.jsonl"):
        subprocess.run([sys.executable, str(ROOT / "scripts/build_chat_set.py"), "--corpus", str(corpus),
                        "--out", str(sft / "chats.jsonl"), *(["--per-kind", "20"] if quick else [])], check=True)
    if needed("sft", runs / "bundled-sft" / "model" / "model.safetensors"):
        dsv2("sft", "--config", str(ROOT / "configs/bundled-sft.toml"), "--model",
             str(runs / "bundled-pretrain" / "model"), "--data", str(sft / "chats.jsonl"),
             "--out", str(runs / "bundled-sft"), *short)
    if "finish" in stages:
        finish(work, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", action="append", choices=STAGES, help="run (again) only these stages")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / NAME, help="where the model goes")
    parser.add_argument("--work", type=Path, default=ROOT, help="where data/ and runs/ go")
    parser.add_argument("--quick", action="store_true", help="a few steps per training stage (a smoke run)")
    args = parser.parse_args()
    stages = args.stage or STAGES
    run(stages, args.work, args.out, force=set(args.stage or []), quick=args.quick)


if __name__ == "__main__":
    main()
