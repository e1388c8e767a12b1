"""Continuous batching must not change any output: alone, batched, preempted, or prefix-cached."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from modelfleet.engine import EngineConfig, LLMEngine, SamplingParams
from modelfleet.engine.errors import InvalidConfig
from modelfleet.engine.model_runner import StepInput
from modelfleet.engine.sequence import Sequence


def prompts(n: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(5, 1700) for _ in range(rng.randrange(3, 60))] for _ in range(n)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


LENGTHS = [8 + 5 * i for i in range(16)]


@pytest.fixture(scope="module")
def alone() -> list[list[int]]:
    engine = LLMEngine(EngineConfig(max_num_seqs=1, device="cpu", num_kv_blocks=64))
    try:
        return [engine.generate_batch([p], greedy(n))[0].token_ids
                for p, n in zip(prompts(), LENGTHS, strict=True)]
    finally:
        engine.close()


async def run_concurrently(engine: LLMEngine, ps, lengths) -> list[list[int]]:
    async def one(p, n):
        ids = []
        async for out in engine.generate(p, greedy(n)):
            ids += out.token_ids
        return ids

    try:
        return await asyncio.gather(*(one(p, n) for p, n in zip(ps, lengths, strict=True)))
    finally:
        await engine.shutdown()


async def test_sixteen_concurrent_requests_equal_each_alone(alone):
    engine = LLMEngine(EngineConfig(device="cpu", max_num_seqs=16))
    assert await run_concurrently(engine, prompts(), LENGTHS) == alone


async def test_requests_that_join_running_ones_equal_each_alone(alone):
    # each arrives a few milliseconds after the one before: its prompt runs in the same forward
    # as the decodes of those already streaming
    engine = LLMEngine(EngineConfig(device="cpu", max_num_seqs=16))

    async def one(i, p, n):
        await asyncio.sleep(0.004 * i)
        ids = []
        async for out in engine.generate(p, greedy(n)):
            ids += out.token_ids
        return ids

    try:
        pairs = enumerate(zip(prompts(), LENGTHS, strict=True))
        got = await asyncio.gather(*(one(i, p, n) for i, (p, n) in pairs))
    finally:
        await engine.shutdown()
    assert got == alone


def test_the_step_count_is_the_forward_passes_that_a_batch_shares():
    """EngineStats.steps_total counts forward passes: a lone request takes one per token, four
    started together share theirs (generation tokens over steps is the mean batch)."""
    engine = LLMEngine(EngineConfig(max_num_seqs=4, device="cpu", num_kv_blocks=64))
    try:
        assert engine.stats().steps_total == 0
        engine.generate_batch([prompts(1)[0]], greedy(6))
        st = engine.stats()
        assert (st.steps_total, st.generation_tokens_total) == (6, 6)
        engine.generate_batch(prompts(4, seed=1), greedy(6))
        st = engine.stats()
        assert (st.steps_total, st.generation_tokens_total) == (12, 30)
    finally:
        engine.close()


def test_a_step_of_prompts_and_decodes_gives_the_logits_of_each_alone():
    engine = LLMEngine(EngineConfig(device="cpu", max_num_seqs=4))
    bm, runner, bs = engine.block_manager, engine.runner, engine.config.block_size
    a, b, c = (Sequence(p, greedy(4), bs) for p in prompts(3, seed=5))

    def prefill(seqs):
        for s in seqs:
            bm.allocate(s)
        return StepInput(len(seqs), [t for s in seqs for t in s.token_ids],
                         [i for s in seqs for i in range(len(s))], [s.block_table for s in seqs],
                         [len(s) for s in seqs], [len(s) for s in seqs])

    def decode(seqs):
        return StepInput(0, [s.token_ids[-1] for s in seqs], [len(s) - 1 for s in seqs],
                         [s.block_table for s in seqs], [1] * len(seqs), [len(s) for s in seqs])

    try:
        runner.run(prefill([a, b]))
        for s in (a, b):
            s.token_ids.append(7)
            bm.append(s)
        decode_alone = runner.run(decode([a, b]))
        alone_c = prefill([c])
        c_alone = runner.run(alone_c)
        both = decode([a, b])
        # the same work in one forward (it writes the same keys and values again)
        step = StepInput(1, alone_c.input_ids + both.input_ids, alone_c.positions + both.positions,
                         alone_c.block_tables + both.block_tables, alone_c.query_lens + both.query_lens,
                         alone_c.context_lens + both.context_lens)
        logits = runner.run(step)
    finally:
        engine.close()
    assert logits.shape[0] == 3
    torch.testing.assert_close(logits[:1], c_alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1:], decode_alone, rtol=1e-4, atol=1e-4)


async def test_preemption_by_recompute_keeps_outputs(alone):
    # 24 blocks of 16 tokens hold ~3 of these sequences at once: the rest wait or get preempted
    engine = LLMEngine(EngineConfig(device="cpu", num_kv_blocks=24, max_num_seqs=16))
    got = await run_concurrently(engine, prompts(), LENGTHS)
    assert engine.stats().num_preemptions > 0
    assert got == alone


async def test_prefix_cache_hits_keep_outputs():
    system = [1, *range(200, 264)]  # a 65-token shared "system prompt": 4 full blocks
    tails = [[300 + i, 301 + i, 302] for i in range(6)]
    ps = [system + t for t in tails]
    reference = LLMEngine(EngineConfig(device="cpu", enable_prefix_caching=False))
    want = [reference.generate_batch([p], greedy(12))[0].token_ids for p in ps]
    reference.close()

    engine = LLMEngine(EngineConfig(device="cpu"))
    first = engine.generate_batch([ps[0]], greedy(12))[0]
    assert first.num_cached_tokens == 0
    rest = engine.generate_batch(ps[1:], greedy(12))
    assert [first.token_ids] + [c.token_ids for c in rest] == want
    assert all(c.num_cached_tokens == 64 for c in rest)
    stats = engine.stats()
    assert stats.prefix_cache_hits >= 4 * 5
    # the same prompt again: every full block but the one holding the last token comes from cache
    again = engine.generate_batch([ps[0]], greedy(12))[0]
    assert again.token_ids == want[0] and again.num_cached_tokens == 64
    engine.close()


async def test_generated_blocks_are_cached_for_the_next_turn():
    engine = LLMEngine(EngineConfig(device="cpu"))
    p = [1, *range(400, 420)]
    out = engine.generate_batch([p], greedy(30))[0]
    follow_up = p + out.token_ids + [7, 8, 9]
    again = engine.generate_batch([follow_up], greedy(4))[0]
    assert again.num_cached_tokens == 48  # 3 full blocks of prompt + generated tokens
    engine.close()


def test_an_emulated_step_time_paces_steps_and_changes_no_output(alone):
    """The floor stands in for a device's fixed step time; the tokens stay the engine's own."""
    floor = 0.05
    engine = LLMEngine(EngineConfig(max_num_seqs=1, device="cpu", num_kv_blocks=64, emulated_step_s=floor))
    try:
        started = time.monotonic()
        got = engine.generate_batch([prompts()[0]], greedy(LENGTHS[0]))[0].token_ids
        elapsed = time.monotonic() - started
    finally:
        engine.close()
    assert got == alone[0]
    # One prefill step and a decode step per further token, each asleep up to the floor: a
    # lower bound that sleeping guarantees, not a speed.
    assert elapsed >= LENGTHS[0] * floor


@pytest.mark.parametrize("bad", [-0.1, 11.0])
def test_an_emulated_step_time_out_of_range_names_the_field(bad):
    with pytest.raises(InvalidConfig, match="emulated_step_s"):
        EngineConfig(emulated_step_s=bad)
