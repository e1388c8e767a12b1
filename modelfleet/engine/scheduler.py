"""Continuous batching: each step is either a prefill of newly admitted prompts or one decode
token for every running sequence. When blocks run out, the youngest running sequences are
preempted and later recomputed from their tokens, so their output does not change.
"""

from __future__ import annotations

from collections import deque

from modelfleet.engine.block_manager import BlockManager
from modelfleet.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences of this step, is_prefill)."""
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.can_allocate(seq):
                break
            if batch and tokens + len(seq) > self.max_num_batched_tokens:
                break
            self.bm.allocate(seq)
            tokens += len(seq) - seq.num_cached_tokens
            seq.status = Status.RUNNING
            self.waiting.popleft()
            batch.append(seq)
        if batch:
            self.running.extend(batch)
            return batch, True
        # decode: every running sequence gets one token; preempt the youngest when out of blocks
        kept: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not self.bm.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.bm.append(seq)
                kept.append(seq)
        self.running.extend(kept)
        return kept, False

    def preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        seq.status = Status.WAITING
        self.bm.free_seq(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and free its blocks at once."""
        if seq.status == Status.FINISHED:
            return
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.bm.free_seq(seq)
