"""The OpenAI-compatible HTTP API (FastAPI) in front of the async engine.

Every request joins the engine's continuous batch. Bad input never reaches the engine: it is answered with OpenAI's
error JSON. A client that disconnects, streaming or not, has its request aborted, which frees its cache blocks.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv2.engine.async_engine import AsyncEngine, EngineDeadError
from dsv2.engine.engine import CompletionOutput, RequestOutput
from dsv2.sampling import SamplingParamsError
from dsv2.server.metrics import Metrics
from dsv2.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from dsv2.server.streams import merge, sse
from dsv2.tokenizer import Tokenizer

log = logging.getLogger("dsv2.server")


class BodySizeLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 (OpenAI's error JSON) without reaching
    the app. A declared Content-Length is checked before reading; a body without one (chunked) is read up to the
    limit first, then handed to the app."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(self.limit)(scope, receive, send)
        messages = await self._read_body(receive)
        if messages is None:
            return await _too_large(self.limit)(scope, receive, send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _read_body(self, receive) -> list[dict] | None:
        """The request's body messages, up to the end of the body (or a disconnect); None past the limit."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            size += len(message.get("body", b""))
            if size > self.limit:
                return None
            if not message.get("more_body", False):
                return messages


class SafeJSONResponse(JSONResponse):
    """JSON that survives text echoed from a request: a lone surrogate ("\\ud800" in the request's JSON) is written
    back as that escape instead of failing to encode (a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace")


class AuthAndLog:
    """ASGI middleware: the API key on /v1 routes (a 401 without it), then a log line and a metrics count per
    request. Plain ASGI rather than FastAPI's ``@app.middleware("http")``: under that one a handler's
    ``request.is_disconnected()`` never sees the client leave, so an abandoned non-streaming request ran to its end."""

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), 500  # 500: no response started (an error answered further out)

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_key is not None and scope["path"].startswith("/v1") and not self._authorized(scope):
                denied = _answer(APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                          type="authentication_error", code="invalid_api_key"))
                await denied(scope, receive, send_noting_status)
            else:
                await self.app(scope, receive, send_noting_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"  # a bounded set of label values
            self.metrics.requests.labels(endpoint=route, status=str(status)).inc()
            client = scope.get("client")
            log.info('%s "%s %s" %d %.1fms', client[0] if client else "-", scope["method"], scope["path"], status,
                     (time.monotonic() - start) * 1e3)

    def _authorized(self, scope) -> bool:
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {self.api_key}".encode())


def _param_path(loc: Iterable[Any]) -> str | None:
    """A validation error's location as OpenAI names a field: ("body", "messages", 0, "role") → messages[0].role."""
    path = ""
    for part in loc:
        if part != "body":
            path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or None


