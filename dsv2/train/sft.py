"""Supervised fine-tuning data: chat JSONL rendered with the model's chat template, loss on assistant turns only.

Each line is {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}. A conversation is split
at the points where the template's generation prompt ends ("...Assistant:" for DeepSeek-V2): what follows, up to and
including the EOS the template writes after each assistant message, is exactly what the model must produce at
inference, and only those tokens are targets. Pieces are tokenized separately, so token boundaries fall where they
fall at inference.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from dsv2.tokenizer import Tokenizer, validate_messages
from dsv2.train.data import EpochOrder, read_lines, unigram_entropy

log = logging.getLogger("dsv2.train")


def render_segments(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The conversation's text in pieces, each marked True when it is assistant output (a target)."""
    full = tokenizer.render_chat(messages)
    segments, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True) if i else None
        upto = tokenizer.render_chat(messages[: i + 1])
        if prompt is None or not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= pos):
            raise ValueError("the chat template does not render conversations incrementally (each turn extending "
                             "the previous text), so assistant turns cannot be located; or a conversation starts "
                             "with an assistant message")
        segments += [(full[pos:len(prompt)], False), (upto[len(prompt):], True)]
        pos = len(upto)
    segments.append((full[pos:], False))
    return [(text, target) for text, target in segments if text]


def encode_conversation(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is an assistant (target) token."""
    ids, targets = [], []
    for text, target in render_segments(tokenizer, validate_messages(messages)):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        targets += [target] * len(piece)
    return ids, targets


def require_chat_file(path: str | Path) -> Path:
    """``path`` as a Path if it is a file, else a FileNotFoundError that says what SFT data should be."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a" if path.is_dir() else "no such"
        raise FileNotFoundError(f"{path}: {what} chat data file (JSONL, one {{\"messages\": [...]}} per line)")
    return path


class ChatDataset:
    """One conversation per sequence (truncated to seq_len + 1, padded), the same interface as PackedDataset."""

    def __init__(self, conversations: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int,
                 val_fraction: float = 0.01, seed: int = 0) -> None:
        # a conversation whose first assistant token lies past seq_len + 1 would train on nothing (and a batch of
        # such ones would divide by zero targets): left out
        conversations = [c for c in conversations if any(c[1][1: seq_len + 1])]
        if not conversations:
            raise ValueError(f"no conversations to train on (none has an assistant token within seq_len + 1 = "
                             f"{seq_len + 1} tokens)")
        self.seq_len, self.seed, self.pad_id = seq_len, seed, pad_id
        n_val = round(len(conversations) * val_fraction) if len(conversations) > 1 else 0
        n_val = min(n_val, len(conversations) - 1)
        self.train = conversations[: len(conversations) - n_val]
        self.val = conversations[len(conversations) - n_val:]
        self.num_train, self.num_val = len(self.train), len(self.val)
        self.order = EpochOrder(self.num_train, seed)
        self.max_token_id = max(max(ids, default=0) for ids, _ in conversations)
        self.tokenizer_vocab_size: int | None = None  # the tokenizer's ids (from_jsonl knows it)

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer_dir: str | Path | None, seq_len: int, val_fraction: float = 0.01,
                   seed: int = 0) -> ChatDataset:
        path = require_chat_file(path)
        if tokenizer_dir is None:
            raise ValueError("SFT needs a tokenizer (the model folder's, or tokenizer=...)")
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
        conversations = []
        for n, line in read_lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                conversations.append(encode_conversation(tokenizer, record["messages"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: not a chat record {{\"messages\": [...]}} ({e})") from None
        if not conversations:
            raise ValueError(f"{path}: no conversations (the file is empty or blank): nothing to train on")
        try:
            dataset = cls(conversations, seq_len, tokenizer.pad_token_id or 0, val_fraction, seed)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if dropped := len(conversations) - dataset.num_train - dataset.num_val:
            log.warning("%s: %d of %d conversations left out: no assistant token within seq_len + 1 = %d tokens",
                        path, dropped, len(conversations), seq_len + 1)
        dataset.tokenizer_vocab_size = tokenizer.vocab_size
        return dataset

    def _row(self, conversation: tuple[list[int], list[bool]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, targets = conversation
        ids, targets = ids[: self.seq_len + 1], targets[: self.seq_len + 1]
        pad = self.seq_len + 1 - len(ids)
        tokens = torch.tensor(ids + [self.pad_id] * pad)  # [L + 1]
        mask = torch.tensor(targets[1:] + [False] * pad, dtype=torch.bool)  # [L]: is tokens[t + 1] a target
        return tokens, mask

    def train_batch(self, epoch: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        indices, epoch, start = self.order.take(epoch, start, count)
        rows = [self._row(self.train[i]) for i in indices]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), epoch, start

    def val_batches(self, batch_size: int, max_sequences: int | None = None) -> Iterator[tuple[torch.Tensor,
                                                                                               torch.Tensor]]:
        n = self.num_val if max_sequences is None else min(self.num_val, max_sequences)
        for first in range(0, n, batch_size):
            rows = [self._row(self.val[i]) for i in range(first, min(first + batch_size, n))]
            yield torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def unigram_entropy(self, which: str = "val") -> float:
        """Entropy of the target (assistant) tokens' frequencies in a split."""
        pool = self.val if which == "val" and self.val else self.train
        ids = [t for conversation_ids, targets in pool for t, is_target in zip(conversation_ids, targets,
                                                                               strict=True) if is_target]
        return unigram_entropy(ids)
