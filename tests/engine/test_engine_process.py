"""The engine in a process of its own: what only a separate process can get wrong.

Loading errors reach the caller, a step's fault fails only the requests in flight, the
process dying fails them with its exit code instead of leaving them waiting, and nothing
outlives the client. The API itself is tested against both engines in test_engine_api.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from modelfleet.engine import EngineConfig, InvalidConfig, InvalidRequest, LLMEngine, SamplingParams
from modelfleet.engine.process import EngineProcess, OutputPacing

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


class ListSink:
    def __init__(self) -> None:
        self.items: list = []

    def put_nowait(self, out) -> None:
        self.items.append(out)


async def eventually(check, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers signal 0; it has exited all the same
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
async def engine():
    e = await asyncio.to_thread(EngineProcess, EngineConfig(device="cpu", max_model_len=256))
    await e.start()
    yield e
    await e.shutdown()


async def test_outputs_equal_the_in_process_engine_and_the_model_lives_in_the_child(engine):
    prompts = ["The river ran", "Hello there, how are you?", "A model reads a prompt"]
    local = LLMEngine(EngineConfig(device="cpu", max_model_len=256))
    want = [c.token_ids for c in local.generate_batch(prompts, GREEDY)]
    local.close()

    async def collect(prompt):
        return [o async for o in engine.generate(prompt, GREEDY)]

    got = await asyncio.gather(*(collect(p) for p in prompts))
    assert [[t for o in outs for t in o.token_ids] for outs in got] == want
    assert engine.pid != os.getpid() and engine.alive()
    assert not hasattr(engine, "runner")  # no model weights on the client's side
    stats = engine.stats()
    assert stats.generation_tokens_total == 36 and stats.running == 0 and stats.kv_blocks_used == 0


async def test_a_step_fault_fails_the_requests_in_flight_and_the_engine_serves_on(engine):
    engine.inject_step_fault()
    sink = ListSink()
    engine.submit("Hello", GREEDY, sink)
    await eventually(lambda: sink.items)
    assert isinstance(sink.items[0], RuntimeError)
    assert str(sink.items[0]) == "engine step failed: injected fault in the model step"
    outs = [o async for o in engine.generate("Hello", GREEDY)]
    assert outs[-1].finish_reason == "length" and engine.alive()


async def test_the_process_dying_fails_what_waits_on_it_with_its_exit_code(engine):
    sink = ListSink()
    engine.submit("A long story", SamplingParams(max_tokens=200, ignore_eos=True), sink)
    await eventually(lambda: sink.items)
    os.kill(engine.pid, signal.SIGKILL)
    await eventually(lambda: isinstance(sink.items[-1], RuntimeError))
    assert "engine process exited (exit code -9)" in str(sink.items[-1])
    assert not engine.alive()
    with pytest.raises(RuntimeError, match="engine process is not running"):
        engine.submit("Hi", GREEDY, ListSink())


def test_a_step_message_larger_than_one_write_arrives_whole_under_uvloop():
    """Serve runs a replica's loop on uvloop, whose add_reader makes the pipe non-blocking. A
    step's message over 16 KB goes down the pipe in two writes (header, then body), so the
    client can find half of it there: reading it must wait for the rest, not take the
    half-read message for the engine process being gone."""
    import uvloop  # installed with ray[serve] (uvicorn[standard]), so Serve's replicas run on it
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=20)

    async def go():
        e = await asyncio.to_thread(EngineProcess, EngineConfig(device="cpu", max_model_len=256))
        await e.start()
        try:

            async def one(i):
                return [o async for o in e.generate(f"Prompt number {i} of many", params)]

            return await asyncio.gather(*(one(i) for i in range(48))), e.alive()
        finally:
            await e.shutdown()

    runs, alive = uvloop.run(go())
    assert alive
    for outs in runs:  # 48 x 21 alternatives a step: about 30 KB a message
        assert outs[-1].finish_reason == "length"
        assert sum(len(o.token_ids) for o in outs) == 6
        assert all(len(lp.top) == 20 for o in outs for lp in o.logprobs)


async def test_a_pacing_gathers_each_requests_tokens_but_sends_its_first_and_its_end_at_once(engine):
    """Four requests running, a hold of at least two seconds (one chunk a second between
    them): each request's first token comes alone and at once, the rest in a few gathered
    outputs, the last with the finish; text, tokens and logprobs are those sent unpaced."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2)
    prompts = ["The river ran", "Hello there, how are you?", "A model reads a prompt", "Once upon"]

    async def run(e):
        async def one(prompt):
            return [o async for o in e.generate(prompt, params)]

        return await asyncio.gather(*(one(p) for p in prompts))

    unpaced = await run(engine)
    paced_engine = await asyncio.to_thread(
        EngineProcess, EngineConfig(device="cpu", max_model_len=256), pacing=OutputPacing(1.0, 10.0)
    )
    await paced_engine.start()
    try:
        paced = await run(paced_engine)
    finally:
        await paced_engine.shutdown()
    assert all(len(outs) == 40 for outs in unpaced)  # one output a token
    for outs, want in zip(paced, unpaced, strict=True):
        assert len(outs) < 10, [len(o.token_ids) for o in outs]
        assert len(outs[0].token_ids) == 1 and outs[0].finish_reason is None
        assert outs[-1].finish_reason == "length" and outs[-1].usage.completion_tokens == 40
        assert [t for o in outs for t in o.token_ids] == [t for o in want for t in o.token_ids]
        assert "".join(o.text for o in outs) == "".join(o.text for o in want)
        # the alternatives in order; their values as the batch's float sums give them
        got_top = [lp.top for o in outs for lp in o.logprobs]
        want_top = [lp.top for o in want for lp in o.logprobs]
        assert [[alt[:2] for alt in top] for top in got_top] == [[alt[:2] for alt in top] for top in want_top]
        assert [alt[2] for top in got_top for alt in top] == pytest.approx(
            [alt[2] for top in want_top for alt in top], abs=1e-4
        )


