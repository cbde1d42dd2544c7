import copy
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


@pytest.fixture(scope="module")
def theirs(folder):
    """transformers' tokenizer on the same files: the reference."""
    return pytest.importorskip("transformers").AutoTokenizer.from_pretrained(folder)


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


OPEN = [*TURN1, {"role": "assistant", "content": "I am"}]  # a reply to continue


@pytest.mark.parametrize("messages", [
    OPEN, [*TURN1, {"role": "assistant", "content": "I am  "}], TURN1, SYSTEM + MULTI,
], ids=["assistant", "trailing-spaces", "user", "multi-turn"])
def test_continue_final_message_leaves_it_open_like_transformers(tok, theirs, messages):
    text = tok.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert text == theirs.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert text.endswith(messages[-1]["content"])  # no EOS, no "\n\n": the model continues the message
    assert tok.apply_chat_template(messages, continue_final_message=True) == theirs.apply_chat_template(
        messages, continue_final_message=True, return_dict=False)


def test_continue_final_message_under_a_template_that_strips_the_content(tok, theirs):
    template = "{% for m in messages %}<{{ m.content | trim }}>{% endfor %}"
    messages = [*TURN1, {"role": "assistant", "content": "I am  "}]
    text = tok.with_chat_template(template).apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert text == theirs.apply_chat_template(messages, continue_final_message=True, tokenize=False,
                                              chat_template=template) == f"<{TURN1[0]['content']}><I am"


@pytest.mark.parametrize(("template", "kwargs", "error"), [
    (None, {"add_generation_prompt": True}, "continue_final_message and add_generation_prompt are not compatible"),
    (None, {"continue_final_message": "foo"}, "the final message has no 'foo' to continue"),
    ("{% for m in messages %}{{ m.role }}{% endfor %}", {}, "set to 'content' but the chat template does not use"),
    ("{% for m in messages[:-1] %}{{ m.content }}{% endfor %}", {}, "the final message does not appear"),
])
def test_continue_final_message_errors_like_transformers(tok, theirs, template, kwargs, error):
    kwargs = {"continue_final_message": True, "tokenize": False, **kwargs}
    with pytest.raises(ValueError):
        theirs.apply_chat_template(OPEN, chat_template=template, **kwargs)
    with pytest.raises(ValueError, match=error):
        (tok.with_chat_template(template) if template else tok).apply_chat_template(OPEN, **kwargs)


def test_decode_takes_ids_batches_and_tensors_like_transformers(tok, theirs):
    ids = tok.encode("An attention function, 深度求索 🚀!")
    batch = torch.tensor([ids[:6], ids[-6:]])
    for args in [(300,), (torch.tensor(300),), (batch,), (batch.tolist(),), (list(batch),), ([[]],), ([],),
                 (batch, True), (torch.tensor(ids), True)]:
        assert tok.decode(*args) == theirs.decode(*args), args
    assert isinstance(tok.decode(batch), list) and len(tok.decode(batch)) == 2
    for sequences in (batch, batch.tolist(), [], ids):  # a single sequence: a batch of one
        assert tok.batch_decode(sequences, skip_special_tokens=True) == theirs.batch_decode(
            sequences, skip_special_tokens=True)


def _edit_config(folder, **changes):
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **changes}), encoding="utf-8")


@pytest.mark.parametrize("config", [
    {},
    {"clean_up_tokenization_spaces": True},
    {"clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True},
    {"clean_up_tokenization_spaces": True, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output":
        True},
], ids=["default", "config-true", "bpe-forced", "both"])
@pytest.mark.filterwarnings("ignore:clean_up_tokenization_spaces is ignored")
def test_clean_up_tokenization_spaces_like_transformers(broken, config):
    transformers = pytest.importorskip("transformers")
    _edit_config(broken, **config)
    tok, theirs = Tokenizer.from_pretrained(broken), transformers.AutoTokenizer.from_pretrained(broken)
    ids = tok.encode("a , b . c ! don 't I 'm")
    for flag in (None, True, False):
        assert tok.decode(ids, clean_up_tokenization_spaces=flag) == theirs.decode(
            ids, clean_up_tokenization_spaces=flag), flag
        assert tok.batch_decode([ids], clean_up_tokenization_spaces=flag) == theirs.batch_decode(
            [ids], clean_up_tokenization_spaces=flag)
    if len(config) == 2:
        assert tok.decode(ids, skip_special_tokens=True) == "a, b. c! don 't I'm"


def test_clean_up_is_skipped_for_bpe_with_a_warning(tok):
    ids = tok.encode("a , b", add_special_tokens=False)
    with pytest.warns(UserWarning, match="clean_up_tokenization_spaces is ignored for a BPE tokenizer"):
        assert tok.decode(ids, clean_up_tokenization_spaces=True) == "a , b"


def test_tokens_and_ids_like_transformers(tok, theirs):
    text = f"Hello world, 深度求索 🚀{EOS_TOKEN}"
    assert tok.tokenize(text) == theirs.tokenize(text)
    assert tok.tokenize(text, add_special_tokens=True) == theirs.tokenize(text, add_special_tokens=True)
    ids = tok.encode(text)
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens == theirs.convert_ids_to_tokens(ids) == tok.convert_ids_to_tokens(torch.tensor(ids))
    assert tokens[0] == BOS_TOKEN and tokens[-1] == EOS_TOKEN
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == theirs.convert_ids_to_tokens(
        ids, skip_special_tokens=True)
    assert tok.convert_ids_to_tokens(ids[1]) == theirs.convert_ids_to_tokens(ids[1]) == tokens[1]
    assert tok.convert_ids_to_tokens([tok.vocab_size + 3]) == theirs.convert_ids_to_tokens([tok.vocab_size + 3])
    assert tok.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens) == ids
    assert tok.convert_tokens_to_ids(tokens[1]) == ids[1]
    assert tok.convert_tokens_to_ids(["no-such-token"]) == theirs.convert_tokens_to_ids(["no-such-token"]) == [None]


