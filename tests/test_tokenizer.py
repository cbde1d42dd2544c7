import json
import re
import shutil

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


@pytest.fixture
def broken(folder, tmp_path):
    """A copy of the test tokenizer folder, to break."""
    return shutil.copytree(folder, tmp_path / "tokenizer")


@pytest.mark.parametrize(("change", "error"), [
    ("[]", "expected a JSON object, got list"),
    ("{not json", "not valid JSON"),
    (b'{"bos_token": "\xe9"}', r"not UTF-8 text \(.*byte 0xe9"),
    ({"chat_template": "{% for %}"}, r"chat_template is not a valid Jinja2 template: .* \(line 1\)"),
    ({"chat_template": 5}, "chat_template = 5: expected a string, a list of {'name', 'template'} objects or null"),
    ({"chat_template": [{"name": "default"}]}, r"chat_template = \[{'name': 'default'}\]: expected a string"),
    ({"bos_token": 5}, "bos_token = 5: expected a string, an AddedToken object or null"),
    ({"eos_token": {"content": None}}, r"eos_token = {'content': None}: expected a string"),
    ({"pad_token": ["x"]}, r"pad_token = \['x'\]: expected a string"),
    ({"add_bos_token": "false"}, "add_bos_token = 'false': expected true or false, got str"),
    ({"model_max_length": "16384"}, "model_max_length = '16384': expected a number or null, got str"),
])
def test_bad_tokenizer_config_names_the_file_and_field(broken, change, error):
    path = broken / "tokenizer_config.json"
    if isinstance(change, dict):
        change = json.dumps({**json.loads(path.read_text(encoding="utf-8")), **change})
    path.write_bytes(change if isinstance(change, bytes) else change.encode())
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {error}"):
        Tokenizer.from_pretrained(broken)


def test_a_bad_chat_template_file_or_argument_is_a_value_error(broken, tok):
    path = broken / "chat_template.jinja"
    path.write_text("{% if %}")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: chat_template is not a valid Jinja2 template"):
        Tokenizer.from_pretrained(broken)
    path.write_bytes(b"\xe9")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not UTF-8 text"):
        Tokenizer.from_pretrained(broken)
    with pytest.raises(ValueError, match="chat_template is not a valid Jinja2 template"):
        tok.with_chat_template("{% for %}")


def test_named_templates_and_big_model_max_length_still_load(broken):
    path = broken / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]
    path.write_text(json.dumps({**config, "chat_template": named, "model_max_length": 1e30, "pad_token": None}))
    tok = Tokenizer.from_pretrained(broken)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == f"{BOS_TOKEN}D"


def test_lone_surrogates_are_a_value_error(tok):
    text = json.loads('"a\\ud800b"')  # what a JSON request with an unpaired escape decodes to
    with pytest.raises(ValueError, match=r"text is not valid Unicode: a lone surrogate \(U\+D800\) at index 1"):
        tok.encode(text)
    with pytest.raises(ValueError, match="lone surrogate"):
        tok([text, "fine"])
    with pytest.raises(ValueError, match=r"messages\[1\]\['content'\] is not valid Unicode: a lone surrogate"):
        tok.apply_chat_template([*TURN1, {"role": "assistant", "content": text}])
    assert tok.decode(tok.encode("🚀 ok"), skip_special_tokens=True) == "🚀 ok"  # real astral characters are fine