def _answer(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error JSON for ``error``, with its status."""
    return SafeJSONResponse(error.body(), status_code=error.status, headers=headers)


def _too_large(limit: int) -> JSONResponse:
    return _answer(APIError(413, f"request body is larger than {limit} bytes", code="request_too_large"))


def create_app(engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 4 * 2**20) -> FastAPI:
    app = FastAPI(title="dsv2", description="OpenAI-compatible API over dsv2's engine", docs_url=None, redoc_url=None,
                  default_response_class=SafeJSONResponse)
    metrics = Metrics()
    max_model_len = engine.engine.config.max_model_len
    created = int(time.time())
    token_bytes = token_bytes_of(tokenizer)

    # ------------------------------------------------------------------------------------ errors, auth, logging
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _answer(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return _answer(APIError(400, f"malformed JSON body: {first.get('msg')}"))
        param = _param_path(first.get("loc", ()))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return _answer(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # unknown routes (404), wrong methods (405)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _answer(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=kind),
                       headers=e.headers)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, e: EngineDeadError):
        return _answer(APIError(503, str(e), type="server_error", code="engine_unavailable"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("error answering %s %s", request.method, request.url.path)
        return _answer(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    app.add_middleware(AuthAndLog, api_key=api_key, metrics=metrics)

    # --------------------------------------------------------------------------------------------- endpoints
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if not engine.is_alive:
            raise EngineDeadError("the engine is not running")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(engine.stats()), media_type=Metrics.CONTENT_TYPE)

    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "dsv2",
                  "max_model_len": max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def check_length(prompt_len: int, max_tokens: int | None, param: str) -> None:
        if prompt_len >= max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                           f"{prompt_len}", param=param, code="context_length_exceeded")
        if max_tokens is not None and prompt_len + max_tokens > max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens; you requested "
                           f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate)",
                           param="max_tokens", code="context_length_exceeded")

    def params_or_400(req, max_tokens, logprobs):
        try:
            return req.sampling_params(max_tokens, logprobs)
        except SamplingParamsError as e:  # the request's field of the same name
            raise APIError(400, str(e).removeprefix("SamplingParams."), param=e.field, code="invalid_value") from None
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None

    def check_request(prompt_ids: list[int], params, param: str, what: str) -> None:
        """The engine's own checks (token ids in the vocabulary, ...), made now: a 400 instead of a failed stream."""
        try:
            engine.engine.check_request(prompt_ids, params)
        except ValueError as e:
            raise APIError(400, f"{what}: {e}", param=param, code="invalid_value") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        if (problem := req.unsupported()) is not None:
            raise problem
        # OpenAI's newer models take "developer" messages where older ones took "system": the template knows those
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                    for i, m in enumerate(req.messages)]
        try:
            prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:  # "messages[1]['role'] = ...": the param names the message and its field
            place = re.match(r"messages\[(\d+)\]\['(\w+)'\]", str(e))
            raise APIError(400, str(e), param=f"messages[{place[1]}].{place[2]}" if place else "messages") from None
        check_length(len(prompt_ids), req.output_limit(), "messages")
        params = params_or_400(req, req.output_limit(), req.logprob_count())
        check_request(prompt_ids, params, "messages", "the rendered messages")
        response_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        outputs = metrics.track(engine.generate(prompt_ids, params), len(prompt_ids))
        head = {"id": response_id, "created": now, "model": model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(_chat_chunks(outputs, head, req.n, include_usage, len(prompt_ids),
                                                    req.logprob_count(), token_bytes)),
                                     media_type="text/event-stream")
        [final] = await _finals([outputs], request)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(c.logprobs, req.logprob_count(), token_bytes) if req.logprobs else None,
                    "finish_reason": _finish(c)} for c in final.outputs]
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(len(prompt_ids), final)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if (problem := req.unsupported()) is not None:
            raise problem
        params = params_or_400(req, req.max_tokens, req.logprobs)
        prompts = []
        for i, prompt in enumerate(req.prompts()):
            try:
                ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            except ValueError as e:
                raise APIError(400, f"prompt {i}: {e}", param="prompt") from None
            check_length(len(ids), req.max_tokens, "prompt")
            check_request(ids, params, "prompt", f"prompt {i}")
            text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
            prompts.append((text, ids))
        response_id, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams = [metrics.track(engine.generate(ids, params, text), len(ids)) for text, ids in prompts]
        head = {"id": response_id, "created": now, "model": model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(_completion_chunks(streams, prompts, head, req, include_usage,
                                                            tokenizer.decode)),
                                     media_type="text/event-stream")
        finals = await _finals(streams, request)  # every prompt in the batch at once
        choices = []
        for p, (final, (text, ids)) in enumerate(zip(finals, prompts, strict=True)):
            echoed = _echo_logprobs(ids, final, req.logprobs, tokenizer.decode) if req.echo else None
            for c in final.outputs:
                logprobs = None
                if req.logprobs is not None:
                    logprobs = _completion_logprobs(c.logprobs, req.logprobs, offset=_end_offset(echoed))
                    logprobs = _joined(echoed, logprobs) if echoed else logprobs
                choices.append({"index": p * req.n + c.index, "text": (text if req.echo else "") + c.text,
                                "logprobs": logprobs, "finish_reason": _finish(c)})
        usage = {"prompt_tokens": sum(len(ids) for _, ids in prompts),
                 "completion_tokens": sum(len(c.token_ids) for f in finals for c in f.outputs)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {**head, "object": "text_completion", "choices": choices, "usage": usage}

    return BodySizeLimit(app, max_body_bytes) if max_body_bytes else app


# ------------------------------------------------------------------------------------------------------- helpers
async def _finals(streams: list[AsyncIterator[RequestOutput]], request: Request) -> list[RequestOutput]:
    """The final output of every stream, all running at once; gives up (aborting every request) if the client goes
    away meanwhile."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    async with contextlib.aclosing(merge(streams)) as outputs:
        async for index, output in outputs:
            finals[index] = output
            if await request.is_disconnected():
                raise APIError(499, "client disconnected", type="client_error")
    assert all(f is not None and f.finished for f in finals)
    return finals


def _finish(c: CompletionOutput) -> str | None:
    return {"abort": "stop"}.get(c.finish_reason, c.finish_reason)


def _usage(prompt_tokens: int, final: RequestOutput) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in final.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


TokenBytes = Callable[[int, str], list[int]]  # a token's id and text → its UTF-8 bytes


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (which tokenizers' ByteLevel uses): each byte → the character that stands for it
    in the vocabulary's token strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def token_bytes_of(tokenizer: Tokenizer) -> TokenBytes:
    """The bytes of a token as OpenAI's chat logprobs report them: the token's own bytes, which for a token holding
    part of a character are not the UTF-8 of its text (a replacement character), so that a client can join the bytes
    of consecutive tokens into the characters. Added (special) tokens and non-byte-level vocabularies: their text's."""
    backend = tokenizer.backend
    if type(backend.decoder).__name__ != "ByteLevel":
        return lambda token, text: list(text.encode("utf-8"))
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    added = set(backend.get_added_tokens_decoder())

    def token_bytes(token: int, text: str) -> list[int]:
        piece = None if token in added else backend.id_to_token(token)
        if piece is None or any(c not in byte_of for c in piece):
            return list(text.encode("utf-8"))
        return [byte_of[c] for c in piece]

    return token_bytes


def _token_entry(token: int, text: str | None, logprob: float, token_bytes: TokenBytes) -> dict[str, Any]:
    text = text or ""
    return {"token": text, "logprob": logprob, "bytes": token_bytes(token, text)}


def _top(entry: dict, k: int) -> list:
    """The k most likely of an engine's logprob entry (the sampled token first, with its rank, then the top k), as
    (token id, its Logprob) pairs."""
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank <= k), key=lambda pair: pair[1].rank)


