"""Sampling: seeds independent of batch mates, filters, penalties, stops, logprobs, detokenization."""

from __future__ import annotations

import math

import pytest
import torch

from modelfleet.engine import EngineConfig, LLMEngine, SamplingParams
from modelfleet.engine.sampler import apply_penalties
from modelfleet.engine.sequence import Sequence
from modelfleet.engine.tokenizer import IncrementalDetokenizer

PROMPT = "The river ran past the old mill"


@pytest.fixture(scope="module")
def engine():
    e = LLMEngine(EngineConfig(device="cpu", max_num_seqs=32))
    yield e
    e.close()


def test_seeded_sampling_is_the_same_whatever_the_batch(engine):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = engine.generate_batch([PROMPT], params)[0]
    others = [SamplingParams(max_tokens=n, temperature=1.0, ignore_eos=True) for n in (5, 30, 12)]
    mixed = engine.generate_batch(
        ["Hello there", PROMPT, "A question is often", "Tea or coffee?"],
        [others[0], params, others[1], others[2]],
    )[1]
    twice = engine.generate_batch([PROMPT, PROMPT], params)
    assert alone.token_ids == mixed.token_ids == twice[0].token_ids == twice[1].token_ids
    assert alone.text == mixed.text
    other_seed = engine.generate_batch([PROMPT], SamplingParams(
        max_tokens=24, temperature=0.9, top_p=0.95, seed=99, ignore_eos=True))[0]
    assert other_seed.token_ids != alone.token_ids


@pytest.mark.parametrize("params", [
    SamplingParams(top_k=1, seed=1),
    SamplingParams(top_p=1e-6, seed=2),
    SamplingParams(min_p=1.0, seed=3),
    SamplingParams(temperature=1e-4, seed=4),
])
def test_degenerate_filters_equal_greedy(engine, params):
    greedy = engine.generate_batch([PROMPT], SamplingParams(max_tokens=16, temperature=0,
                                                            ignore_eos=True))[0]
    params.max_tokens, params.ignore_eos = 16, True
    assert engine.generate_batch([PROMPT], params)[0].token_ids == greedy.token_ids


def test_penalties():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    seq = Sequence([0], SamplingParams(repetition_penalty=2.0, presence_penalty=0.5,
                                       frequency_penalty=0.25), block_size=4)
    seq.token_ids += [1, 1, 2]  # outputs: token 1 twice, token 2 once; token 0 only in the prompt
    out = apply_penalties(logits.clone(), [seq])
    # repetition divides positive and multiplies negative logits of every seen token,
    # presence and frequency apply to generated tokens only
    expected = torch.tensor([[1.0, -2.0 - 0.5 - 0.5, 0.25 - 0.5 - 0.25, 1.0]])
    torch.testing.assert_close(out, expected)


def test_stop_strings_cut_the_text(engine):
    full = engine.generate_batch([PROMPT], SamplingParams(max_tokens=40, temperature=0,
                                                          ignore_eos=True))[0]
    stop = full.text[10:14]
    cut = full.text[: full.text.find(stop)]
    got = engine.generate_batch([PROMPT], SamplingParams(max_tokens=40, temperature=0,
                                                         stop=[stop, "never appears"]))[0]
    assert got.finish_reason == "stop" and got.text == cut


def test_stop_token_ids_and_max_tokens(engine):
    full = engine.generate_batch([PROMPT], SamplingParams(max_tokens=20, temperature=0,
                                                          ignore_eos=True))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop_id = full.token_ids[6]
    first = full.token_ids.index(stop_id)
    got = engine.generate_batch([PROMPT], SamplingParams(max_tokens=20, temperature=0,
                                                         ignore_eos=True, stop_token_ids=[stop_id]))[0]
    assert got.finish_reason == "stop" and got.token_ids == full.token_ids[: first + 1]
    assert got.text == engine.tokenizer.decode(full.token_ids[:first])


def test_logprobs_with_alternatives(engine):
    got = engine.generate_batch([PROMPT], SamplingParams(max_tokens=8, temperature=0, logprobs=3,
                                                         ignore_eos=True))[0]
    assert got.logprobs is not None and len(got.logprobs) == 8
    for lp, tid in zip(got.logprobs, got.token_ids, strict=True):
        assert lp.token_id == tid and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tid and math.isclose(lp.top[0][2], lp.logprob)
        assert lp.top[0][2] >= lp.top[1][2] >= lp.top[2][2]
        assert lp.token == engine.tokenizer.id_to_token(tid)
    assert sum(math.exp(t[2]) for t in got.logprobs[0].top) <= 1.0 + 1e-5


def test_incremental_detokenization_never_splits_a_character(engine):
    text = "Héllo wörld — 你好, naïve café 🙂🚀 done."
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.encode()) // 3  # byte-level: multi-byte characters span tokens
    detok = IncrementalDetokenizer(engine.tokenizer, [1])
    deltas = [detok.add([t]) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text
    assert any(d == "" for d in deltas)  # some tokens held back until their character completed
