import pytest
import torch

from dsv2 import Tokenizer
from dsv2.tokenizer import BOS_TOKEN, EOS_TOKEN

from helpers import make_tokenizer_files

SYSTEM = [{"role": "system", "content": "You are terse."}]
TURN1 = [{"role": "user", "content": "Write quicksort in C++"}]
MULTI = [*TURN1, {"role": "assistant", "content": "Sure: 你好 🚀"}, {"role": "user", "content": "Now in Python."}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer_files(path)
    return path


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_pretrained(folder)


@pytest.mark.parametrize(("messages", "expected"), [
    (TURN1, f"{BOS_TOKEN}User: Write quicksort in C++\n\nAssistant:"),
    (MULTI, f"{BOS_TOKEN}User: Write quicksort in C++\n\nAssistant: Sure: 你好 🚀{EOS_TOKEN}User: Now in Python.\n\n"
            "Assistant:"),
    (SYSTEM + MULTI, f"{BOS_TOKEN}You are terse.\n\nUser: Write quicksort in C++\n\nAssistant: Sure: 你好 🚀"
                     f"{EOS_TOKEN}User: Now in Python.\n\nAssistant:"),
], ids=["single-turn", "multi-turn", "system"])
def test_template_renders_the_reference_strings(tok, messages, expected):
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    assert tok.apply_chat_template(messages, tokenize=False) == expected.removesuffix("Assistant:")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # exactly one BOS
    assert tok.decode(ids) == expected


@pytest.mark.parametrize("messages", [TURN1, MULTI, SYSTEM + MULTI], ids=["single-turn", "multi-turn", "system"])
def test_same_ids_as_transformers(folder, tok, messages):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for generation_prompt in (True, False):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt, return_dict=False)
        assert tok.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected
    text = "An attention function, 深度求索 🚀!"
    assert tok.encode(text) == theirs(text)["input_ids"]
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_builtin_template_when_the_folder_has_none(tmp_path, tok):
    make_tokenizer_files(tmp_path, chat_template=None)
    bare = Tokenizer.from_pretrained(tmp_path)
    assert bare.apply_chat_template(MULTI, add_generation_prompt=True) == tok.apply_chat_template(
        MULTI, add_generation_prompt=True)


def test_a_chat_template_jinja_file_wins(tmp_path, tok):
    """transformers 5 saves the template as chat_template.jinja; that file is the folder's template."""
    make_tokenizer_files(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(MULTI, tokenize=False) == "".join(
        f"[{m['content']}]" for m in MULTI)
    other = tok.with_chat_template("{{ messages[0].content }}!")
    assert other.apply_chat_template(MULTI, tokenize=False) == MULTI[0]["content"] + "!"
    assert tok.apply_chat_template(MULTI, tokenize=False) != other.apply_chat_template(MULTI, tokenize=False)


def test_special_tokens_bos_and_padded_ids(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id and tok.encode("hello", add_special_tokens=False) == ids[1:]
    assert tok.encode(BOS_TOKEN + "hello") == ids  # no second BOS
    assert tok.decode([*ids, tok.vocab_size, tok.vocab_size + 77], skip_special_tokens=True) == "hello"
    assert tok.decode([tok.vocab_size + 5]) == ""  # ids in the model's padded vocabulary range
    assert tok.decode(torch.tensor(ids)) == BOS_TOKEN + "hello"


def test_batch_call_left_pads_like_transformers(tok):
    batch = tok(["hi", "a longer text"], return_tensors="pt")
    assert batch.input_ids.shape == batch.attention_mask.shape
    assert batch.attention_mask[0].tolist()[0] == 0 and batch.input_ids[0, 0] == tok.pad_token_id
    single = tok("hi", return_tensors="pt").to("cpu")
    assert single["input_ids"].tolist() == [tok.encode("hi")]
    assert tok.apply_chat_template(TURN1, add_generation_prompt=True, return_tensors="pt").shape[0] == 1


@pytest.mark.parametrize(("messages", "error"), [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "robot", "content": "hi"}], r"messages\[0\]\['role'\] = 'robot'"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": 3}], r"messages\[1\]\['content'\] must be a str"),
    ([{"role": "user"}], r"messages\[0\]\['content'\] must be a string, got NoneType"),
    (["hi"], r"messages\[0\] must be a dict"),
])
def test_bad_messages_get_a_clear_error(tok, messages, error):
    with pytest.raises(ValueError, match=error):
        tok.apply_chat_template(messages)


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"not a valid tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)
