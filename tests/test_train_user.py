"""Training as a user meets it: chat and text files with byte-order marks or bytes that are not UTF-8, empty chat
files, and SFT's padded micro-batches (the update must not depend on how a batch is split)."""

import json

import numpy as np
import pytest

from dsv2 import Tokenizer
from dsv2.train.config import TrainConfig
from dsv2.train.data import tokenize_files
from dsv2.train.sft import ChatDataset
from dsv2.train.trainer import Trainer

from helpers import TRAIN_TINY as TINY
from helpers import make_corpus

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_a_chat_file_with_a_byte_order_mark_reads_like_one_without(corpus, tmp_path):
    plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
    plain.write_text(json.dumps(CHAT) + "\r\n" + json.dumps(CHAT) + "\r\n", encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    a, b = (ChatDataset.from_jsonl(p, corpus, seq_len=32, val_fraction=0) for p in (plain, marked))
    assert a.train == b.train and a.num_train == 2


def test_a_chat_file_that_is_not_utf8_names_the_file_and_line(corpus, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_bytes(json.dumps(CHAT).encode() + b'\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(ValueError, match=r"chats\.jsonl:2: not UTF-8"):
        ChatDataset.from_jsonl(chats, corpus, seq_len=32)


def test_an_empty_chat_file_or_one_with_nothing_to_train_on_is_named(corpus, tmp_path, caplog):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"blank\.jsonl: no conversations \(the file is empty"):
        ChatDataset.from_jsonl(blank, corpus, seq_len=32)
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"messages": CHAT["messages"][:1]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"questions\.jsonl: no conversations to train on"):
        ChatDataset.from_jsonl(questions, corpus, seq_len=32)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(questions.read_text() + json.dumps(CHAT) + "\n", encoding="utf-8")
    assert ChatDataset.from_jsonl(mixed, corpus, seq_len=32, val_fraction=0).num_train == 1
    assert "mixed.jsonl: 1 of 2 conversations left out" in caplog.text


def test_tokenize_drops_a_byte_order_mark_from_text_and_jsonl(corpus, tmp_path):
    tok = Tokenizer.from_pretrained(corpus)
    txt, jsonl = tmp_path / "a.txt", tmp_path / "b.jsonl"
    txt.write_bytes(b"\xef\xbb\xbfthe cat")
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "a dog"}\n')
    tokenize_files(corpus, [txt, jsonl], tmp_path / "out.bin", workers=1)
    ids = np.fromfile(tmp_path / "out.bin", dtype=np.uint32).tolist()
    eos, cat, dog = tok.eos_token_id, *(tok.encode(t, add_special_tokens=False) for t in ("the cat", "a dog"))
    assert ids == [*cat, eos, *dog, eos]


def test_sft_steps_do_not_depend_on_the_micro_batch_split(corpus, tmp_path):
    """Rows of very different lengths padded to the longest of a micro-batch: 1 × 4 and 4 × 1 give the same loss,
    balance loss and gradient (the padding is not routed into the balance loss)."""
    chats = tmp_path / "chats.jsonl"
    with chats.open("w") as f:
        for i in range(4):
            answer = " ".join(["word"] * (1 + 8 * i))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say {i}"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    records = []
    for micro in (4, 1):
        config = TrainConfig.load(None, model="nano", model_overrides={**TINY, "aux_loss_alpha": 0.5},
                                  tokenizer=str(corpus), sft_data=str(chats), seq_len=64, batch_size=4,
                                  micro_batch_size=micro, steps=1, warmup_steps=1, lr=1e-3, val_fraction=0,
                                  precision="float32", out=str(tmp_path / f"micro{micro}"))
        records.append(Trainer(config).train_step(0))
    whole, split = records
    for key in ("loss", "balance_loss", "grad_norm"):
        assert whole[key] == pytest.approx(split[key], rel=1e-5), key


def test_a_balance_loss_weight_given_for_a_checkpoint_is_written_into_its_config(corpus, tmp_path):
    """--aux-loss-alpha over a checkpoint folder: the saved config.json says the weight the model was trained with
    (a run continued from OUT/model would otherwise silently go back to the old one)."""
    from helpers import tiny_checkpoint

    base = tiny_checkpoint(tmp_path / "base")
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps(CHAT) + "\n", encoding="utf-8")
    out = tmp_path / "sft"
    Trainer(TrainConfig.load(None, model=str(base), sft_data=str(chats), aux_loss_alpha=0.25, seq_len=32,
                             batch_size=1, steps=1, val_fraction=0, precision="float32", out=str(out))).train()
    for folder in (out / "model", out / "checkpoints" / "step-00000001"):
        assert json.loads((folder / "config.json").read_text())["aux_loss_alpha"] == 0.25
