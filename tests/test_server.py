"""The OpenAI-compatible server, for real: uvicorn on loopback, the official openai client, LangChain, bad input."""

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from dsv2 import LLM, SamplingParams  # noqa: E402
from dsv2.engine.async_engine import AsyncEngine  # noqa: E402
from dsv2.server.app import create_app  # noqa: E402
from dsv2.server.streams import merge  # noqa: E402

from helpers import TINY_LITE, free_port, make_eos_prone_, make_tokenizer_files, tiny_model  # noqa: E402

NAME = "deepseek-chat"
MAX_LEN = 8192
ENGINE = {"kv_cache_memory": 64_000_000, "max_model_len": MAX_LEN}
QUESTIONS = [f"Question {i}: what is {i} + {i}?" for i in range(40)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model = make_eos_prone_(tiny_model(TINY_LITE, vocab_size=512, max_position_embeddings=16384))
    model.save_pretrained(path)
    make_tokenizer_files(path)
    return path


@pytest.fixture(scope="module")
def offline(checkpoint):
    return LLM(model=checkpoint, **ENGINE)


class Server:
    def __init__(self, checkpoint, **app_args):
        self.llm = LLM(model=checkpoint, **ENGINE)
        self.engine = AsyncEngine(self.llm.engine)
        app = create_app(self.engine, self.llm.tokenizer, NAME, **app_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.shutdown()

    def idle(self, timeout: float = 10.0) -> bool:
        """Every cache block free and no request in the engine (waits for aborts to land)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            e = self.llm.engine
            if e.num_free_blocks == e.blocks.num_blocks and not e.has_unfinished_requests():
                return True
            time.sleep(0.02)
        return False


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint)
    yield s
    s.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def chat(question):
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]


# ---------------------------------------------------------------------------------------------------------- clients
def test_openai_client_chat_and_completions(client, server, offline):
    assert [m.id for m in client.models.list().data] == [NAME]
    reply = client.chat.completions.create(model=NAME, messages=chat("hi"), temperature=0, max_tokens=12)
    expected = offline.chat(chat("hi"), SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.prompt_tokens == len(offline.get_tokenizer().apply_chat_template(chat("hi"),
                                                                                          add_generation_prompt=True))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    stream = client.chat.completions.create(model=NAME, messages=chat("hi"), temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")

    prompt = "An attention function"
    done = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, echo=True,
                                     extra_body={"ignore_eos": True})
    offline_text = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                    use_tqdm=False)[0].outputs[0].text
    assert done.choices[0].text == prompt + offline_text and done.usage.completion_tokens == 6
    pieces = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(p.choices[0].text for p in pieces) == offline_text


def test_chat_options_n_seed_logprobs_stop(client):
    kwargs = {"model": NAME, "messages": chat("seeded"), "temperature": 1.0, "max_tokens": 10, "seed": 3, "n": 3,
              "logprobs": True, "top_logprobs": 2, "extra_body": {"ignore_eos": True}}
    first, again = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and first.usage.completion_tokens == 30
    entry = first.choices[0].logprobs.content[0]
    assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
    text = first.choices[0].message.content
    stop = text[3:5]
    cut = client.chat.completions.create(model=NAME, messages=chat("seeded"), temperature=1.0, max_tokens=10, seed=3,
                                         stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_streamed_logprobs_cover_every_token(client):
    """Tokens whose text is held back (a partial character, a possible stop string) still get their logprobs, in
    the next chunk with text: as many entries as completion tokens, chat and completions."""
    chunks = list(client.chat.completions.create(
        model=NAME, messages=chat("你好 🚀"), temperature=1.0, seed=2, max_tokens=16, logprobs=True, top_logprobs=1,
        stream=True, stream_options={"include_usage": True}, stop=["zz"], extra_body={"ignore_eos": True}))
    entries = sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs)
    assert entries == chunks[-1].usage.completion_tokens == 16
    pieces = list(client.completions.create(model=NAME, prompt="An attention", max_tokens=16, temperature=1.0,
                                            seed=2, logprobs=1, stream=True, stop=["zz"],
                                            extra_body={"ignore_eos": True}))
    assert sum(len(p.choices[0].logprobs.tokens) for p in pieces if p.choices[0].logprobs) == 16


def test_echo_with_logprobs_scores_the_prompt(client, checkpoint, offline):
    """The legacy scoring request (lm-evaluation-harness's local-completions loglikelihood: the prompt as token ids,
    echo, logprobs=1, max_tokens=1): the prompt's tokens come back with their log-probabilities, the model's own (a
    plain forward pass), then the generated token's; the first token has none. Streamed, the echo carries them."""
    from dsv2 import DeepseekV2ForCausalLM

    ids = offline.get_tokenizer().encode("An attention function can be described as mapping")
    done = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    logprobs = done.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(ids) + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    model = DeepseekV2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).log_softmax(-1)[0, :-1].gather(1, torch.tensor(ids[1:])[:, None])
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[1:len(ids)]), expected[:, 0], rtol=0, atol=1e-4)
    assert all(len(top) == 1 and max(top.values()) >= lp - 1e-6
               for top, lp in zip(logprobs.top_logprobs[1:], logprobs.token_logprobs[1:], strict=True))
    text = done.choices[0].text
    assert "".join(logprobs.tokens[:len(ids)]) == offline.get_tokenizer().decode(ids) == text[:logprobs.text_offset[-1]]
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(ids) + 1)]
    stream = list(client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0, echo=True,
                                            logprobs=1, stream=True))
    assert stream[0].choices[0].logprobs.token_logprobs == logprobs.token_logprobs[:len(ids)]
    assert "".join(c.choices[0].text for c in stream) == text
    # a text prompt (BOS added, special) with characters of several bytes, n = 2, streamed or not: every offset is
    # where the tokens before it end, the prompt's included
    kwargs = dict(model=NAME, prompt="café 😀 naïve", max_tokens=5, temperature=0, echo=True, logprobs=2, n=2,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    pieces = list(client.completions.create(**kwargs, stream=True))
    for choice in whole.choices:
        lp = choice.logprobs
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
        streamed = [c.choices[0].logprobs for c in pieces if c.choices and c.choices[0].index == choice.index
                    and c.choices[0].logprobs]
        assert [o for s in streamed for o in s.text_offset] == lp.text_offset
        assert [t for s in streamed for t in s.tokens] == lp.tokens


def test_logit_bias(client):
    """OpenAI's logit_bias (token ids as string keys): +100 forces a token, in chat and completions."""
    reply = client.chat.completions.create(model=NAME, messages=chat("hi"), max_tokens=3, temperature=0,
                                           logit_bias={"7": 100}, extra_body={"ignore_eos": True})
    done = client.completions.create(model=NAME, prompt=[5, 6], max_tokens=3, temperature=0, logprobs=0,
                                     logit_bias={"7": 100}, extra_body={"ignore_eos": True})
    token = client.completions.create(model=NAME, prompt=[7], max_tokens=1, echo=True, logprobs=0)
    seven = token.choices[0].logprobs.tokens[0]
    assert done.choices[0].logprobs.tokens == [seven] * 3 and reply.choices[0].message.content == seven * 3


def test_vllm_sampling_extras(client, offline):
    """vLLM's extra fields (stop_token_ids, include_stop_str_in_output, min_tokens) give the offline engine's result."""
    prompt, params = "An attention function", {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
    free = offline.generate(prompt, SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    stop_id = free.token_ids[3]
    for extra in ({"stop_token_ids": [stop_id]}, {"stop_token_ids": [stop_id], "include_stop_str_in_output": True},
                  {"stop_token_ids": [stop_id], "min_tokens": 6}):
        want = offline.generate(prompt, SamplingParams(**params, **extra), use_tqdm=False)[0].outputs[0]
        got = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True, **extra})
        assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids), extra


