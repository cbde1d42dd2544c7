"""Token ids → text as they are generated: deltas that never split a UTF-8 character, and stop strings.

A byte-level BPE token can hold part of a multi-byte character (a Chinese character or an emoji spans several
tokens); decoding such a prefix yields U+FFFD, so text is released only once it decodes cleanly. Decoding restarts
from a few tokens back (vLLM's prefix/read offsets) so that each step costs O(1), not O(length).
"""

from __future__ import annotations

from collections.abc import Sequence

from dsv2.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the text they complete, minus any stop string (kept with
    ``include_stop``) and what follows it."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True,
                 include_stop: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop
        self.ids: list[int] = []
        self.prefix_offset = 0  # decoding restarts here, for context
        self.read_offset = 0  # text up to this token has been appended to self.text
        self.text = ""  # all decoded text (stop string excluded once found)
        self.emitted = 0  # characters of self.text handed out so far
        self.stopped = False  # a stop string was found
        self.stop_string: str | None = None  # which one

    def add(self, token_id: int, look_for_stop: bool = True) -> str:
        """Append one token; return the text now safe to hand out (possibly ""). ``look_for_stop`` False: the text
        so far may hold a stop string that does not count yet (vLLM's min_tokens); a later call finds it."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # noqa: E731
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if look_for_stop:
                self._check_stop()
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The text held back so far (an incomplete character at the very end is released as decoded)."""
        if not self.stopped and self.read_offset < len(self.ids):
            tail = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
            head = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset],
                                         skip_special_tokens=self.skip_special_tokens)
            self.text += tail[len(head):]
            self.read_offset = len(self.ids)
            self._check_stop()
        return self._release(final=True)

    def _check_stop(self) -> None:
        """Cut self.text at the first stop string (after it with ``include_stop``). Text already handed out cannot
        hold the start of one (see _release), so the search starts there."""
        hits = [(i, s) for i, s in ((self.text.find(s, self.emitted), s) for s in self.stop) if i >= 0]
        if hits:
            index, self.stop_string = min(hits)
            self.text = self.text[:index + (len(self.stop_string) if self.include_stop else 0)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        """Hand out the new text, except (while generation goes on) a tail that could still grow into a stop
        string."""
        held = 0 if final else self._stop_prefix_length()
        delta = self.text[self.emitted:len(self.text) - held]
        self.emitted += len(delta)
        return delta

    def _stop_prefix_length(self) -> int:
        """Length of the longest tail of self.text that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self.stop), default=0)
        for k in range(min(longest - 1, len(self.text) - self.emitted), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stop):
                return k
        return 0
