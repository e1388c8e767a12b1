"""worker_backend="ray": rank 1 as a Ray actor, rank 0 in this process, same tokens as TP 1."""

from __future__ import annotations

import pytest

from modelfleet.engine import EngineConfig, LLMEngine, SamplingParams

ray = pytest.importorskip("ray")


@pytest.fixture
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, namespace="modelfleet-engine-test")
    yield
    if started:
        ray.shutdown()


@pytest.mark.slow
async def test_ray_workers_match_tp1(local_ray):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = ["The river ran", "Hello there"]
    one = LLMEngine(EngineConfig(device="cpu"))
    want = [c.token_ids for c in one.generate_batch(prompts, params)]
    one.close()
    engine = LLMEngine(EngineConfig(device="cpu", tensor_parallel_size=2, worker_backend="ray"))
    try:
        got = []
        for p in prompts:
            got.append([t async for out in engine.generate(p, params) for t in out.token_ids])
        assert got == want
    finally:
        await engine.shutdown()
