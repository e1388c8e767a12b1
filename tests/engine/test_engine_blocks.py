"""Block manager and scheduler bookkeeping, without a model."""

from __future__ import annotations

from modelfleet.engine.block_manager import BlockManager
from modelfleet.engine.params import SamplingParams
from modelfleet.engine.scheduler import Scheduler
from modelfleet.engine.sequence import Sequence


def seq(tokens: list[int], bs: int = 4) -> Sequence:
    return Sequence(tokens, SamplingParams(temperature=0), bs)


def test_allocate_free_and_reuse_full_blocks():
    bm = BlockManager(num_blocks=9, block_size=4)
    assert bm.num_total == 8 and bm.num_free == 8
    a = seq(list(range(10)))
    bm.allocate(a)
    assert len(a.block_table) == 3 and 0 not in a.block_table and bm.num_free == 5
    assert a.num_cached_tokens == 0
    b = seq(list(range(10)))
    bm.allocate(b)  # the two full blocks are shared, the partial third one is not
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8 and bm.num_free == 4
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.num_free == 8
    c = seq(list(range(9)))  # freed blocks keep their hashes
    bm.allocate(c)
    assert c.num_cached_tokens == 8


def test_the_block_of_the_last_token_is_always_computed():
    bm = BlockManager(num_blocks=9, block_size=4)
    a = seq(list(range(8)))
    bm.allocate(a)
    b = seq(list(range(8)))
    bm.allocate(b)
    assert b.num_cached_tokens == 4  # block 2 holds the last token: recomputed


def test_hash_chains_through_the_prefix():
    bm = BlockManager(num_blocks=9, block_size=4)
    bm.allocate(seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = seq([0, 0, 0, 0, 5, 6, 7, 8, 9])  # same second block, different first one
    bm.allocate(other)
    assert other.num_cached_tokens == 0


def test_append_allocates_and_names_full_blocks():
    bm = BlockManager(num_blocks=9, block_size=4)
    s = seq([1, 2, 3])
    bm.allocate(s)
    s.token_ids.append(4)  # 4 tokens, the last one not yet computed
    assert bm.can_append(s)
    bm.append(s)
    assert len(s.block_table) == 1 and bm.blocks[s.block_table[0]].hash is not None
    s.token_ids.append(5)
    bm.append(s)
    assert len(s.block_table) == 2


def test_scheduler_preempts_the_youngest_when_blocks_run_out():
    bm = BlockManager(num_blocks=5, block_size=4)  # 4 usable blocks
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = seq([1, 2, 3, 4, 5, 6, 7]), seq([9, 9, 9, 9, 9, 9, 9])
    sched.add(a)
    sched.add(b)
    prefill, decode = sched.schedule()
    assert prefill == [a, b] and decode == [] and bm.num_free == 0
    for s in (a, b):
        s.token_ids.append(1)  # 8 tokens: still fits two blocks each
    assert sched.schedule() == ([], [a, b])
    for s in (a, b):
        s.token_ids.append(1)  # 9 tokens: each needs a third block, only by preempting b
    assert sched.schedule() == ([], [a])  # b's freed blocks go to a, not back to b at once
    assert list(sched.waiting) == [b] and sched.num_preemptions == 1
    sched.finish(a)
    prefill, decode = sched.schedule()
    assert prefill == [b] and decode == [] and b.num_computed_tokens == 4  # its first block was cached


def test_token_budget_and_max_num_seqs():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=10)
    seqs = [seq([i] * 6) for i in range(4)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule() == (seqs[:1], [])  # a second 6-token prompt would pass the 10-token budget
    # the next prompt joins the first one's decode: 1 + 6 tokens fit; then max_num_seqs=2 is reached
    assert sched.schedule() == (seqs[1:2], seqs[:1])
    assert len(sched.running) == 2 and len(sched.waiting) == 2
    seqs[0].token_ids.append(1)
    seqs[1].token_ids.append(1)
    assert sched.schedule() == ([], seqs[:2])