async def test_a_paced_request_running_alone_gets_every_token_as_it_comes():
    e = await asyncio.to_thread(
        EngineProcess, EngineConfig(device="cpu", max_model_len=256), pacing=OutputPacing(1.0, 10.0)
    )
    await e.start()
    try:
        outs = [o async for o in e.generate("Hello", GREEDY)]
    finally:
        await e.shutdown()
    assert [len(o.token_ids) for o in outs] == [1] * 12


def test_a_pacing_holds_nothing_for_a_lone_request_and_caps_its_hold():
    pacing = OutputPacing(chunks_per_s=100.0, max_hold_s=0.25)
    assert pacing.hold(1) == 0.0
    assert pacing.hold(8) == pytest.approx(0.08)
    assert pacing.hold(64) == 0.25
    with pytest.raises(ValueError, match="chunks_per_s"):
        OutputPacing(chunks_per_s=0)


async def test_bad_input_is_refused_by_the_client_before_anything_is_sent(engine):
    with pytest.raises(InvalidRequest) as err:
        engine.submit("Hi", SamplingParams(max_tokens=300), ListSink())
    assert err.value.param == "max_tokens"
    with pytest.raises(InvalidRequest) as err:
        engine.submit([10**9], GREEDY, ListSink())
    assert err.value.param == "prompt"
    assert engine.stats().waiting == 0 and engine.alive()


def test_a_bad_config_raises_the_childs_error_with_its_field():
    with pytest.raises(InvalidConfig, match=r"^max_model_len:") as err:
        EngineProcess(EngineConfig(device="cpu", max_model_len=1 << 20))
    assert err.value.param == "max_model_len"  # the exception kept its fields across the pipe


async def test_shutdown_fails_what_is_in_flight_and_leaves_no_process():
    engine = await asyncio.to_thread(EngineProcess, EngineConfig(device="cpu", max_model_len=256))
    await engine.start()
    pid = engine.pid
    sink = ListSink()
    engine.submit("A long story", SamplingParams(max_tokens=200, ignore_eos=True), sink)
    await eventually(lambda: sink.items)
    await engine.shutdown()
    assert isinstance(sink.items[-1], RuntimeError) and "engine shut down" in str(sink.items[-1])
    assert exited(pid) and not engine.alive()


async def test_cpus_bind_the_child_and_all_its_threads():
    """`cpus` binds the engine process before torch starts its threads; the caller keeps its
    own CPUs. On a 2-core machine: the engine on one, the caller on both."""
    mine = os.sched_getaffinity(0)
    one = max(mine)
    engine = await asyncio.to_thread(EngineProcess, EngineConfig(device="cpu", max_model_len=256), 2, [one])
    try:
        await engine.start()
        sink = ListSink()
        engine.submit("The river ran", GREEDY, sink)
        await eventually(lambda: sink.items and sink.items[-1].finish_reason is not None)
        threads = [int(t) for t in os.listdir(f"/proc/{engine.pid}/task")]
        assert len(threads) >= 2  # torch's second thread exists, and is bound too
        assert all(os.sched_getaffinity(t) == {one} for t in threads)
        assert os.sched_getaffinity(0) == mine
    finally:
        await engine.shutdown()


def test_a_script_without_a_main_guard_starts_one_engine_and_loads_no_torch(tmp_path):
    """The child is a fresh interpreter, not a re-run of the caller's main module; the
    caller's process never imports torch (the model lives in the child)."""
    script = tmp_path / "plain.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from modelfleet.engine import EngineConfig, SamplingParams
            from modelfleet.engine.process import EngineProcess
            print("started", flush=True)
            engine = EngineProcess(EngineConfig(device="cpu", max_model_len=128))
            print("pid", engine.pid, flush=True)
            engine.validate("Hello", SamplingParams(max_tokens=8))
            print("torch", "torch" in sys.modules, flush=True)
            engine.close()
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines.count("started") == 1 and lines[lines.index("pid") + 1].isdigit()
    assert lines[lines.index("torch") + 1] == "False"
    assert exited(int(lines[lines.index("pid") + 1]))