def _chat_logprobs(logprobs: list[dict] | None, k: int, token_bytes: TokenBytes,
                   start: int = 0) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    content = []
    for token_id, entry in ((next(iter(e)), e) for e in logprobs[start:]):
        chosen = entry[token_id]
        top = _top(entry, k)
        content.append({**_token_entry(token_id, chosen.decoded_token, chosen.logprob, token_bytes),
                        "top_logprobs": [_token_entry(t, lp.decoded_token, lp.logprob, token_bytes)
                                         for t, lp in top]})
    return {"content": content}


def _completion_logprobs(logprobs: list[dict] | None, k: int, start: int = 0,
                         offset: int = 0) -> dict[str, Any] | None:
    """The legacy completions API's logprobs of the generated tokens from ``start`` on, their text offsets counted
    from ``offset`` (where the tokens before them end: the echoed prompt's, the earlier chunks')."""
    if logprobs is None:
        return None
    chosen = (entry[next(iter(entry))] for entry in logprobs[start:])  # an entry's first key: the drawn token
    return _legacy_logprobs(((lp.decoded_token or "", lp.logprob, _likeliest(entry, k))
                             for lp, entry in zip(chosen, logprobs[start:], strict=True)), offset)


def _echo_logprobs(prompt_ids: list[int], output: RequestOutput, k: int | None,
                   decode: Callable[[list[int]], str]) -> dict[str, Any] | None:
    """The echoed prompt's part of the legacy logprobs (``echo`` with ``logprobs=k``): each prompt token, its
    log-probability and the k likeliest at its position; the first token has none (null), as OpenAI's API answers."""
    if k is None or output.prompt_logprobs is None:
        return None
    return _legacy_logprobs((entry[token].decoded_token or "", entry[token].logprob, _likeliest(entry, k))
                            if entry else (decode([token]), None, None)
                            for token, entry in zip(prompt_ids, output.prompt_logprobs, strict=True))


def _likeliest(entry: dict, k: int) -> dict[str, float]:
    """The legacy API's top_logprobs of one position: the k likeliest tokens' texts → their log-probabilities."""
    return {(lp.decoded_token or ""): lp.logprob for _, lp in _top(entry, k)}


