import pytest

from dsv2 import Tokenizer
from dsv2.detokenize import IncrementalDetokenizer

from helpers import make_tokenizer_files

TEXT = "Hello 深度求索 🚀🌍 world: 你好，世界！ ✨ done."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer_files(path)
    return Tokenizer.from_pretrained(path)


def feed(detok, ids):
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.finish()


def test_deltas_never_split_a_character_and_add_up(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    # the byte-level BPE really does cut characters: some single tokens decode to a replacement character
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, tail = feed(IncrementalDetokenizer(tok), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + tail == TEXT
    assert sum(1 for d in deltas if d) > 10  # text really arrives piece by piece


def test_special_tokens_are_skipped_or_kept(tok):
    ids = [tok.bos_token_id, *tok.encode("hi", add_special_tokens=False), tok.eos_token_id]
    assert "".join(feed(IncrementalDetokenizer(tok), ids)[0]) == "hi"
    deltas, tail = feed(IncrementalDetokenizer(tok, skip_special_tokens=False), ids)
    assert "".join(deltas) + tail == tok.decode(ids)


@pytest.mark.parametrize(("stop", "expected"), [
    (["世界"], "Hello 深度求索 🚀🌍 world: 你好，"),
    (["🌍 wor", "zzz"], "Hello 深度求索 🚀"),
    (["done.", "✨"], "Hello 深度求索 🚀🌍 world: 你好，世界！ "),
    (["absent"], TEXT),
])
def test_stop_strings_end_the_text_and_are_never_emitted(tok, stop, expected):
    detok = IncrementalDetokenizer(tok, stop=stop)
    ids = tok.encode(TEXT, add_special_tokens=False)
    out = ""
    for i in ids:
        delta = detok.add(i)
        out += delta
        assert not any(s in out for s in stop)
        if detok.stopped:
            break
    out += detok.finish()
    assert out == expected
    assert detok.stopped == (expected != TEXT)


def test_text_that_only_starts_like_a_stop_string_is_released(tok):
    detok = IncrementalDetokenizer(tok, stop=["world peace"])
    deltas, tail = feed(detok, tok.encode("hello world war", add_special_tokens=False))
    assert "".join(deltas) + tail == "hello world war" and not detok.stopped