TEXTS = ["hi", "a longer text", "a longer text is here"]


@pytest.mark.parametrize("kwargs", [
    {}, {"padding": True}, {"padding": "longest"}, {"padding": False}, {"padding": "max_length", "max_length": 12},
    {"truncation": True, "max_length": 3}, {"max_length": 3}, {"truncation": False, "max_length": 3},
    {"padding": True, "truncation": True, "max_length": 5}, {"truncation": True, "max_length": 1},
    {"add_special_tokens": False, "padding": True, "max_length": 2, "truncation": "longest_first"},
], ids=str)
def test_padding_and_truncation_like_transformers(tok, theirs, monkeypatch, kwargs):
    assert dict(tok(TEXTS, **kwargs)) == dict(theirs(TEXTS, padding_side="left", **kwargs))
    monkeypatch.setattr(tok, "padding_side", "right")  # transformers' side for these files; dsv2 pads on the left
    assert dict(tok(TEXTS, **kwargs)) == dict(theirs(TEXTS, **kwargs))
    assert dict(tok(TEXTS[1], **kwargs)) == dict(theirs(TEXTS[1], **kwargs))
    try:
        expected = theirs(TEXTS, return_tensors="pt", **kwargs)
    except ValueError:  # texts of different lengths, no padding (by default dsv2 pads a tensor batch: no error)
        if "padding" in kwargs:
            with pytest.raises(ValueError, match="Unable to create a tensor from texts of different lengths"):
                tok(TEXTS, return_tensors="pt", **kwargs)
    else:
        ours = tok(TEXTS, return_tensors="pt", **kwargs)
        assert all(torch.equal(ours[key], expected[key]) for key in ("input_ids", "attention_mask"))


def test_truncation_defaults_to_model_max_length_and_keeps_bos_and_eos(tok, theirs, monkeypatch):
    monkeypatch.setattr(tok, "model_max_length", 4)
    monkeypatch.setattr(theirs, "model_max_length", 4)
    assert tok(TEXTS, truncation=True).input_ids == theirs(TEXTS, truncation=True).input_ids
    assert all(len(ids) == 4 for ids in tok(TEXTS[1:], truncation=True).input_ids)
    with_eos = Tokenizer(tok.backend, add_eos_token=True)  # transformers 5 ignores add_eos_token for these files
    ids = with_eos.encode(TEXTS[2], max_length=4)
    assert len(ids) == 4 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.encode(TEXTS[2], max_length=3) == tok.encode(TEXTS[2])[:3]


def test_padding_errors_are_value_errors(tok):
    with pytest.raises(ValueError, match=r"Unable to create a tensor from texts of different lengths.*padding=True"):
        tok(TEXTS, padding=False, return_tensors="pt")
    assert tok(TEXTS[:1] * 2, padding=False, return_tensors="pt").input_ids.shape == (2, len(tok.encode(TEXTS[0])))
    with pytest.raises(ValueError, match="no text to encode: pass a string or a non-empty list of strings"):
        tok([], return_tensors="pt")
    with pytest.raises(ValueError, match="padding='sideways': expected True, 'longest'"):
        tok(TEXTS, padding="sideways")
    with pytest.raises(ValueError, match="truncation='middle': expected True, False"):
        tok(TEXTS, truncation="middle")
    tok_right = copy.copy(tok)
    tok_right.padding_side = "up"
    with pytest.raises(ValueError, match="padding_side = 'up': expected 'left' or 'right'"):
        tok_right(TEXTS)


def test_a_batch_of_conversations_like_transformers(tok, theirs, monkeypatch):
    batch = [SYSTEM + MULTI, TURN1]
    assert tok.apply_chat_template(batch, tokenize=False) == theirs.apply_chat_template(batch, tokenize=False)
    ids = tok.apply_chat_template(batch, add_generation_prompt=True)
    assert ids == theirs.apply_chat_template(batch, add_generation_prompt=True, return_dict=False)
    assert ids == [tok.apply_chat_template(m, add_generation_prompt=True) for m in batch]
    assert dict(tok.apply_chat_template(batch, return_dict=True)) == dict(theirs.apply_chat_template(batch))
    opened = [OPEN, [*SYSTEM, *OPEN]]
    assert tok.apply_chat_template(opened, continue_final_message=True) == theirs.apply_chat_template(
        opened, continue_final_message=True, return_dict=False)

    monkeypatch.setattr(theirs, "padding_side", "left")  # dsv2 left-pads, for generate
    encoded = tok.apply_chat_template(batch, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    expected = theirs.apply_chat_template(batch, add_generation_prompt=True, return_tensors="pt", padding=True)
    assert all(torch.equal(encoded[key], expected[key]) for key in ("input_ids", "attention_mask"))
    assert encoded.input_ids.shape == (2, len(ids[0])) and encoded.attention_mask[1].sum() == len(ids[1])
    tensor = tok.apply_chat_template(batch, add_generation_prompt=True, return_tensors="pt")
    assert torch.equal(tensor, expected["input_ids"])
    truncated = tok.apply_chat_template(batch, truncation=True, max_length=5)
    assert truncated == theirs.apply_chat_template(batch, truncation=True, max_length=5, return_dict=False)
    assert tok.apply_chat_template(batch, add_generation_prompt=True, max_length=5) == ids  # no truncation
    assert theirs.apply_chat_template(batch, add_generation_prompt=True, max_length=5, return_dict=False) == ids