def _legacy_logprobs(entries: Iterable[tuple[str, float | None, dict[str, float] | None]],
                     offset: int = 0) -> dict[str, Any]:
    """The legacy API's logprobs object of (token text, its log-probability, top_logprobs) entries, each token's
    text offset where the texts before it end (from ``offset``)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for text, logprob, likeliest in entries:
        tokens.append(text)
        token_logprobs.append(logprob)
        top.append(likeliest)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _end_offset(part: dict[str, list] | None) -> int:
    """Where the text of a part of the legacy logprobs ends (0 for none): its tokens' texts laid end to end, which
    is what every text offset counts, echoed prompt tokens included."""
    if not part or not part["tokens"]:
        return 0
    return part["text_offset"][-1] + len(part["tokens"][-1])


def _joined(first: dict[str, list], then: dict[str, list] | None) -> dict[str, list]:
    """Two parts of the legacy logprobs, one after the other."""
    return {key: first[key] + (then[key] if then else []) for key in first}


async def _chat_chunks(outputs: AsyncIterator[RequestOutput], head: dict, n: int, include_usage: bool,
                       prompt_tokens: int, top_logprobs: int | None, token_bytes: TokenBytes) -> AsyncIterator[dict]:
    chunk = {**head, "object": "chat.completion.chunk"}
    for index in range(n):
        yield {**chunk, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]}
    sent_text, sent_tokens, done = [0] * n, [0] * n, [False] * n
    final = None
    async for final in outputs:
        for c in final.outputs:
            if done[c.index]:
                continue
            delta = c.text[sent_text[c.index]:]
            finished = c.finish_reason is not None
            if delta or finished:  # tokens whose text is held back (a partial character, a possible stop string)
                # send their logprobs with the next chunk that has text
                new_logprobs = _chat_logprobs(c.logprobs, top_logprobs, token_bytes, sent_tokens[c.index])
                sent_text[c.index], sent_tokens[c.index] = len(c.text), len(c.token_ids)
                yield {**chunk, "choices": [{"index": c.index, "delta": {"content": delta} if delta else {},
                                             "logprobs": new_logprobs, "finish_reason": _finish(c)}]}
            done[c.index] = finished
    if include_usage and final is not None:
        yield {**chunk, "choices": [], "usage": _usage(prompt_tokens, final)}


async def _completion_chunks(streams: list[AsyncIterator[RequestOutput]], prompts: list[tuple[str, list[int]]],
                             head: dict, req: CompletionRequest, include_usage: bool,
                             decode: Callable[[list[int]], str]) -> AsyncIterator[dict]:
    chunk = {**head, "object": "text_completion"}
    n = req.n
    sent_text, sent_tokens, offsets = {}, {}, {}  # offsets: where each choice's tokens' texts end so far
    completion_tokens = 0
    scored = req.echo and req.logprobs is not None  # the echo waits for the prompt's logprobs (after its prefill)
    echoed = set()
    if req.echo and not scored:
        for p, (text, _) in enumerate(prompts):
            for i in range(n):
                yield {**chunk, "choices": [{"index": p * n + i, "text": text, "logprobs": None,
                                             "finish_reason": None}]}
    async for p, out in merge(streams):
        if scored and p not in echoed:
            echoed.add(p)
            text, ids = prompts[p]
            logprobs = _echo_logprobs(ids, out, req.logprobs, decode)
            for i in range(n):
                offsets[p * n + i] = _end_offset(logprobs)
                yield {**chunk, "choices": [{"index": p * n + i, "text": text, "logprobs": logprobs,
                                             "finish_reason": None}]}
        for c in out.outputs:
            index = p * n + c.index
            if sent_text.get(index) == -1:
                continue
            delta = c.text[sent_text.get(index, 0):]
            if delta or c.finish_reason is not None:  # held-back tokens' logprobs come with the next text
                logprobs = None
                if req.logprobs is not None:
                    logprobs = _completion_logprobs(c.logprobs, req.logprobs, sent_tokens.get(index, 0),
                                                    offsets.get(index, 0))
                    offsets[index] = _end_offset(logprobs) or offsets.get(index, 0)
                sent_text[index], sent_tokens[index] = len(c.text), len(c.token_ids)
                yield {**chunk, "choices": [{"index": index, "text": delta, "logprobs": logprobs,
                                             "finish_reason": _finish(c)}]}
            if c.finish_reason is not None:
                sent_text[index] = -1
                completion_tokens += len(c.token_ids)
    if include_usage:
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        yield {**chunk, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                 "completion_tokens": completion_tokens,
                                                 "total_tokens": prompt_tokens + completion_tokens}}

