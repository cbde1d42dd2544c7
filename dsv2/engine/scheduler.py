"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step is either a prefill step (new or preempted sequences, and chunks of long prompts, up to
``max_num_batched_tokens`` tokens counted as the runner computes them: every sequence padded to the longest chunk)
or a decode step (one token for every running sequence). Prefill goes first, so new requests join the running batch
as soon as there is room, but never twice in a row while sequences wait to decode. When a decode step cannot get a
cache block, the most recently admitted sequence is preempted: its blocks are freed and it goes back to the front of
the queue, to be recomputed later (its tokens so far are kept, so nothing is lost). The blocks a prefill step fills
enter the prefix cache as it is scheduled, so prompts of the same step that share them (a request's n samples, a
common system prompt) compute them once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from dsv2.engine.block_manager import BlockManager
from dsv2.engine.sequence import Sequence, Status


@dataclass
class ScheduledSequence:
    seq: Sequence
    start: int  # first token to compute
    end: int  # one past the last; when end == seq.num_tokens, the step samples a new token for it

    @property
    def samples(self) -> bool:
        return self.end == self.seq.num_tokens


@dataclass
class Batch:
    items: list[ScheduledSequence]
    is_prefill: bool

    @property
    def num_tokens(self) -> int:
        return sum(item.end - item.start for item in self.items)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.last_was_prefill = False

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        """The next step's batch; None when there is nothing to run. After a prefill step, sequences ready to
        decode get the next step: prompts arriving one after another (or a long one in chunks) never stall the
        running answers for more than a step."""
        batch = self._next()
        while batch is None and self.running:  # every running sequence is stuck for cache space: make room
            self._preempt(self.running[-1])
            batch = self._next()
        self.last_was_prefill = batch is not None and batch.is_prefill
        return batch

    def _next(self) -> Batch | None:
        if self.last_was_prefill:
            return self._schedule_decode() or self._schedule_prefill()
        return self._schedule_prefill() or self._schedule_decode()

    def _room(self, items: list[ScheduledSequence]) -> int:
        """The longest chunk one more sequence may bring: the runner pads every chunk of a step to the longest, so
        the step computes (sequences × longest chunk) tokens, which must stay within the budget. 0: none fits."""
        widest = max((item.end - item.start for item in items), default=0)
        if (len(items) + 1) * widest > self.max_num_batched_tokens:
            return 0
        return max(widest, self.max_num_batched_tokens // (len(items) + 1))

    def _schedule_prefill(self) -> Batch | None:
        items: list[ScheduledSequence] = []
        for seq in self.running:  # sequences in the middle of a chunked prefill continue first
            if (room := self._room(items)) and seq.num_tokens - seq.num_computed_tokens > 1:
                item = self._chunk(seq, room)
                if item is None:  # no room to continue it: admitting newcomers would take what it waits for
                    return Batch(items, is_prefill=True) if items else None
                items.append(item)
        while self.waiting and (room := self._room(items)) and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.attach_prefix(seq)
            item = self._chunk(seq, room)
            if item is None:  # no room in the cache (or the budget) yet: hand shared prefix blocks back
                self.blocks.release(seq)
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            self.waiting.popleft()
            self.blocks.count_prefix_hit(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            items.append(item)
        return Batch(items, is_prefill=True) if items else None

    def _chunk(self, seq: Sequence, budget: int) -> ScheduledSequence | None:
        """The next prefill chunk of ``seq`` within ``budget`` tokens, with its cache blocks; None if it cannot run
        now. Without chunked prefill the whole rest of the prompt must fit the budget."""
        remaining = seq.num_tokens - seq.num_computed_tokens
        if remaining > budget and not self.enable_chunked_prefill:
            return None
        end = seq.num_computed_tokens + min(remaining, budget)
        if not self.blocks.can_grow(seq, end):
            return None
        self.blocks.grow(seq, end)
        self.blocks.register(seq, end, pending=True)  # later sequences of this step may share these blocks
        return ScheduledSequence(seq, seq.num_computed_tokens, end)

    def _schedule_decode(self) -> Batch | None:
        """One token for every running sequence whose prompt is done, preempting from the back for cache space."""
        items = []
        for seq in [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]:
            if seq.status is not Status.RUNNING:
                continue  # preempted to make room for an earlier one
            while not self.blocks.can_grow(seq, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, seq.num_tokens)
                items.append(ScheduledSequence(seq, seq.num_computed_tokens, seq.num_tokens))
        return Batch(items, is_prefill=False) if items else None

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and queue it again at the front; it will be recomputed from its tokens."""
        self.blocks.release(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the schedule (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED
