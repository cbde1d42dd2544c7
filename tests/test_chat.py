import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from dsv2 import DeepseekV2ForCausalLM
from dsv2.chat import ChatSession, run_repl

from helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    return tiny_checkpoint(path)


@pytest.fixture(scope="module")
def model(checkpoint):
    return DeepseekV2ForCausalLM.from_pretrained(checkpoint)


def test_session_keeps_history_and_resets(model):
    session = ChatSession(model, model.tokenizer, system="Be brief.", max_new_tokens=6, ignore_eos=True)
    first = "".join(session.respond("hello"))
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[-1]["content"] == first.strip()
    "".join(session.respond("again"))
    prompt = model.tokenizer.apply_chat_template(session.messages[:-1], add_generation_prompt=True, tokenize=False)
    assert prompt.count("User:") == 2 and prompt.startswith(model.tokenizer.bos_token + "Be brief.")
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_an_interrupted_answer_stays_in_the_history(model):
    session = ChatSession(model, model.tokenizer, max_new_tokens=50, ignore_eos=True)
    answer = session.respond("hello")
    partial = next(answer) + next(answer)
    answer.close()  # what Ctrl-C does to the generator
    assert session.messages[-1] == {"role": "assistant", "content": partial.strip()}


def test_refused_settings_leave_no_trace_in_the_history(model):
    session = ChatSession(model, model.tokenizer, system="Be brief.", max_new_tokens=6, top_p=2.0)
    with pytest.raises(ValueError, match="top_p"):
        "".join(session.respond("hello"))
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_an_answers_length_defaults_to_a_cap_not_the_whole_context(model, monkeypatch):
    """Without --max-new-tokens or a generation_config max, an answer (and its cache) is capped at
    MAX_ANSWER_TOKENS, not sized for the model's whole context."""
    import dsv2.chat as chat_module

    seen = []
    monkeypatch.setattr(chat_module, "stream", lambda model, tok, ids, **kwargs: seen.append(kwargs) or iter(["ok"]))
    monkeypatch.setattr(model.config, "max_position_embeddings", 10**6)
    "".join(ChatSession(model, model.tokenizer).respond("hello"))
    "".join(ChatSession(model, model.tokenizer, max_new_tokens=7).respond("hello"))
    assert [kw["max_new_tokens"] for kw in seen] == [chat_module.MAX_ANSWER_TOKENS, 7]


def test_repl_commands(model):
    lines = iter(["hello", "/reset", "", "/exit"])
    out = io.StringIO()
    session = ChatSession(model, model.tokenizer, max_new_tokens=4, ignore_eos=True)
    run_repl(session, read=lambda prompt: next(lines), out=out)
    assert "(conversation cleared)" in out.getvalue()
    assert session.messages == []


def test_a_second_ctrl_c_while_an_answer_is_being_stopped_keeps_the_repl(model):
    """Ctrl-C pressed twice: the second lands while the first one's " [stopped]" is printed, outside the answer's
    own handler; the REPL goes on to the next line (it died with a traceback)."""
    class Session:
        def respond(self, line):
            yield "a"
            raise KeyboardInterrupt  # the first Ctrl-C, mid-answer

    class Out(io.StringIO):
        pressed = False

        def write(self, text):
            if "[stopped]" in text and not Out.pressed:
                Out.pressed = True
                raise KeyboardInterrupt  # the second
            return super().write(text)

    lines, out = iter(["hello", "again", "/exit"]), Out()
    run_repl(Session(), read=lambda prompt: next(lines), out=out)
    assert Out.pressed and out.getvalue().count("[stopped]") == 1  # the second answer, stopped too


def test_ctrl_c_stops_the_answer_not_the_program(tmp_path):
    # an answer of up to 16,000 tokens: long enough that Ctrl-C always comes while it streams (2,400 random
    # single-byte tokens of the tiny model can be done in a second, before a loaded machine sends the signal)
    checkpoint = tiny_checkpoint(tmp_path, max_position_embeddings=16384)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsv2", "chat", "--model", str(checkpoint), "--max-new-tokens", "16000",
         "--temperature", "1.0", "--seed", "0", "--ignore-eos"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    output: list[bytes] = []  # read as it comes, in whole chunks: the pipe never fills and blocks the chat
    reader = threading.Thread(target=lambda: output.extend(iter(lambda: os.read(proc.stdout.fileno(), 65536), b"")),
                              daemon=True)
    reader.start()
    try:
        proc.stdin.write(b"tell me a long story\n")
        proc.stdin.flush()
        deadline = time.time() + 60
        while sum(map(len, output)) < 300 and time.time() < deadline:  # the answer is streaming
            time.sleep(0.05)
        assert sum(map(len, output)) >= 300, b"".join(output)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # still running
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
        reader.join(timeout=5)
        assert proc.returncode == 0, proc.stderr.read()
        text = b"".join(output).decode("utf-8", "replace")
        assert "[stopped]" in text and text.rstrip().endswith(">>>")  # back at the prompt, then /exit
    finally:
        proc.kill()
