"""What users of the official openai client (and of plain JSON, as other OpenAI clients write it) send to
``dsv2 serve``: null for "not given", typos and vLLM-only fields, tool calls in the history, stream_options without
a stream, the bytes of tokens holding part of a character. Served from the bundled model."""

import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from dsv2 import LLM  # noqa: E402
from dsv2.engine.async_engine import AsyncEngine  # noqa: E402
from dsv2.server.app import create_app  # noqa: E402

from helpers import free_port  # noqa: E402

NAME = "deepseek-chat"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server():
    llm = LLM(kv_cache_memory=8_000_000, max_model_len=512)  # the bundled model
    engine = AsyncEngine(llm.engine)
    port = free_port()
    app = create_app(engine, llm.tokenizer, NAME)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield {"url": f"http://127.0.0.1:{port}", "tokenizer": llm.tokenizer}
    server.should_exit = True
    thread.join(10)
    engine.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server["url"], timeout=60) as http:
        yield http


def test_null_means_the_default(http):
    """OpenAI's nullable fields sent as null ("n": null, as JSON clients write an unset option) were 400s."""
    unset = {"n": None, "presence_penalty": None, "frequency_penalty": None, "stream": None, "temperature": None,
             "seed": None, "stop": None, "logit_bias": None, "user": None}
    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": HELLO, "max_tokens": 2, "logprobs": None,
                                                "top_logprobs": None, **unset})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    r = http.post("/v1/completions", json={"model": NAME, "prompt": "An", "max_tokens": 2, "echo": None,
                                           "logprobs": None, "best_of": None, "suffix": None, **unset})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"max_token": 2}, "max_token", "unknown_parameter"),  # a typo: the answer ran to its natural end
    ({"add_generation_prompt": False}, "add_generation_prompt", "unsupported_parameter"),  # vLLM: a different prompt
    ({"continue_final_message": True}, "continue_final_message", "unsupported_parameter"),
    ({"chat_template": "{{ 'x' }}"}, "chat_template", "unsupported_parameter"),
    ({"use_beam_search": True}, "use_beam_search", "unsupported_parameter"),
    ({"echo": True}, "echo", "unsupported_parameter"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),  # without "stream": true
])
def test_fields_that_would_be_silently_ignored_are_refused(client, body, param, code):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=2, extra_body=body)
    error = caught.value.body
    assert error["param"] == param and error["code"] == code and param in error["message"]


def test_fields_that_change_nothing_are_accepted(client):
    reply = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=2, user="u", metadata={"k": "v"},
                                           store=True, extra_body={"add_generation_prompt": True, "echo": False})
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_unknown_completions_fields_are_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=NAME, prompt="An", max_tokens=2, extra_body={"messages": HELLO})
    assert caught.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as caught:  # vLLM's: the prompt without its BOS
        client.completions.create(model=NAME, prompt="An", max_tokens=2, extra_body={"add_special_tokens": False})
    assert caught.value.body["param"] == "add_special_tokens"
    done = client.completions.create(model=NAME, prompt="An", max_tokens=2, extra_body={"add_special_tokens": True})
    assert done.usage.prompt_tokens == 2  # BOS + "An"


def test_assistant_tool_calls_in_the_history_are_refused(client):
    """They would vanish from the rendered prompt: the model would answer a conversation the client never had."""
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    messages = [*HELLO, {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "user", "content": "ok"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=2)
    assert caught.value.body["param"] == "messages[1].tool_calls"
    no_calls = [*HELLO, {"role": "assistant", "content": "hi", "tool_calls": []}, {"role": "user", "content": "ok"}]
    assert client.chat.completions.create(model=NAME, messages=no_calls, max_tokens=2).choices


def test_validation_errors_name_the_field_as_openai_does(http):
    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": [{"content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"


@pytest.mark.parametrize("stream", [False, True])
def test_logprob_bytes_are_the_tokens_own_bytes(client, server, stream):
    """A token holding part of a character (byte 0xE6, the start of 我) has that byte as its bytes, as OpenAI
    answers, not the UTF-8 of the replacement character its text shows: joined, the bytes give the characters."""
    tokenizer = server["tokenizer"]
    partial = tokenizer.convert_tokens_to_ids("æ")  # byte-level BPE's character for the byte 0xE6
    assert tokenizer.decode([partial]) == "\ufffd"
    kwargs = dict(model=NAME, messages=HELLO, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                  logit_bias={str(partial): 100}, extra_body={"ignore_eos": True})
    if stream:
        chunks = client.chat.completions.create(**kwargs, stream=True)
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        entries = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    assert [e.bytes for e in entries] == [[0xE6]] * 3
    tops = [t for e in entries for t in e.top_logprobs]
    assert len(tops) == 6 and all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in tops)
    ascii_token = tokenizer.encode("hello", add_special_tokens=False)[0]
    text = tokenizer.decode([ascii_token])
    entries = client.chat.completions.create(**{**kwargs, "logit_bias": {str(ascii_token): 100}}).choices[0]
    assert [e.bytes for e in entries.logprobs.content] == [list(text.encode())] * 3


def test_text_parts_join_as_llm_chat_joins_them(http):
    """A message's text parts were joined with nothing between them ("Hithere"), where `LLM.chat` and vLLM's server
    put a newline between parts: the same messages made different prompts offline and served."""
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]

    def prompt_tokens(content) -> int:
        r = http.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": content}],
                                                    "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    assert prompt_tokens(parts) == prompt_tokens("Hi\nthere") != prompt_tokens("Hithere")
