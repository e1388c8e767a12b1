"""The serving benchmark's estimator: which of a level's alternating served/offline pairs it
reports, and what it adds up across them."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the serving benchmark's client needs aiohttp (the test extra)")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
_spec = importlib.util.spec_from_file_location("serve_load", _PATH)
serve_load = importlib.util.module_from_spec(_spec)
sys.modules["serve_load"] = serve_load  # dataclasses resolve their annotations through it
_spec.loader.exec_module(serve_load)


def pair(served_tok_s: float, offline_tok_s: float, errors: int = 0, cpu_s: float = 1.0):
    lv = serve_load.Level(concurrency=32, requests=128, errors=errors, tokens=int(served_tok_s), wall_s=1.0)
    lv.offline_tokens, lv.offline_wall_s = int(offline_tok_s), 1.0
    lv.cpu_s, lv.offline_cpu_s, lv.offline_requests = cpu_s, cpu_s / 2, 128
    lv.ttft = [served_tok_s / 1e6]  # tells the pairs' latencies apart
    return lv


def test_the_median_ratio_pair_is_reported_with_its_own_latencies():
    runs = [pair(900, 1000), pair(5000, 8000), pair(700, 1000), pair(6000, 6000), pair(4000, 5000)]
    level = serve_load.median_pair(runs)
    assert level is runs[4]  # ratios 0.9, 0.625, 0.7, 1.0, 0.8: the median is 0.8
    assert level.summary()["overhead_ratio"] == 0.8
    assert level.ttft == [4000 / 1e6]
    assert [round(r, 3) for r in level.pair_ratios] == [0.9, 0.625, 0.7, 1.0, 0.8]
    # the old estimator, best served over best offline: 6000 / 8000
    assert level.summary()["best_of_ratio"] == 0.75


def test_an_even_count_takes_the_lower_middle_and_every_error_counts():
    runs = [pair(900, 1000, errors=1), pair(800, 1000), pair(1000, 1000, errors=2), pair(700, 1000)]
    level = serve_load.median_pair(runs)
    assert level.ratio == pytest.approx(0.8)
    assert level.errors == 3


def test_cpu_per_request_is_the_median_of_each_side():
    runs = [pair(900, 1000, cpu_s=1.0), pair(800, 1000, cpu_s=3.0), pair(1000, 1000, cpu_s=2.0)]
    level = serve_load.median_pair(runs)
    assert level.cpu_s == pytest.approx(2.0)
    assert level.offline_cpu_s == pytest.approx(1.0)


def test_the_batch_is_the_median_of_each_side_and_its_ratio_is_reported():
    runs = [pair(900, 1000), pair(800, 1000), pair(1000, 1000), pair(700, 1000)]
    sides = [(30.0, 31.5), (29.0, 32.0), (31.0, 31.0), (None, 31.8)]
    for run, (served, offline) in zip(runs, sides, strict=True):
        run.batch, run.offline_batch = served, offline
    level = serve_load.median_pair(runs)
    assert level.batch == pytest.approx(30.0)  # the side's known values: 29, 30, 31
    assert level.offline_batch == pytest.approx((31.5 + 31.8) / 2)
    assert level.summary()["batch_ratio"] == round(30.0 / 31.65, 3)
    # an endpoint without the steps counter: no batch, and no ratio made up for it
    lone = pair(900, 1000)
    assert serve_load.median_pair([lone]).summary()["batch_ratio"] is None


@pytest.mark.parametrize(("form", "kind"), [("process", "EngineProcess"), ("in-process", "LLMEngine")])
def test_the_offline_side_runs_the_engine_form_it_names(form, kind):
    """The ratio's baseline: the engine as a replica runs it (a process of its own, one torch
    thread) unless asked for the in-process engine; either runs every request to its end."""
    import argparse
    import asyncio

    import torch

    args = argparse.Namespace(
        offline=form, model_uri="builtin://tiny-llama", max_num_seqs=4, engine_threads=1
    )

    async def go():
        engine = await serve_load.offline_engine(args)
        try:
            level = serve_load.Level(concurrency=2)
            await serve_load.offline_level(engine, serve_load.make_prompts(3), 2, 5, level)
            threads = engine.info.torch_threads if form == "process" else None
            return type(engine).__name__, level, threads
        finally:
            await engine.shutdown()

    before = torch.get_num_threads()
    try:
        name, level, threads = asyncio.run(go())
    finally:
        torch.set_num_threads(before)  # the in-process form sets this process' count
    assert name == kind
    assert (level.offline_requests, level.offline_tokens) == (3, 15)
    # 15 tokens by two streams: between one sequence per step and two
    assert level.offline_batch is not None and 1.0 < level.offline_batch <= 2.0
    if form == "process":
        assert threads == 1
