"""Cache blocks of the paged latent cache: ref-counted, with prefix caching by chained block hashes.

A full block is identified by a cryptographic digest of (previous block's digest, its tokens), so equal digests mean
equal prefixes: no request can craft a collision and be served latents computed for another prompt.
Freed blocks keep their contents and hash until the block is handed out again (least recently freed first), so a
later request with the same prompt prefix finds them and skips recomputing it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from dsv2.engine.sequence import Sequence

NO_HASH = None


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = NO_HASH
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def chained_hash(previous: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """blake2b of the previous block's digest and this block's token ids (as 64-bit integers)."""
    return hashlib.blake2b((previous or b"") + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # oldest first
        self.cached: dict[bytes, int] = {}  # digest → block id, for full blocks whose contents are computed
        self.pending: list[int] = []  # blocks registered for the step being scheduled, before it runs
        self.prefix_hits = 0  # prompt tokens served from the prefix cache
        self.prefix_queries = 0  # prompt tokens looked up

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------------------------------ allocation
    def _take_free_block(self) -> Block:
        block = self.blocks[self.free.popitem(last=False)[0]]
        if block.hash is not NO_HASH and self.cached.get(block.hash) == block.id:
            del self.cached[block.hash]  # its old contents are about to be overwritten
        block.hash, block.token_ids, block.ref_count = NO_HASH, (), 1
        return block

    def _reuse(self, block: Block) -> None:
        if block.ref_count == 0:
            del self.free[block.id]
        block.ref_count += 1

    def attach_prefix(self, seq: Sequence) -> None:
        """For a sequence without blocks: reuse cached blocks for the longest computed prefix of its tokens.

        The last token is never taken from the cache: its logits are needed to sample the next one.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0, "attach_prefix on a sequence with blocks"
        if not self.enable_prefix_caching:
            return
        full_blocks = seq.cacheable_prefix // self.block_size
        previous = NO_HASH
        for i in range(full_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            previous = chained_hash(previous, tokens)
            block_id = self.cached.get(previous)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._reuse(self.blocks[block_id])
            seq.block_table.append(block_id)
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size
        seq.num_hashed_blocks = len(seq.block_table)

    def count_prefix_hit(self, seq: Sequence) -> None:
        """Statistics, counted once a sequence really starts: prompt tokens looked up and found."""
        self.prefix_queries += seq.num_tokens - 1
        self.prefix_hits += seq.num_cached_tokens

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` blocks for its first ``num_tokens`` tokens (the caller checked ``can_grow``)."""
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._take_free_block().id)

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are now full and computed, so other requests can share them."""
        self.register(seq, seq.num_computed_tokens)

    def register(self, seq: Sequence, num_tokens: int, pending: bool = False) -> None:
        """Register the blocks that the sequence's first ``num_tokens`` tokens fill. ``pending``: the step being
        scheduled computes them (each layer writes a step's latents before any attention reads them, so later
        sequences of the same step may share them); `confirm` keeps them once it ran, `forget_pending` drops them
        if it failed."""
        if not self.enable_prefix_caching:
            return
        full = num_tokens // self.block_size
        for i in range(seq.num_hashed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is NO_HASH:
                previous = self.blocks[seq.block_table[i - 1]].hash if i else NO_HASH
                block.token_ids = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
                block.hash = chained_hash(previous, block.token_ids)
                self.cached.setdefault(block.hash, block.id)
                if pending:
                    self.pending.append(block.id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def confirm(self) -> None:
        """The scheduled step ran: its pending blocks hold what their hashes say."""
        self.pending.clear()

    def forget_pending(self) -> None:
        """The scheduled step failed: its pending blocks hold nothing yet, so no later request may take them."""
        for block_id in self.pending:
            block = self.blocks[block_id]
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = NO_HASH, ()
        self.pending.clear()

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's hold on its blocks; unshared ones become free (cached contents kept)."""
        for block_id in reversed(seq.block_table):  # the prompt's first blocks are the most reusable: freed last
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0
