"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, and a prefix cache.

A full block is named by a hash chained through every block before it, so two prompts share
a cached block only when their whole prefixes match. Freed blocks keep their hash until they
are handed out again, so a later request with the same prefix (a system prompt) reuses them.
Block 0 is reserved: it stays zero and padded attention gathers read it.
"""

from __future__ import annotations

from collections import OrderedDict

from modelfleet.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "hash", "ref_count", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(prev: int | None, tokens: list[int]) -> int:
    return hash((prev, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks, least recently freed first; cached-but-free ones are evicted last-in-last-out
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_caching = enable_prefix_caching
        self.cache_hits = 0
        self.cache_queries = 0

    @property
    def num_total(self) -> int:
        return len(self.blocks) - 1

    @property
    def num_free(self) -> int:
        return len(self.free)

    def _take(self, block_id: int | None = None) -> Block:
        if block_id is None:
            block_id, _ = self.free.popitem(last=False)
        else:
            del self.free[block_id]
        block = self.blocks[block_id]
        block.ref_count = 1
        return block

    def _fresh(self) -> Block:
        block = self._take()
        if block.hash is not None and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids = None, ()
        return block

    def _register(self, block: Block, h: int, tokens: list[int]) -> None:
        block.hash, block.token_ids = h, tuple(tokens)
        if self.prefix_caching:
            self.hash_to_block[h] = block.block_id

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free >= seq.num_blocks  # conservative: ignores possible cache hits

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached full blocks."""
        assert not seq.block_table
        h: int | None = None
        hitting = self.prefix_caching
        cached = 0
        for i in range(seq.num_blocks):
            tokens = seq.block_tokens(i)
            full = len(tokens) == self.block_size
            # the last prompt token is always computed, so its block is never taken from cache
            cacheable = full and (i + 1) * self.block_size < len(seq)
            h = chain_hash(h, tokens) if full else None
            block = None
            if hitting and cacheable:
                self.cache_queries += 1
                bid = self.hash_to_block.get(h)
                if bid is not None and self.blocks[bid].token_ids == tuple(tokens):
                    block = self.blocks[bid]
                    if block.ref_count == 0:
                        self._take(bid)
                    else:
                        block.ref_count += 1
                    self.cache_hits += 1
                    cached += self.block_size
                else:
                    hitting = False
            if block is None:
                block = self._fresh()
                if full:
                    self._register(block, h, tokens)
            seq.block_table.append(block.block_id)
        seq.num_cached_tokens = cached
        seq.num_computed_tokens = cached

    def free_seq(self, seq: Sequence) -> None:
        # release in reverse so a prefix's first blocks are the last to be evicted
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        return self.num_free >= (1 if len(seq) > len(seq.block_table) * self.block_size else 0)

    def append(self, seq: Sequence) -> None:
        """Before a decode step: make room for the last token; name its block once it is full."""
        if len(seq) > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._fresh().block_id)
        if len(seq) % self.block_size == 0:
            last = len(seq) // self.block_size - 1
            prev = self.blocks[seq.block_table[last - 1]].hash if last > 0 else None
            if last == 0 or prev is not None:
                block = self.blocks[seq.block_table[last]]
                self._register(block, chain_hash(prev, seq.block_tokens(last)), seq.block_tokens(last))
