"""Continuous batching: each step decodes one token for every running sequence and, in the same
forward, prefills the prompts admitted since the last step, so a request that arrives does not
hold up the ones already streaming. When blocks run out, the youngest running sequences are
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

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """One step: (prompts to prefill, running sequences that each decode one token).

        Every running sequence decodes, the youngest preempted when blocks run out. Then waiting
        prompts join in arrival order while there are sequence slots, blocks, and room in the
        token budget; the first of them joins even past the budget, so a long prompt cannot be
        kept waiting forever by the decodes. A step that had to preempt admits nothing: the
        blocks it freed go to the sequences still running."""
        decode: list[Sequence] = []
        preempted = False
        while self.running:
            seq = self.running.popleft()
            while not self.bm.can_append(seq):
                preempted = True
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.bm.append(seq)
                decode.append(seq)
        self.running.extend(decode)
        prefill: list[Sequence] = []
        tokens = len(decode)
        while not preempted and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.can_allocate(seq):
                break
            if prefill and tokens + len(seq) > self.max_num_batched_tokens:
                break
            self.bm.allocate(seq)
            tokens += len(seq) - seq.num_cached_tokens
            seq.status = Status.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            prefill.append(seq)
        return prefill, decode

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
