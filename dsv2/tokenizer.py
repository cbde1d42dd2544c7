"""The tokenizer of a checkpoint folder: ``tokenizer.json`` (the `tokenizers` library) + ``tokenizer_config.json``.

BOS/EOS follow ``add_bos_token``/``add_eos_token`` of tokenizer_config.json (the LlamaTokenizerFast semantics the
official checkpoints declare), whatever post-processor tokenizer.json carries. Chat templates are rendered with Jinja2
the way transformers renders them; the DeepSeek-V2 template is built in for folders without one. Batches are padded on
the left (the layout `generate` expects) where transformers pads these files on the right; set ``padding_side``.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers
import torch

from dsv2.json_files import read_json_object, read_text, type_mismatch

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
# from_pretrained's keyword arguments that override tokenizer_config.json (or set an attribute), as in transformers
OVERRIDES = frozenset({"padding_side", "truncation_side", "add_bos_token", "add_eos_token", "bos_token", "eos_token",
                       "pad_token", "chat_template", "model_max_length", "clean_up_tokenization_spaces"})
# transformers' hub and loading arguments of from_pretrained that mean nothing for a local folder of these files
IGNORED_ARGUMENTS = frozenset({"trust_remote_code", "use_fast", "revision", "cache_dir", "force_download",
                               "local_files_only", "token", "proxies", "legacy", "_from_auto", "_from_pipeline"})
# transformers' apply_chat_template options that dsv2 does not implement, with the values that mean "off"
UNSUPPORTED_CHAT_OPTIONS: dict[str, tuple] = {"return_assistant_tokens_mask": (False,), "tokenizer_kwargs": (None, {}),
                                              "sanitize_control_tokens": (False,)}
# transformers' marker for continue_final_message: appended to the final message, the rendered text is cut where it is
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# transformers' clean_up_tokenization: the spaces a WordPiece detokenization leaves before punctuation and contractions
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _token_text(value: Any, file: Path, field: str) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"__type": "AddedToken", "content": ...}
    (from_pretrained's arguments may also be transformers' or tokenizers' AddedToken objects)."""
    if value is None:
        return None
    text = value.get("content") if isinstance(value, dict) else getattr(value, "content", value)
    if not isinstance(text, str):
        raise ValueError(f"{file}: {field} = {value!r}: expected a string, an AddedToken object or null")
    return text


