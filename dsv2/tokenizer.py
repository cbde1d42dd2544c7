"""The tokenizer of a checkpoint folder: ``tokenizer.json`` (the `tokenizers` library) + ``tokenizer_config.json``.

BOS/EOS follow ``add_bos_token``/``add_eos_token`` of tokenizer_config.json (the LlamaTokenizerFast semantics the
official checkpoints declare), whatever post-processor tokenizer.json carries. Chat templates are rendered with Jinja2
the way transformers renders them; the DeepSeek-V2 template is built in for folders without one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers
import torch

from dsv2.json_files import read_json, read_text, type_mismatch

BOS_TOKEN, EOS_TOKEN = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
ROLES = ("system", "user", "assistant")
# The chat template of DeepSeek-V2, V2-Chat and V2-Lite-Chat, exactly as published.
DEEPSEEK_V2_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _token_text(value: Any, file: Path, field: str) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"__type": "AddedToken", "content": ...}."""
    if value is None:
        return None
    text = value.get("content") if isinstance(value, dict) else value
    if not isinstance(text, str):
        raise ValueError(f"{file}: {field} = {value!r}: expected a string, an AddedToken object or null")
    return text


def _chat_template(value: Any, file: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, null, or a list of {"name", "template"} (→ the default one)."""
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in value):
        value = next((t["template"] for t in value if t.get("name") == "default"), None)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{file}: chat_template = {value!r:.80}: expected a string, a list of "
                         "{'name', 'template'} objects or null")
    return value


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    """Compiled as transformers does: sandboxed, trim_blocks + lstrip_blocks, loop controls, its helper globals."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent, **kw)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not a valid Jinja2 template: {e.message} (line {e.lineno})") from None


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """A non-empty list of {"role": system|user|assistant, "content": str}; anything else is a ValueError."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]['role'] = {role!r}: expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a string, got {type(content).__name__}")
        _check_unicode(content, f"messages[{i}]['content']")
    return list(messages)


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, bos_token: str | None = BOS_TOKEN,
                 eos_token: str | None = EOS_TOKEN, pad_token: str | None = None, add_bos_token: bool = True,
                 add_eos_token: bool = False, chat_template: str | None = None,
                 model_max_length: int | None = None) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_template = chat_template or DEEPSEEK_V2_CHAT_TEMPLATE
        self.model_max_length = model_max_length
        self._template = _compile_template(self.chat_template)
        self.bos_token_id = self._token_id(bos_token, "bos_token")
        self.eos_token_id = self._token_id(eos_token, "eos_token")
        self.pad_token_id = self._token_id(self.pad_token, "pad_token")
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)  # real ids; the model may pad beyond
        self.special_ids = frozenset(
            i for i, token in backend.get_added_tokens_decoder().items() if token.special
        ) | {i for i in (self.bos_token_id, self.eos_token_id) if i is not None}

    def _token_id(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer_config.json {field} = {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @classmethod
    def from_pretrained(cls, path: str | Path, **ignored: Any) -> Tokenizer:
        """Read tokenizer.json (required) and tokenizer_config.json (optional) from a checkpoint folder.

        transformers-only arguments such as ``trust_remote_code`` are accepted and ignored."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (a checkpoint folder needs one to encode text)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
            raise ValueError(f"{tokenizer_file}: not a valid tokenizer.json ({e})") from None
        config_file = folder / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_file.exists():
            config = read_json(config_file)
            if not isinstance(config, dict):
                raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        for name, hint in (("add_bos_token", bool), ("add_eos_token", bool), ("model_max_length", float | None)):
            if name in config and (problem := type_mismatch(config[name], hint)):
                raise ValueError(f"{config_file}: {name} = {config[name]!r}: {problem}")
        template, template_source = _chat_template(config.get("chat_template"), config_file), config_file
        template_file = folder / "chat_template.jinja"  # where transformers 5 saves it; it wins, as there
        if template_file.exists():
            template, template_source = read_text(template_file), template_file
        if template is not None:  # compiled here too, so that a syntax error names its file
            try:
                _compile_template(template)
            except ValueError as e:
                raise ValueError(f"{template_source}: {e}") from None
        return cls(
            backend,
            bos_token=_token_text(config.get("bos_token", BOS_TOKEN), config_file, "bos_token"),
            eos_token=_token_text(config.get("eos_token", EOS_TOKEN), config_file, "eos_token"),
            pad_token=_token_text(config.get("pad_token"), config_file, "pad_token"),
            add_bos_token=config.get("add_bos_token", True),
            add_eos_token=config.get("add_eos_token", False),
            chat_template=template,
            model_max_length=config.get("model_max_length"),
        )

    # --------------------------------------------------------------------------------------------------- encoding
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, BOS/EOS as tokenizer_config.json asks (no second BOS
        when the text already starts with one)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        _check_unicode(text)
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token and self.eos_token_id is not None:
                ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list or a 1-d tensor); ids past the real vocabulary (the model's padding) give ""."""
        ids = [int(i) for i in ids]
        ids = [i for i in ids if 0 <= i < self.vocab_size and not (skip_special_tokens and i in self.special_ids)]
        return self.backend.decode(ids, skip_special_tokens=False)

    def with_chat_template(self, chat_template: str) -> Tokenizer:
        """A tokenizer like this one that renders conversations with ``chat_template`` (Jinja2 source)."""
        return Tokenizer(self.backend, bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token,
                         add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token,
                         chat_template=chat_template, model_max_length=self.model_max_length)

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False,
                    **kwargs: Any) -> str:
        """The chat template's text for ``messages``, with transformers' variables."""
        messages = validate_messages(messages)
        return self._template.render(messages=messages, bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                     add_generation_prompt=add_generation_prompt, **kwargs)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = True, return_tensors: str | None = None, return_dict: bool = False,
                            **kwargs: Any) -> list[int] | str | torch.Tensor | Encoding:
        """Token ids (or, with ``tokenize=False``, the text) of a conversation in the model's chat format;
        ``return_tensors="pt"`` gives a [1, T] tensor, ``return_dict=True`` an Encoding (input_ids and
        attention_mask), as in transformers. Other keyword arguments are the template's variables.

        The template writes BOS itself, so the text is tokenized without adding special tokens (no double BOS).
        """
        text = self.render_chat(messages, add_generation_prompt, **kwargs)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        if return_dict:
            return _as_tensors([ids], return_tensors) if return_tensors else Encoding(
                input_ids=ids, attention_mask=[1] * len(ids))
        return _as_tensors([ids], return_tensors)["input_ids"] if return_tensors else ids

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None,
                 add_special_tokens: bool = True) -> Encoding:
        """transformers-style batch encoding: {"input_ids", "attention_mask"}, left-padded with the pad token when
        several texts differ in length (the layout `generate` expects)."""
        texts = [text] if isinstance(text, str) else list(text)
        batch = [self.encode(t, add_special_tokens) for t in texts]
        if return_tensors:
            return _as_tensors(batch, return_tensors, self.pad_token_id or 0)
        if isinstance(text, str):
            return Encoding(input_ids=batch[0], attention_mask=[1] * len(batch[0]))
        return Encoding(input_ids=batch, attention_mask=[[1] * len(ids) for ids in batch])

    def __len__(self) -> int:
        return self.vocab_size


def _check_unicode(text: str, what: str = "text") -> None:
    """A ValueError for a str that is not valid Unicode (a lone surrogate, as JSON's "\\ud800" gives), which the
    tokenizers library rejects with a bare TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: a lone surrogate (U+{ord(text[e.start]):04X}) at index "
                         f"{e.start}") from None


class Encoding(dict):
    """What ``tokenizer(text)`` returns: a dict of input_ids and attention_mask, movable with ``.to(device)``."""

    def to(self, device: torch.device | str) -> Encoding:
        return Encoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _as_tensors(batch: list[list[int]], return_tensors: str, pad_id: int = 0) -> Encoding:
    if return_tensors != "pt":
        raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' (PyTorch) is supported")
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
    return Encoding(input_ids=input_ids, attention_mask=attention_mask)
