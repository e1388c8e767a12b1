"""The `direct` app's model replica serves the API itself (`ingress: replica`), with no
ingress deployment: the same API and error shapes as through the ingress, a queue of its own
(one sequence slot, a queue of one, then 429), a client that leaves frees its slot, and an
engine fault is a 500 after which Serve replaces the replica."""

from __future__ import annotations

import json

import httpx
from serving_support import (
    Stream,
    check_cancelled_stream_frees_its_slot,
    check_queue_full_answer,
    eventually,
    idle,
    per_replica,
)

LONG = {"model": "direct", "prompt": "Go on and on", "max_tokens": 1500, "stream": True, "ignore_eos": True}


def test_the_application_has_no_ingress_deployment(serving):
    from ray import serve

    from modelfleet.serving.app import MODEL_DEPLOYMENT

    deployments = set(serve.status().applications["direct"].deployments)
    assert MODEL_DEPLOYMENT in deployments
    assert "OpenAIIngress" not in deployments
    # The separate form keeps its ingress.
    assert "OpenAIIngress" in serve.status().applications["small"].deployments


def test_models_completion_and_chat_stream_through_the_openai_client(serving):
    app = serving.direct
    client = app.client()
    assert [m.id for m in client.models.list().data] == ["direct"]
    out = client.completions.create(
        model="direct", prompt="Once", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    chunks = list(
        client.chat.completions.create(
            model="direct",
            messages=[{"role": "user", "content": "Hello!"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 2  # token by token, not one body
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_errors_keep_their_openai_shape(serving):
    app = serving.direct
    url = f"{app.v1}/completions"
    resp = httpx.post(url, json={"model": "nope", "prompt": "Hi"}, timeout=30)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    resp = httpx.post(url, json={"model": "direct", "prompt": "Hi", "temperature": 5}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "temperature"
    resp = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    resp = httpx.post(url, json={"model": "direct", "prompt": "Hi", "max_tokens": 10**6}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    # ...and the replica still serves.
    assert app.client().completions.create(model="direct", prompt="Hi", max_tokens=2).choices


def test_health_ready_and_metrics(serving):
    app = serving.direct
    assert httpx.get(f"{app.base}/health", timeout=10).json() == {"status": "ok"}
    ready = httpx.get(f"{app.base}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready_replicas"] == 1
    app.client().completions.create(model="direct", prompt="Hi", max_tokens=2)

    def counted() -> bool:
        page = app.metrics()
        # The replica counts the API's answers itself, under its own replica label.
        return 'status="200"' in page and 'model_deployment="direct"' in page

    eventually(counted, 30)
    page = app.metrics()
    assert "modelfleet_ingress_waiting_requests" not in page  # there is no ingress
    assert per_replica(page, "modelfleet_queue_depth")


def test_full_queue_answers_429_then_service_resumes(serving):
    app = serving.direct
    eventually(lambda: idle(app), 60)
    url = f"{app.v1}/completions"
    running = Stream(url, LONG)
    assert running.first.wait(60) and running.status == 200
    waiting = Stream(url, {**LONG, "max_tokens": 4})  # no slot free: it waits in the replica's queue
    eventually(lambda: app.stats()["waiting"] == 1, 30)
    eventually(lambda: sum(per_replica(app.metrics(), "modelfleet_queue_depth").values()) == 1.0, 30)
    check_queue_full_answer(app)
    running.close()
    waiting.first.wait(60)
    waiting._thread.join(60)
    assert waiting.status == 200 and waiting.data[-1] == "[DONE]"
    eventually(lambda: idle(app), 60)
    assert app.client().completions.create(model="direct", prompt="Hi", max_tokens=4).choices
    eventually(lambda: 'status="429"' in app.metrics(), 30)


def test_cancelled_stream_frees_its_slot(serving):
    check_cancelled_stream_frees_its_slot(serving.direct, LONG)


def test_engine_fault_is_500_and_the_replica_is_replaced(serving):
    app = serving.direct
    before = eventually(lambda: idle(app), 60)["replica"]
    app.handle().inject_fault.remote().result()
    short = {"model": "direct", "prompt": "Hi", "max_tokens": 4}
    resp = httpx.post(f"{app.v1}/completions", json=short, timeout=30)
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["type"] == "server_error" and "injected fault" in error["message"]

    def recovered() -> bool:
        r = httpx.post(f"{app.v1}/completions", json=short, timeout=30)
        return r.status_code == 200 and bool(json.loads(r.text)["choices"])

    eventually(recovered, 180, interval=1.0)
    assert app.stats()["replica"] != before
