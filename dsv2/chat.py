"""An interactive chat over the reference generator: history, ``/reset``, ``/exit``, streamed answers.

Ctrl-C while an answer streams stops that answer (what was said so far stays in the history); Ctrl-C at the prompt
clears the line; Ctrl-D or ``/exit`` leaves.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from dsv2.generate import stream
from dsv2.model import DeepseekV2ForCausalLM
from dsv2.tokenizer import Tokenizer

HELP = "Type a message. /reset clears the conversation, /exit leaves. Ctrl-C stops an answer."
# An answer's length when neither --max-new-tokens nor generation_config.json sets one: each answer's cache is sized
# for it (the model's whole context would be 163,840 positions on V2-Lite, ~5 GB of cache per turn).
MAX_ANSWER_TOKENS = 4096


class ChatSession:
    """A conversation: the messages so far, and the next assistant turn streamed as text."""

    def __init__(self, model: DeepseekV2ForCausalLM, tokenizer: Tokenizer, system: str | None = None,
                 **generate_kwargs: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.generate_kwargs = generate_kwargs
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def respond(self, text: str) -> Iterator[str]:
        """Add the user's message, then stream the answer; the answer joins the history even if cut short."""
        self.messages.append({"role": "user", "content": text})
        ids = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        limit = self.model.config.max_position_embeddings
        if len(ids) >= limit:
            self.messages.pop()
            raise ValueError(f"the conversation is {len(ids)} tokens, over the model's {limit}: /reset to start over")
        kwargs = dict(self.generate_kwargs)
        wanted = kwargs.get("max_new_tokens") or self.model.generation_config.max_new_tokens or MAX_ANSWER_TOKENS
        kwargs["max_new_tokens"] = min(wanted, limit - len(ids))  # the cache is sized for this many
        answer, refused = [], False
        try:
            for delta in stream(self.model, self.tokenizer, ids, **kwargs):
                answer.append(delta)
                yield delta
        except ValueError:
            refused = not answer
            raise
        finally:
            if refused:  # bad settings, refused before a word: the question leaves the history as well
                self.messages.pop()
            else:
                self.messages.append({"role": "assistant", "content": "".join(answer).strip()})


def without_leading_space(deltas: Iterable[str]) -> Iterator[str]:
    """An answer's text deltas without the space the chat template puts before the answer."""
    started = False
    for delta in deltas:
        delta = delta if started else delta.lstrip()
        started = started or bool(delta)
        yield delta


def run_repl(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """The read-eval-print loop; ``read`` is ``input`` (with readline history when available)."""
    if read is input:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and ↑/↓ history for input())
    print(HELP, file=out)
    while True:
        try:
            if not _turn(session, read, out):
                return
        except KeyboardInterrupt:  # a second Ctrl-C while the first one's answer was being stopped
            print(file=out)


def _turn(session: ChatSession, read: Callable[[str], str], out: TextIO) -> bool:
    """One line read and answered (or a command run); False once the user leaves."""
    try:
        line = read(">>> ").strip()
    except KeyboardInterrupt:
        print(file=out)
        return True
    except EOFError:
        print(file=out)
        return False
    if line in ("/exit", "/quit"):
        return False
    if line == "/reset":
        session.reset()
        print("(conversation cleared)", file=out)
        return True
    if not line:
        return True
    try:
        for delta in without_leading_space(session.respond(line)):
            out.write(delta)
            out.flush()
        print(file=out)
    except KeyboardInterrupt:
        print(" [stopped]", file=out)
    except ValueError as e:
        print(f"error: {e}", file=out)
    return True
