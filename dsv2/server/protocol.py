"""The OpenAI API's request bodies (pydantic), checked strictly, and its error format.

Fields that OpenAI defines but dsv2 cannot honour (tools, response formats, images) are rejected with a 400 that
names them, rather than silently ignored; so are vLLM's fields that dsv2 does not implement and unknown fields (a
typo such as "max_token" would otherwise silently change the answer), as OpenAI answers them. vLLM's extra sampling
fields (top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids, include_stop_str_in_output,
skip_special_tokens) are accepted. OpenAI's nullable fields take null as "the default".
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from dsv2.sampling import SamplingParams

MAX_N = 16  # completions of one prompt
MAX_SEQUENCES = 256  # prompts × n of one /v1/completions request
MAX_STOP_STRINGS, MAX_STOP_LENGTH, MAX_STOP_TOKEN_IDS = 16, 1000, 256


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by chat and completions requests."""

    model_config = ConfigDict(extra="allow")  # unknown fields are checked in `unsupported`, not a 422 each

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    user: str | None = None
    logit_bias: dict[str, StrictFloat | StrictInt] | None = None  # token id (digits) → bias; no "5" or true

    # OpenAI's API takes null for these as "not given" (clients send "n": null); so does vLLM's server
    NULLABLE: ClassVar[tuple[str, ...]] = ("n", "presence_penalty", "frequency_penalty", "stream", "logprobs", "echo")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in cls.NULLABLE)}
        return data

    @field_validator("n")
    @classmethod
    def _n_limit(cls, n: int) -> int:
        if n > MAX_N:
            raise ValueError(f"n={n} is more than this server allows ({MAX_N})")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_limit(cls, stop: str | list[str] | None) -> str | list[str] | None:
        # every stop string is looked for after every token: a bounded number of bounded strings
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in strings):
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_LENGTH} characters")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids_limit(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids")
        return ids

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "tools", "tool_choice", "functions", "function_call", "response_format", "parallel_tool_calls", "audio",
        "modalities", "prediction", "web_search_options", "reasoning_effort", "verbosity",  # reasoning models'
        # vLLM's constrained decoding: ignoring it would return unconstrained text
        "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
        "structured_outputs",
        # vLLM's other fields that change the prompt or the answer
        "add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs", "echo",
        "use_beam_search", "length_penalty", "prompt_logprobs", "allowed_token_ids", "bad_words",
        "truncate_prompt_tokens", "return_tokens_as_token_ids", "logits_processors", "documents", "add_special_tokens")
    # values of those fields that ask for nothing beyond what dsv2 does (the default ones)
    HARMLESS: ClassVar[dict[str, tuple]] = {"tool_choice": ("none",), "response_format": ({"type": "text"},),
                                            "modalities": (["text"],), "parallel_tool_calls": (True,),
                                            "add_generation_prompt": (True,), "length_penalty": (1.0,)}
    # OpenAI's fields that change nothing in the answer (stored completions, billing, caching, abuse tracking)
    IGNORED: ClassVar[tuple[str, ...]] = ("metadata", "store", "service_tier", "prompt_cache_key",
                                          "safety_identifier")

    def unsupported(self) -> APIError | None:
        """A 400 for the first field whose meaning dsv2 cannot honour, or that neither OpenAI nor vLLM defines."""
        extra = self.model_extra or {}
        for name in self.UNSUPPORTED:
            value = extra.get(name)
            harmless = self.HARMLESS.get(name, (None, [], {}, False))
            if name in extra and value is not None and value not in harmless:
                return APIError(400, f"'{name}' is not supported by this server", param=name,
                                code="unsupported_parameter")
        for name in extra:
            if name not in self.UNSUPPORTED and name not in self.IGNORED:
                return APIError(400, f"Unrecognized request argument supplied: '{name}'", param=name,
                                code="unknown_parameter")
        if self.stream_options is not None and not self.stream:  # as OpenAI and vLLM answer
            return APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options",
                            code="invalid_value")
        return None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty or 1.0, seed=self.seed, max_tokens=max_tokens,
            stop=self.stop, ignore_eos=self.ignore_eos, logprobs=logprobs, min_tokens=self.min_tokens,
            stop_token_ids=self.stop_token_ids, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, logit_bias=self._token_biases(),
        )

    def _token_biases(self) -> dict[int, float] | None:
        """``logit_bias`` with its keys (token ids, as JSON object keys: strings) as integers."""
        if self.logit_bias is None:
            return None
        biases = {}
        for token, bias in self.logit_bias.items():
            if not (token.isascii() and token.isdigit() and str(int(token)) == token):  # no "07", " 7", "1_0"
                raise APIError(400, f"logit_bias keys must be token ids (digits); got {token!r}", param="logit_bias",
                               code="invalid_value")
            biases[int(token)] = bias
        return biases


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    TOOL_FIELDS: ClassVar[tuple[str, ...]] = ("tool_calls", "function_call")

    def text(self, index: int) -> str:
        """The message's text; a list of content parts may hold text parts only, joined by newlines (as vLLM's
        server and `LLM.chat` join them). An assistant's tool calls are refused (the chat template has no place for
        them: they would silently vanish from the prompt)."""
        for name in self.TOOL_FIELDS:
            if (self.model_extra or {}).get(name) not in (None, []):
                raise APIError(400, f"messages[{index}].{name}: tool calls are not supported by this server",
                               param=f"messages[{index}].{name}", code="unsupported_parameter")
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            raise APIError(400, f"messages[{index}].content is missing", param=f"messages[{index}].content")
        texts = []
        for part in self.content:
            if part.get("type") != "text":
                kind = part.get("type")
                raise APIError(400, f"messages[{index}] has a content part of type {kind!r}: only text is supported "
                               "(no images or audio)", param=f"messages[{index}].content", code="unsupported_content")
            try:
                texts.append(TextPart(**part).text)
            except ValidationError:
                raise APIError(400, f"messages[{index}] has a text part without a string 'text'",
                               param=f"messages[{index}].content") from None
        return "\n".join(texts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top_logprobs: int | None, info) -> int | None:
        if top_logprobs is not None and not info.data.get("logprobs"):  # as OpenAI and vLLM answer
            raise ValueError("top_logprobs needs logprobs set to true")
        return top_logprobs

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        """One message for every wrong shape (the union's own errors name its members), and token ids that are
        integers: not true/false, not "5"."""
        def token_ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

        if isinstance(prompt, str) or (isinstance(prompt, list) and (
                all(isinstance(p, str) for p in prompt) or token_ids(prompt) or all(token_ids(p) for p in prompt))):
            return prompt
        raise ValueError("must be a string, a list of strings, a list of token ids (integers) or a list of lists of "
                         "token ids")

    # the prompt's text is encoded with its special tokens (BOS), as vLLM's completions default
    HARMLESS: ClassVar[dict[str, tuple]] = {**_Sampling.HARMLESS, "add_special_tokens": (True,)}

    def unsupported(self) -> APIError | None:
        if self.suffix:
            return APIError(400, "'suffix' is not supported by this server", param="suffix",
                            code="unsupported_parameter")
        if self.best_of not in (None, 1, self.n):
            return APIError(400, "'best_of' is not supported by this server", param="best_of",
                            code="unsupported_parameter")
        return super().unsupported()

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """With ``echo`` and ``logprobs`` the prompt's tokens get theirs too (the legacy completions API's scoring of
        a text: lm-evaluation-harness's local-completions model asks for it)."""
        params = super().sampling_params(max_tokens, logprobs)
        if self.echo and logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=logprobs)
        return params

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids; prompts × n is at most MAX_SEQUENCES."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        prompts = [list(p)] if all(isinstance(x, int) for x in p) else list(p)
        if len(prompts) * self.n > MAX_SEQUENCES:
            raise APIError(400, f"{len(prompts)} prompts × n={self.n} = {len(prompts) * self.n} completions is more "
                           f"than this server allows ({MAX_SEQUENCES})", param="prompt", code="invalid_value")
        return prompts
