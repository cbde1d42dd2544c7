"""Training data: text files → token ids in a memory-mapped file, packed into fixed-length sequences.

``dsv2 tokenize`` writes ``NAME.bin`` (uint32 token ids: every document followed by EOS) and ``NAME.idx.json`` (the
token offset where each document starts, the tokenizer and the counts). Tokenization runs in worker processes.

`PackedDataset` cuts the token stream into sequences of ``seq_len + 1`` tokens (inputs and shifted targets), the last
``val_fraction`` of the documents (of the tokens, for a single text file) held out for validation, and orders the
training sequences by a seeded permutation per epoch, so a position (epoch, index) says exactly which sequences come
next — what a resumed run needs.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsv2.json_files import read_json_object, read_text, type_mismatch
from dsv2.tokenizer import Tokenizer

DTYPE = np.uint32
BOM = "\ufeff"


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, a leading byte-order mark dropped; bytes that are not UTF-8 raise a
    ValueError naming the file and line."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text ({e})") from None
            yield n, line


def read_documents(path: Path) -> Iterator[str]:
    """A .txt file is one document; a .jsonl file holds one {"text": ...} document per line. Text that is not UTF-8
    raises a ValueError naming the file; a leading byte-order mark is dropped."""
    if path.suffix == ".jsonl":
        for n, line in read_lines(path):  # decoded line by line, so that an error names its line
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{n}: expected an object with a string 'text' field")
            yield record["text"]
    elif path.suffix in (".txt", ".md", ""):
        yield read_text(path).removeprefix(BOM)  # a byte-order mark (Windows editors write one) is not text
    else:
        raise ValueError(f"{path}: unsupported input ({path.suffix}); use .txt files or .jsonl with a 'text' field")


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_pretrained(tokenizer_path)


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None
    eos = _worker_tokenizer.eos_token_id
    return [np.asarray([*_worker_tokenizer.encode(t, add_special_tokens=False), eos], dtype=DTYPE) for t in texts]


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_files(tokenizer_path: str | Path, inputs: list[Path], output: Path, workers: int | None = None,
                   batch_size: int = 64) -> dict:
    """Tokenize every document of ``inputs`` (in order) into ``output`` (.bin) and its index (.idx.json). The inputs,
    the output path and ``workers`` are checked before any work; a run that fails leaves no partial files."""
    if not inputs:
        raise ValueError("no input files")
    for path in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {'a folder, not an' if path.is_dir() else 'no such'} input file")
    for path in (output, index_path(output)):
        if path.is_dir():
            raise ValueError(f"{path}: is a folder; --output names the .bin file to write (its index goes next to it)")
    if output.parent.exists() and not output.parent.is_dir():
        raise ValueError(f"{output.parent}: is a file, not a folder for --output {output}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers = {workers!r}: the number of tokenizer processes must be >= 1")
    tokenizer = Tokenizer.from_pretrained(tokenizer_path)  # fail early, here, on a bad tokenizer folder
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{tokenizer_path}: the tokenizer has no EOS token to separate documents")
    output.parent.mkdir(parents=True, exist_ok=True)
    documents = (text for path in inputs for text in read_documents(path))
    offsets, total, largest = [], 0, 0
    workers = workers or min(4, multiprocessing.cpu_count())
    tmp, index_tmp = (path.with_name(path.name + ".tmp") for path in (output, index_path(output)))
    try:
        with tmp.open("wb") as out, multiprocessing.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(str(tokenizer_path),)) as pool:
            for encoded in pool.imap(_encode_batch, _batches(documents, batch_size)):
                for ids in encoded:
                    offsets.append(total)
                    total += len(ids)
                    largest = max(largest, int(ids.max()))
                    out.write(ids.tobytes())
        if not offsets:
            raise ValueError(f"no documents in {', '.join(map(str, inputs))} (blank .jsonl lines are skipped): "
                             "nothing to write")
        index = {"tokenizer": str(Path(tokenizer_path).resolve()), "vocab_size": tokenizer.vocab_size,
                 "eos_token_id": tokenizer.eos_token_id, "max_token_id": largest, "num_tokens": total,
                 "num_documents": len(offsets), "dtype": "uint32", "document_offsets": offsets}
        index_tmp.write_text(json.dumps(index), encoding="utf-8")
        tmp.replace(output)
        index_tmp.replace(index_path(output))
    finally:  # after a failure (or a Ctrl-C): no partial files
        tmp.unlink(missing_ok=True)
        index_tmp.unlink(missing_ok=True)
    return index


# the index's fields that training reads, and their types
INDEX_FIELDS = {"num_tokens": int, "document_offsets": list[int], "eos_token_id": int, "tokenizer": str,
                "vocab_size": int, "max_token_id": int}
REQUIRED_INDEX_FIELDS = ("num_tokens", "document_offsets", "eos_token_id")


def index_path(data: Path) -> Path:
    return data.with_suffix(".idx.json")


class EpochOrder:
    """The order of n training items: a permutation fixed by (seed, epoch), walked across epoch boundaries."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._cached: tuple[int, torch.Tensor | None] = (-1, None)

    def __call__(self, epoch: int) -> torch.Tensor:
        if self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.n, generator=generator))
        return self._cached[1]

    def take(self, epoch: int, start: int, count: int) -> tuple[list[int], int, int]:
        """The ``count`` items from position (epoch, start) on, and the position after them."""
        items = []
        while len(items) < count:
            if start >= self.n:
                epoch, start = epoch + 1, 0
            items.append(int(self(epoch)[start]))
            start += 1
        return items, epoch, start