def _chat_template(value: Any, file: Path | str) -> str | None:
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
                 model_max_length: int | None = None, clean_up_tokenization_spaces: bool = False,
                 clean_up_bpe: bool = False) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_template = chat_template or DEEPSEEK_V2_CHAT_TEMPLATE
        self.model_max_length = model_max_length
        self.padding_side = "left"  # transformers' attribute: "left" or "right"
        self.truncation_side = "right"  # transformers' attribute: which end of a text max_length cuts
        # transformers skips the clean-up for BPE models unless tokenizer_config.json forces it (clean_up_bpe)
        self.clean_up_tokenization_spaces, self.clean_up_bpe = clean_up_tokenization_spaces, clean_up_bpe
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
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> Tokenizer:
        """Read tokenizer.json (required) and tokenizer_config.json (optional) from a checkpoint folder.

        Keyword arguments override tokenizer_config.json, as in transformers: ``OVERRIDES`` (``padding_side``,
        ``truncation_side``, ``add_bos_token``, ``bos_token``, ``chat_template``, ``model_max_length``, ...).
        transformers' hub and loading arguments (``IGNORED_ARGUMENTS``: ``trust_remote_code``, ``use_fast``, ...)
        are accepted and ignored; any other name is a TypeError."""
        unknown = sorted(set(kwargs) - OVERRIDES - IGNORED_ARGUMENTS)
        if unknown:
            raise TypeError(f"Tokenizer.from_pretrained got unsupported arguments: {', '.join(unknown)} (supported: "
                            f"{', '.join(sorted(OVERRIDES))}; ignored: {', '.join(sorted(IGNORED_ARGUMENTS))})")
        overrides = {k: v for k, v in kwargs.items() if k in OVERRIDES}
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (a checkpoint folder needs one to encode text)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
            raise ValueError(f"{tokenizer_file}: not a valid tokenizer.json ({e})") from None
        config_file = folder / "tokenizer_config.json"
        config: dict[str, Any] = read_json_object(config_file) if config_file.exists() else {}
        bpe_clean_up = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
        for name, hint in (("add_bos_token", bool), ("add_eos_token", bool), ("model_max_length", float | None),
                           ("clean_up_tokenization_spaces", bool), (bpe_clean_up, bool)):
            if name in config and (problem := type_mismatch(config[name], hint)):
                raise ValueError(f"{config_file}: {name} = {config[name]!r}: {problem}")
            if name in overrides and (problem := type_mismatch(overrides[name], hint)):
                raise ValueError(f"Tokenizer.from_pretrained: {name}={overrides[name]!r}: {problem}")
        template, template_source = _chat_template(config.get("chat_template"), config_file), config_file
        template_file = folder / "chat_template.jinja"  # where transformers 5 saves it; it wins, as there
        if template_file.exists():
            template, template_source = read_text(template_file), template_file
        if "chat_template" in overrides:  # the argument wins over both
            source = "Tokenizer.from_pretrained"
            template, template_source = _chat_template(overrides["chat_template"], source), source
        config = {**config, **overrides}
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
            clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
            clean_up_bpe=config.get(bpe_clean_up, False),
        )._with_sides(overrides.get("padding_side", "left"), overrides.get("truncation_side", "right"))

    def _with_sides(self, padding_side: str, truncation_side: str) -> Tokenizer:
        """Set ``padding_side`` and ``truncation_side`` ("left" or "right"), checked. → self."""
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name}={side!r}: expected 'left' or 'right'")
        self.padding_side, self.truncation_side = padding_side, truncation_side
        return self

    # --------------------------------------------------------------------------------------------------- encoding
    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None, *,
               truncation: bool | str | None = None, return_tensors: str | None = None) -> list[int] | torch.Tensor:
        """Token ids of ``text``; with ``add_special_tokens``, BOS/EOS as tokenizer_config.json asks (no second BOS
        when the text already starts with one). ``max_length`` truncates the text's ids on ``truncation_side``
        ("right" by default), keeping BOS/EOS; ``truncation`` as in ``__call__`` (True without ``max_length``:
        ``model_max_length``). ``return_tensors="pt"``: a [1, T] tensor, as in transformers."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        if not isinstance(add_special_tokens, bool):  # transformers' second positional argument is a text pair
            raise TypeError(f"add_special_tokens must be a bool, got {add_special_tokens!r} (text pairs are not "
                            "supported)")
        if truncation is not None:
            max_length = self._truncation_length(truncation, max_length, None)
        if return_tensors is not None:
            _check_return_tensors(return_tensors)
            return torch.tensor([self.encode(text, add_special_tokens, max_length)], dtype=torch.long)
        _check_unicode(text)
        ids = self.backend.encode(text, add_special_tokens=False).ids
        bos = [self.bos_token_id] if add_special_tokens and self.add_bos_token and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if add_special_tokens and self.add_eos_token and self.eos_token_id is not None else []
        if ids[:1] == bos:  # the text starts with BOS already
            bos = []
        if max_length is not None:
            keep = max(0, max_length - len(bos) - len(eos))
            if self.truncation_side not in ("left", "right"):
                raise ValueError(f"truncation_side = {self.truncation_side!r}: expected 'left' or 'right'")
            ids = ids[len(ids) - keep:] if self.truncation_side == "left" and keep < len(ids) else ids[:keep]
        return [*bos, *ids, *eos]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """The token strings of ``text`` (byte-level: "Ġ" for a space), without BOS/EOS by default, as in
        transformers."""
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens))

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str | list | None:
        """The token string of an id, or the list of them for several ids (None for an id past the vocabulary)."""
        ids = _to_list(ids)
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        skip = self.special_ids if skip_special_tokens else frozenset()
        return [self.backend.id_to_token(i) for i in map(int, ids) if i not in skip]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int | None] | None:
        """The id of a token string, or the list of them for several tokens (None for a token not in the vocabulary:
        the DeepSeek tokenizers have no unknown token)."""
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(token) for token in tokens]

    def decode(self, ids: int | Iterable[int] | Iterable[Iterable[int]] | torch.Tensor,
               skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str | list[str]:
        """Text of ``ids`` (an id, a list or a 1-d tensor); a batch (a list of lists, a 2-d tensor) gives a list of
        texts, as in transformers. Ids past the real vocabulary (the model's padding) give "".

        ``clean_up_tokenization_spaces`` (default: tokenizer_config.json's, else False) removes spaces before
        punctuation and contractions; like transformers, a BPE tokenizer (DeepSeek's) skips it, with a warning,
        unless tokenizer_config.json sets clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output."""
        ids = _to_list(ids)
        ids = [ids] if isinstance(ids, int) else [_to_list(i) for i in ids]
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in ids]
        skip = self.special_ids if skip_special_tokens else frozenset()
        text = self.backend.decode([i for i in map(int, ids) if 0 <= i < self.vocab_size and i not in skip],
                                   skip_special_tokens=False)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            if type(self.backend.model).__name__ == "BPE" and not self.clean_up_bpe:
                warnings.warn("clean_up_tokenization_spaces is ignored for a BPE tokenizer, as in transformers (it "
                              "would strip real spaces before punctuation)", stacklevel=2)
            else:
                for old, new in CLEAN_UP:
                    text = text.replace(old, new)
        return text

    def batch_decode(self, sequences: Iterable[Iterable[int]] | torch.Tensor, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """The text of each sequence of ids (a list of lists or a 2-d tensor)."""
        sequences = list(_to_list(sequences))
        if not sequences:
            return []
        texts = self.decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)
        return [texts] if isinstance(texts, str) else texts  # a single sequence: a batch of one, as in transformers

    def with_chat_template(self, chat_template: str) -> Tokenizer:
        """A tokenizer like this one that renders conversations with ``chat_template`` (Jinja2 source)."""
        other = copy.copy(self)
        other.chat_template, other._template = chat_template, _compile_template(chat_template)
        return other

    def render_chat(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False,
                    continue_final_message: bool | str = False, **kwargs: Any) -> str:
        """The chat template's text for ``messages``, with transformers' variables. ``continue_final_message`` leaves
        the final message open (the text ends right after its content, or the field it names) for the model to
        continue, as in transformers."""
        messages = validate_messages(messages)
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt are not compatible: the first "
                                 "continues the final message, the second starts a new assistant message")
            final = messages[-1].get(field)
            if not isinstance(final, str):
                raise ValueError(f"continue_final_message is set but the final message has no {field!r} to continue")
            if field not in self.chat_template:
                raise ValueError(f"continue_final_message is set to {field!r} but the chat template does not use "
                                 "that field")
            messages = [*messages[:-1], {**messages[-1], field: final + CONTINUE_TAG}]
        text = self._template.render(messages=messages, bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                     add_generation_prompt=add_generation_prompt, **kwargs)
        if continue_final_message:
            if final.strip() not in text or CONTINUE_TAG.strip() not in text:
                raise ValueError("continue_final_message is set but the final message does not appear in the chat "
                                 f"the template renders (it drops or changes part of it): {final.strip()!r:.80}")
            cut = text.rindex(CONTINUE_TAG.strip())  # a template that strips the content loses the tag's space
            text = text[:cut] if text.startswith(CONTINUE_TAG, cut) else text[:cut].rstrip()
        return text

    def apply_chat_template(self, messages: Sequence[dict[str, str]] | Sequence[Sequence[dict[str, str]]],
                            add_generation_prompt: bool = False, continue_final_message: bool | str = False,
                            tokenize: bool = True, padding: bool | str | None = None,
                            truncation: bool | str = False, max_length: int | None = None,
                            return_tensors: str | None = None, return_dict: bool = False,
                            chat_template: str | None = None, padding_side: str | None = None,
                            **kwargs: Any) -> list[int] | list[list[int]] | str | list[str] | torch.Tensor | Encoding:
        """Token ids (or, with ``tokenize=False``, the text) of a conversation in the model's chat format, or of each
        conversation of a batch (a list of them). ``return_tensors="pt"`` gives a [B, T] tensor (B = 1 for one
        conversation), ``return_dict=True`` an Encoding (input_ids and attention_mask), as in transformers;
        ``padding``, ``truncation``, ``max_length`` and ``padding_side`` as in ``__call__`` (but, as in transformers,
        ``max_length`` truncates only with ``truncation=True``). ``chat_template`` (Jinja2 source) renders this call
        instead of the tokenizer's template. Other keyword arguments are the template's variables (``tools``,
        ``documents``, ...), except transformers' options dsv2 lacks (``UNSUPPORTED_CHAT_OPTIONS``): an error.

        The template writes BOS itself, so the text is tokenized without adding special tokens (no double BOS).
        """
        for name, off in UNSUPPORTED_CHAT_OPTIONS.items():
            if name in kwargs and kwargs[name] not in off:
                raise ValueError(f"apply_chat_template: {name}={kwargs[name]!r} is not supported")
            kwargs.pop(name, None)
        renderer = self if chat_template is None else self.with_chat_template(chat_template)
        batched = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], (list, tuple))
        texts = [renderer.render_chat(m, add_generation_prompt, continue_final_message, **kwargs)
                 for m in (messages if batched else [messages])]
        if not tokenize:
            return texts if batched else texts[0]
        encoding = self(texts if batched else texts[0], return_tensors, add_special_tokens=False, padding=padding,
                        truncation=truncation, max_length=max_length, padding_side=padding_side)
        return encoding if return_dict else encoding["input_ids"]

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None, add_special_tokens: bool = True,
                 padding: bool | str | None = None, truncation: bool | str | None = None,
                 max_length: int | None = None, padding_side: str | None = None) -> Encoding:
        """transformers-style batch encoding: {"input_ids", "attention_mask"}.

        ``padding``: True or "longest" pads to the longest text, "max_length" to ``max_length``, False leaves the
        lengths as they are (texts of different lengths then cannot make a tensor); the default pads when
        ``return_tensors`` is set. Padding uses the pad token on ``padding_side`` (the argument, else the attribute:
        "left" by default, the layout `generate` expects). ``truncation`` (True, or the default when ``max_length``
        is given without padding) cuts each text's ids on ``truncation_side`` ("right" by default) to ``max_length``
        (default ``model_max_length``), keeping BOS/EOS."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no text to encode: pass a string or a non-empty list of strings")
        _check_return_tensors(return_tensors)
        padding_side = self.padding_side if padding_side is None else padding_side
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side = {padding_side!r}: expected 'left' or 'right'")
        limit = self._truncation_length(truncation, max_length, padding)
        batch = [self.encode(t, add_special_tokens, limit) for t in texts]
        width = self._padding_length(padding, max_length, batch, return_tensors)
        input_ids, masks = [], []
        for ids in batch:
            pads, ones = [self.pad_token_id or 0] * max(0, width - len(ids)), [1] * len(ids)
            left = padding_side == "left"
            input_ids.append([*pads, *ids] if left else [*ids, *pads])
            masks.append([0] * len(pads) + ones if left else ones + [0] * len(pads))
        if return_tensors:
            if len(lengths := sorted({len(ids) for ids in input_ids})) > 1:
                raise ValueError(f"Unable to create a tensor from texts of different lengths ({lengths[0]} to "
                                 f"{lengths[-1]} tokens): pass padding=True (or truncation=True and a max_length)")
            return Encoding(input_ids=torch.tensor(input_ids, dtype=torch.long),
                            attention_mask=torch.tensor(masks, dtype=torch.long))
        if isinstance(text, str):
            return Encoding(input_ids=input_ids[0], attention_mask=masks[0])
        return Encoding(input_ids=input_ids, attention_mask=masks)

    def _truncation_length(self, truncation: bool | str | None, max_length: int | None,
                           padding: bool | str | None) -> int | None:
        """transformers' rules: a max_length without padding truncates; True truncates to max_length, else to
        model_max_length (none when that is unset or huge)."""
        if truncation is None:
            truncation = max_length is not None and padding in (None, False)
        if truncation in (False, "do_not_truncate"):
            return None
        if truncation not in (True, "longest_first", "only_first"):
            raise ValueError(f"truncation={truncation!r}: expected True, False, 'longest_first', 'only_first' or "
                             "'do_not_truncate'")
        return _length(max_length if max_length is not None else self.model_max_length)

    def _padding_length(self, padding: bool | str | None, max_length: int | None, batch: list[list[int]],
                        return_tensors: str | None) -> int:
        if padding is None:
            padding = return_tensors is not None  # dsv2's default: a tensor batch is padded to its longest text
        if padding is True or padding == "longest":
            return max(map(len, batch))
        if padding == "max_length":
            return _length(max_length if max_length is not None else self.model_max_length) or 0
        if padding is False or padding == "do_not_pad":
            return 0
        raise ValueError(f"padding={padding!r}: expected True, 'longest', 'max_length', False or 'do_not_pad'")

    def __len__(self) -> int:
        return self.vocab_size


def _check_return_tensors(return_tensors: str | None) -> None:
    if return_tensors not in (None, "pt"):
        raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' (PyTorch) is supported")


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


def _to_list(value: Any) -> Any:
    """A tensor or NumPy array (or scalar) as Python lists (or an int); anything else as it is."""
    return value.tolist() if hasattr(value, "tolist") else value


def _length(limit: float | None) -> int | None:
    """A length limit as an int; None for none, or for transformers' "no limit" (model_max_length ≥ 1e20)."""
    return None if limit is None or limit >= 1e20 else int(limit)
