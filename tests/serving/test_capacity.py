"""The `small` app has one sequence slot, takes one request more, and holds a queue of one at
the ingress: a full queue answers 429, a cancelled stream gives its slot back, and an engine
fault (injected, or the engine's process killed) fails what is in flight, after which Serve
replaces the replica."""

from __future__ import annotations

import json
import os
import signal

import openai
from serving_support import (
    Stream,
    check_cancelled_stream_frees_its_slot,
    check_queue_full_answer,
    eventually,
    idle,
    per_replica,
)

LONG = {"model": "small", "prompt": "Go on and on", "max_tokens": 1500, "stream": True, "ignore_eos": True}


def queue(app) -> tuple[float, float]:
    """(waiting at the replicas, held at the ingress) as the metrics page says."""
    page = app.metrics()
    held = per_replica(page, "modelfleet_ingress_waiting_requests")
    depth = per_replica(page, "modelfleet_queue_depth")
    return sum(v for k, v in depth.items() if k not in held), sum(held.values())


def test_full_queue_answers_429_then_service_resumes(serving):
    app = serving.small
    url = f"{app.v1}/completions"
    running = Stream(url, LONG)
    assert running.first.wait(60) and running.status == 200
    waiting = Stream(url, {**LONG, "max_tokens": 4})  # no slot free: the replica takes it, waiting
    eventually(lambda: queue(app) == (1.0, 0.0), 30)
    held = Stream(url, {**LONG, "max_tokens": 4})  # the replica is full: the ingress holds it
    eventually(lambda: queue(app) == (1.0, 1.0), 30)
    assert held.status is None  # no response yet: it has no status until a replica takes it
    check_queue_full_answer(app)
    running.close()
    for stream in (waiting, held):
        stream.first.wait(60)
        stream._thread.join(60)
        assert stream.status == 200 and stream.data[-1] == "[DONE]"
    eventually(lambda: idle(app), 60)
    eventually(lambda: queue(app) == (0.0, 0.0), 10)
    out = app.client().completions.create(model="small", prompt="Hi", max_tokens=4)
    assert out.choices[0].text is not None
    eventually(lambda: 'status="429"' in app.metrics(), 30)


def test_cancelled_stream_frees_its_slot(serving):
    check_cancelled_stream_frees_its_slot(serving.small, LONG)


def test_engine_fault_is_500_and_the_replica_is_replaced(serving):
    app = serving.small
    before = app.stats()["replica"]
    app.handle().inject_fault.remote().result()
    try:
        app.client().completions.create(model="small", prompt="Hi", max_tokens=4)
        raise AssertionError("expected a 500")
    except openai.InternalServerError as err:
        assert err.body["type"] == "server_error"
        assert "injected fault" in err.body["message"]

    def recovered() -> bool:
        out = app.client(timeout=30).completions.create(model="small", prompt="Hi", max_tokens=4)
        return bool(out.choices)

    eventually(recovered, 180, interval=1.0)
    assert app.stats()["replica"] != before


def test_engine_process_killed_mid_stream_ends_it_with_an_error_and_the_replica_is_replaced(serving):
    """A real fault rather than an injected one: the replica's engine process dies."""
    app = serving.small
    st = eventually(lambda: idle(app), 180)
    pid = st["engine_pid"]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"modelfleet.engine.process" in f.read()  # the engine is a process of its own
    stream = Stream(f"{app.v1}/completions", LONG)
    assert stream.first.wait(60) and stream.status == 200
    eventually(lambda: stream.events >= 3, 30)
    os.kill(pid, signal.SIGKILL)
    stream._thread.join(60)
    assert stream.data[-1] == "[DONE]"  # the stream ends properly, with the error just before
    error = json.loads(stream.data[-2])["error"]
    assert error["type"] == "server_error"
    assert "engine process exited (exit code -9)" in error["message"]

    def recovered() -> bool:
        out = app.client(timeout=30).completions.create(model="small", prompt="Hi", max_tokens=4)
        return bool(out.choices)

    eventually(recovered, 180, interval=1.0)
    after = app.stats()
    assert after["replica"] != st["replica"] and after["engine_pid"] != pid
