"""The replica count changes in place: a new replica joins while the one serving keeps
serving (no restart, no failed stream), and scaling back leaves one replica serving."""

from __future__ import annotations

import threading

import httpx
from serving_support import eventually

from modelfleet.serving.scaling import set_model_replicas


def _ready(app) -> int:
    return httpx.get(f"{app.base}/ready", timeout=10).json()["ready_replicas"]


def test_scale_out_and_back_in_place(serving):
    app = serving.main
    before = app.stats()["replica"]
    result: dict = {}

    def long_stream() -> None:
        body = {
            "model": "tiny",
            "prompt": "Keep going",
            "max_tokens": 400,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", f"{app.v1}/completions", json=body, timeout=300) as r:
            result["status"] = r.status_code
            result["events"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    reader = threading.Thread(target=long_stream)
    reader.start()
    set_model_replicas("main", 2)
    eventually(lambda: _ready(app) == 2, 180, interval=1.0)
    reader.join(300)
    assert result["status"] == 200 and result["events"][-1] == "data: [DONE]"
    assert '"completion_tokens":400' in result["events"][-2]
    seen = {app.stats()["replica"] for _ in range(12)}
    assert before in seen  # the first replica was never restarted
    set_model_replicas("main", 1)
    eventually(lambda: _ready(app) == 1, 120, interval=1.0)
    out = app.client().completions.create(model="tiny", prompt="Still here", max_tokens=4)
    assert out.usage.completion_tokens >= 1
