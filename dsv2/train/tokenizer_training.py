"""Train a byte-level BPE tokenizer laid out like DeepSeek-V2's: tokenizer.json + tokenizer_config.json.

Like the official tokenizer: byte-level BPE (every string encodes, nothing is unknown), digits split one by one,
CJK characters split from Latin words before merging, the DeepSeek special tokens, a post-processor that adds BOS,
and a tokenizer_config.json (LlamaTokenizerFast, add_bos_token, the DeepSeek-V2 chat template) — so the folder loads
like an official checkpoint's, in dsv2 and in transformers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dsv2.tokenizer import BOS_TOKEN, DEEPSEEK_V2_CHAT_TEMPLATE, EOS_TOKEN

# CJK ideographs and punctuation as their own pieces; digits one at a time (both as in DeepSeek's tokenizer)
CJK = r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]+"


def _lines(files: list[Path]) -> Iterator[str]:
    for path in files:
        with path.open(encoding="utf-8") as f:
            yield from f


def added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def train_tokenizer(files: list[Path], vocab_size: int, out: Path, model_max_length: int = 16384) -> Path:
    """Train on ``files`` (UTF-8 text) and write tokenizer.json and tokenizer_config.json into ``out``."""
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such text file")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(_lines(files), trainer)
    bos = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                                                       special_tokens=[(BOS_TOKEN, bos)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": added_token(BOS_TOKEN),
        "eos_token": added_token(EOS_TOKEN), "pad_token": added_token(EOS_TOKEN),
        "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": model_max_length,
        "sp_model_kwargs": {}, "unk_token": None, "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": DEEPSEEK_V2_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                               encoding="utf-8")
    return out