def test_langchain_chat_openai(server, offline):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=NAME, openai_api_key="KEY", openai_api_base=f"{server.url}/v1",
                                      temperature=0.85, max_tokens=8000)
    answer = llm.invoke("Tell me about mixture-of-experts models.")
    assert isinstance(answer.content, str) and answer.response_metadata["finish_reason"] in ("stop", "length")
    streamed = list(llm.stream("And about latent attention?"))
    assert streamed and all(isinstance(c.content, str) for c in streamed)
    greedy = langchain_openai.ChatOpenAI(model=NAME, openai_api_key="KEY", openai_api_base=f"{server.url}/v1",
                                         temperature=0, max_tokens=12)
    expected = offline.chat([{"role": "user", "content": "hello"}], SamplingParams(temperature=0, max_tokens=12),
                            use_tqdm=False)[0].outputs[0].text
    assert greedy.invoke("hello").content == expected


def test_load_200_requests_from_32_clients(server, offline):
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = [o.outputs[0].text for o in offline.chat([chat(q) for q in QUESTIONS], params, use_tqdm=False)]
    steps_before = server.llm.engine.num_steps

    async def run():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as http:
            semaphore = asyncio.Semaphore(32)

            async def one(i):
                async with semaphore:
                    body = {"model": NAME, "messages": chat(QUESTIONS[i % 40]), "temperature": 0, "max_tokens": 8,
                            "stream": i % 2 == 1}
                    r = await http.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text
                    if body["stream"]:
                        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
                        assert events[-1] == "[DONE]"
                        return "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                                       for e in events[:-1] if json.loads(e)["choices"])
                    return r.json()["choices"][0]["message"]["content"]

            return await asyncio.gather(*(one(i) for i in range(200)))

    answers = asyncio.run(run())
    assert answers == [expected[i % 40] for i in range(200)]  # every one answered, and correctly
    assert server.llm.engine.num_steps - steps_before < 200 * 9 / 4  # batched, not one request after another
    assert server.idle()  # no request left behind, every cache block back