@dataclass
class TokenFile:
    """A tokenized corpus: the memory-mapped token stream and its document offsets."""

    tokens: np.ndarray  # uint32 [num_tokens], memory-mapped
    document_offsets: list[int]
    eos_token_id: int
    # from the index, where it records them: the tokenizer folder, its number of ids, the largest id in the file
    tokenizer: str | None = None
    vocab_size: int | None = None
    max_token_id: int | None = None

    @classmethod
    def open(cls, path: str | Path) -> TokenFile:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {'a folder, not a' if path.is_dir() else 'no such'} token file (make "
                                    "one with `dsv2 tokenize`)")
        try:
            index = read_json_object(index_path(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{index_path(path)}: the index of {path} is missing") from None
        for key, hint in INDEX_FIELDS.items():
            if (key in index or key in REQUIRED_INDEX_FIELDS) and (problem := type_mismatch(index.get(key), hint)):
                raise ValueError(f"{index_path(path)}: field {key!r} = {index.get(key)!r}: {problem}")
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: empty token file (no documents were tokenized)")
        tokens = np.memmap(path, dtype=DTYPE, mode="r")
        if len(tokens) != index["num_tokens"]:
            raise ValueError(f"{path} holds {len(tokens)} tokens but its index says {index['num_tokens']}: "
                             "the files do not belong together (or the write was cut short)")
        return cls(tokens, index["document_offsets"], index["eos_token_id"], index.get("tokenizer"),
                   index.get("vocab_size"), index.get("max_token_id"))


def validation_split(data: TokenFile, seq_len: int, val_fraction: float) -> int:
    """Where the held-out tokens begin: at the last ``val_fraction`` of the documents; where those cannot fill one
    sequence of ``seq_len + 1`` (a single text file, a few short documents), at the last ``val_fraction`` of the
    tokens, at least one sequence's worth; the end (nothing held out) when ``val_fraction`` is 0 or the corpus is
    too small for both splits."""
    total, offsets = len(data.tokens), data.document_offsets
    if val_fraction <= 0:
        return total
    if len(offsets) > 1:
        split = offsets[len(offsets) - max(1, round(len(offsets) * val_fraction))]
        if total - split > seq_len:
            return split
    split = total - max(seq_len + 1, round(total * val_fraction))
    return split if split > seq_len else total


class PackedDataset:
    """Fixed-length training sequences packed from the document stream, with a held-out validation split."""

    def __init__(self, data: TokenFile, seq_len: int, val_fraction: float = 0.01, seed: int = 0) -> None:
        self.seq_len, self.seed = seq_len, seed
        self.data = data
        split = validation_split(data, seq_len, val_fraction)
        self.train_tokens, self.val_tokens = data.tokens[:split], data.tokens[split:]
        self.num_train = (len(self.train_tokens) - 1) // seq_len
        self.num_val = max(0, (len(self.val_tokens) - 1) // seq_len)
        if self.num_train < 1:
            raise ValueError(f"{len(self.train_tokens)} training tokens cannot fill one sequence of {seq_len + 1}")
        self.order = EpochOrder(self.num_train, seed)

    def _sequence(self, tokens: np.ndarray, i: int) -> torch.Tensor:
        chunk = tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1]
        return torch.from_numpy(chunk.astype(np.int64))  # [seq_len + 1]

    def train_batch(self, epoch: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``count`` sequences [count, seq_len + 1] from position (epoch, start), their target mask [count, seq_len]
        (all ones: every token is predicted), and the position after them."""
        indices, epoch, start = self.order.take(epoch, start, count)
        tokens = torch.stack([self._sequence(self.train_tokens, i) for i in indices])
        return tokens, torch.ones(count, self.seq_len, dtype=torch.bool), epoch, start

    def val_batches(self, batch_size: int, max_sequences: int | None = None) -> Iterator[tuple[torch.Tensor,
                                                                                               torch.Tensor]]:
        """Held-out sequences in order, with their (all-ones) target masks."""
        n = self.num_val if max_sequences is None else min(self.num_val, max_sequences)
        for first in range(0, n, batch_size):
            tokens = torch.stack([self._sequence(self.val_tokens, i) for i in range(first, min(first + batch_size, n))])
            yield tokens, torch.ones(tokens.shape[0], self.seq_len, dtype=torch.bool)

    def unigram_entropy(self, which: str = "val") -> float:
        """Entropy (nats/token) of the token frequencies of a split: the loss of the best context-free model."""
        return unigram_entropy(self.val_tokens if which == "val" else self.train_tokens)


def unigram_entropy(ids) -> float:
    """Entropy (nats) of the token ids' frequencies: the loss of the best model that ignores context."""
    counts = np.bincount(np.asarray(ids, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