# -------------------------------------------------------------------------------------------------------- bad input
BAD = [
    ("not json", "{bad json", 400, None),
    ("missing messages", {"model": NAME}, 400, "messages"),
    ("empty messages", {"model": NAME, "messages": []}, 400, "messages"),
    ("wrong type", {"model": NAME, "messages": chat("x"), "temperature": "hot"}, 400, "temperature"),
    ("unknown role", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("top_k below -1", {"model": NAME, "messages": chat("x"), "top_k": -5}, 400, "top_k"),
    ("top_logprobs without logprobs", {"model": NAME, "messages": chat("x"), "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("max_tokens 0", {"model": NAME, "messages": chat("x"), "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens past context", {"model": NAME, "messages": chat("x"), "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ("prompt too long", {"model": NAME, "messages": chat("word " * MAX_LEN)}, 400, "messages"),
    ("n too large", {"model": NAME, "messages": chat("x"), "n": 1000}, 400, "n"),
    ("unknown model", {"model": "gpt-9", "messages": chat("x")}, 404, "model"),
    ("tools", {"model": NAME, "messages": chat("x"), "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools"),
    ("response_format", {"model": NAME, "messages": chat("x"), "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("image", {"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "messages[0].content"),
    ("min_tokens past max_tokens", {"model": NAME, "messages": chat("x"), "min_tokens": 5, "max_tokens": 2}, 400,
     None),
    ("seed past 2**63 with n", {"model": NAME, "messages": chat("x"), "seed": 2**64 - 1, "n": 2}, 400, None),
    ("text part without text", {"model": NAME, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     400, "messages[0].content"),
    ("too many stop strings", {"model": NAME, "messages": chat("x"), "stop": ["a"] * 17}, 400, "stop"),
    ("guided_json", {"model": NAME, "messages": chat("x"), "guided_json": {"type": "object"}}, 400, "guided_json"),
    ("logit_bias key not a token id", {"model": NAME, "messages": chat("x"), "logit_bias": {"hello": 5}}, 400,
     "logit_bias"),
    ("logit_bias past the vocabulary", {"model": NAME, "messages": chat("x"), "logit_bias": {"99999": 5}}, 400,
     None),
    ("logit_bias past 100", {"model": NAME, "messages": chat("x"), "logit_bias": {"7": 101}}, 400, None),
    ("logit_bias key with a leading zero", {"model": NAME, "messages": chat("x"), "logit_bias": {"07": 5}}, 400,
     "logit_bias"),
    ("logit_bias of a string", {"model": NAME, "messages": chat("x"), "logit_bias": {"7": "5"}}, 400,
     "logit_bias"),
    # JSON's "\ud800" escape: text that no UTF-8 holds (was a 500, and the 404's echo of the name a second one)
    ("lone surrogate in a message", {"model": NAME, "messages": chat("a\ud800b")}, 400, "messages"),
    ("lone surrogate in the model's name", {"model": "gpt\ud83d", "messages": chat("x")}, 404, "model"),
]


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, case, body, status, param):
    with httpx.Client(base_url=server.url) as http:
        content = body if isinstance(body, str) else json.dumps(body)
        r = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if param is not None:
            assert error["param"] is not None and error["param"].startswith(param)
        assert http.get("/health").json() == {"status": "ok"}
    assert server.idle()


def test_plain_text_requests_of_unsupported_fields_and_unknown_routes(server, client):
    reply = client.chat.completions.create(model=NAME, messages=chat("hi"), max_tokens=2,
                                           response_format={"type": "text"}, parallel_tool_calls=True,
                                           modalities=["text"])
    assert reply.choices[0].finish_reason in ("stop", "length")  # asking for plain text is no error
    with httpx.Client(base_url=server.url) as http:
        for method, path, status in (("GET", "/v1/nowhere", 404), ("GET", "/v1/chat/completions", 405)):
            r = http.request(method, path)
            assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_completions_bad_input(server):
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/completions", json={"model": NAME, "prompt": [], "max_tokens": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "suffix": "y"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
        headers = {"content-type": "application/json"}
        for prompt in ("a\ud800b", ["ok", "a\udfff"], [True, False]):  # lone surrogates; booleans are no token ids
            r = http.post("/v1/completions", content=json.dumps({"model": NAME, "prompt": prompt}), headers=headers)
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert http.get("/health").status_code == 200 and http.head("/health").status_code == 200
    assert server.idle()


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_developer_messages_are_system_messages(client):
    def prompt_tokens(role):
        messages = [{"role": role, "content": "Answer briefly."}, {"role": "user", "content": "hi"}]
        return client.chat.completions.create(model=NAME, messages=messages, max_tokens=1).usage.prompt_tokens

    assert prompt_tokens("developer") == prompt_tokens("system")


@pytest.mark.parametrize("prompt", [[5, 512], [[5, 6], [7, 10**6]]], ids=["one prompt", "second of two"])
def test_token_ids_outside_the_vocabulary_get_a_400(server, prompt):
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 3})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "prompt" and "[0, 512)" in error["message"]
        assert server.idle()  # checked before anything was queued, the valid first prompt included
        r = http.post("/v1/completions", json={"model": NAME, "prompt": [5, 6], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_several_prompts_run_at_once(server, offline):
    prompts = ["An attention function", "Write a piece of quicksort"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline.generate(prompts, params, use_tqdm=False)]
    steps_before = server.llm.engine.num_steps
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/completions", json={"model": NAME, "prompt": prompts, "max_tokens": 8, "temperature": 0,
                                               "n": 2, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == [expected[0], expected[0], expected[1], expected[1]]
    assert server.llm.engine.num_steps - steps_before < 12  # one after the other would take 2 × 8 steps


@pytest.mark.parametrize(("count", "n"), [(257, 1), (32, 9)])
@pytest.mark.parametrize("stream", [False, True])
def test_prompts_times_n_is_capped(server, count, n, stream):
    with httpx.Client(base_url=server.url) as http:
        r = http.post("/v1/completions", json={"model": NAME, "prompt": [[5, 6]] * count, "n": n, "max_tokens": 2,
                                               "stream": stream})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "prompt" and f"{count * n} completions" in error["message"]
    assert server.idle()


@pytest.mark.parametrize("how", ["close", "cancel"])
def test_merge_stopped_early_closes_every_stream(how):
    closed = []

    async def stream(i):
        try:
            if i == 0:
                yield "first"
            await asyncio.Event().wait()  # never set: the stream stays suspended inside merge's task for it
            yield "never"
        finally:
            closed.append(i)

    async def main():
        merged = merge([stream(i) for i in range(3)])
        assert await merged.__anext__() == (0, "first")
        await asyncio.sleep(0.01)
        if how == "close":  # the consumer stops listening
            await merged.aclose()
            return
        task = asyncio.create_task(merged.__anext__())  # a streaming response whose client disconnects
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):  # not replaced by a RuntimeError
            await task
        await merged.aclose()

    asyncio.run(asyncio.wait_for(main(), timeout=10))
    assert sorted(closed) == [0, 1, 2]


def test_body_size_limit(checkpoint):
    s = Server(checkpoint, max_body_bytes=2000)
    try:
        with httpx.Client(base_url=s.url) as http:
            r = http.post("/v1/chat/completions", json={"model": NAME, "messages": chat("x" * 5000)})
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            assert http.get("/health").status_code == 200

            def chunked(body: dict):  # no Content-Length: Transfer-Encoding: chunked
                data = json.dumps(body).encode()
                yield from (data[i:i + 500] for i in range(0, len(data), 500))

            headers = {"content-type": "application/json"}
            r = http.post("/v1/chat/completions", content=chunked({"model": NAME, "messages": chat("x" * 5000)}),
                          headers=headers)
            assert r.status_code == 413, r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert r.json()["error"]["code"] == "request_too_large"
            small = {"model": NAME, "messages": chat("x" * 900), "max_tokens": 2}  # in several chunks, under the limit
            r = http.post("/v1/chat/completions", content=chunked(small), headers=headers)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
            assert http.get("/health").status_code == 200
    finally:
        s.close()


def test_api_key(checkpoint):
    s = Server(checkpoint, api_key="sesame")
    try:
        with httpx.Client(base_url=s.url) as http:
            assert http.get("/v1/models").status_code == 401
            assert http.get("/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
            assert http.get("/v1/models", headers={"authorization": "Bearer sesame"}).status_code == 200
            assert http.get("/health").status_code == 200  # health checks need no key
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sesame")
        assert good.chat.completions.create(model=NAME, messages=chat("x"), max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="nope").models.list()
    finally:
        s.close()


def test_disconnect_mid_stream_frees_the_blocks(server):
    assert server.idle()
    body = {"model": NAME, "messages": chat("long"), "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.llm.engine.num_free_blocks < server.llm.engine.blocks.num_blocks  # it holds blocks now
    assert server.idle()  # the closed connection aborted the request


def test_disconnect_before_a_non_streaming_answer_aborts_the_request(server):
    def generated(http):
        line = next(x for x in http.get("/metrics").text.splitlines() if x.startswith("dsv2_generation_tokens_total"))
        return float(line.split()[-1])

    assert server.idle()
    body = {"model": NAME, "prompt": "x", "max_tokens": MAX_LEN - 16, "ignore_eos": True}
    with httpx.Client(base_url=server.url) as http:
        before = generated(http)
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body, timeout=0.5)
        assert server.idle()  # aborted at once, not after thousands of tokens
        assert generated(http) - before < MAX_LEN - 16


def test_metrics(server, client):
    client.chat.completions.create(model=NAME, messages=chat("x"), max_tokens=2)
    with httpx.Client(base_url=server.url) as http:
        text = http.get("/metrics").text
    for name in ("dsv2_http_requests_total", "dsv2_prompt_tokens_total", "dsv2_generation_tokens_total",
                 "dsv2_num_requests_running", "dsv2_num_requests_waiting", "dsv2_kv_cache_usage_ratio",
                 "dsv2_time_to_first_token_seconds_bucket", "dsv2_time_per_output_token_seconds_bucket"):
        assert name in text, name


def test_metrics_label_routes_not_raw_paths(server):
    def series(http):
        text = http.get("/metrics").text
        return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith("dsv2_http_requests_total{")}

    with httpx.Client(base_url=server.url) as http:
        assert http.get(f"/{uuid.uuid4().hex}").status_code == 404
        series(http)  # the first /metrics request is counted in the next one
        before = series(http)
        for _ in range(2):
            assert http.get(f"/v1/{uuid.uuid4().hex}").status_code == 404
        after = series(http)
    assert after == before  # random paths add no series
    assert 'dsv2_http_requests_total{endpoint="other",status="404"}' in after
    assert 'dsv2_http_requests_total{endpoint="/metrics",status="200"}' in after


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_shuts_down_cleanly(checkpoint, sig):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dsv2", "serve", "--model", str(checkpoint), "--port", str(port),
                             "--kv-cache-memory", "4000000", "--max-model-len", "2048", "--served-model-name", NAME],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": NAME, "messages": chat("x"), "max_tokens": 300, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=url, timeout=30) as http, http.stream("POST", "/v1/chat/completions",
                                                                         json=body) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(sig)
            rest = list(lines)  # the request in flight finishes (within the 10 s grace period)
        assert [line for line in rest if line][-1] == "data: [DONE]"
        assert proc.wait(timeout=30) == 0
        log = proc.stdout.read()
        assert "engine stopped" in log and "Traceback" not in log
    finally:
        proc.kill()
