"""The autoscaler on a real local Serve application, reading a real Prometheus that scrapes the
application's /metrics: a burst raises replicas; afterwards they step down with no failed
request; Prometheus stopping mid-run freezes the count and says why."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from serving_support import Serving, eventually, per_replica

from e2e.load import stream_burst
from e2e.prometheus import PrometheusServer
from modelfleet.api import AutoscalingSpec
from modelfleet.operator.autoscaling.loop import LocalAutoscaler

SPEC = AutoscalingSpec(
    enabled=True,
    min_replicas=1,
    max_replicas=3,
    target_queue_depth=2,
    scale_up_stabilization_seconds=0,
    scale_down_stabilization_seconds=4,
)


@pytest.fixture(scope="module")
def auto_app(serving: Serving) -> Iterator[tuple[str, object]]:
    from ray import serve

    from modelfleet.serving.app import build_application
    from modelfleet.serving.scaling import set_model_replicas
    from modelfleet.serving.settings import ServeSettings

    settings = ServeSettings(
        name="auto",
        namespace="tests",
        model="builtin://tiny-llama",
        max_num_seqs=2,
        max_queue_depth=64,
        device="cpu",
        replicas=1,
        # Steps of at least 30 ms, as on a device: a replica adds capacity of its own instead
        # of sharing two cores, and a burst outlasts the start of the replicas it calls for.
        emulated_step_s=0.03,
    )
    base = serving.main.base.rsplit("/", 1)[0]

    # Deployed once; the autoscaler then changes the replica target in place (Serve's
    # external-scaler API), as the operator's config update does in a cluster.
    serve.run_many(
        [
            serve.RunTarget(
                build_application(settings), name="auto", route_prefix="/auto", external_scaler_enabled=True
            )
        ],
        wait_for_applications_running=True,
    )

    def deploy(replicas: int) -> None:
        set_model_replicas("auto", replicas)

    eventually(lambda: httpx.get(f"{base}/auto/ready", timeout=5).status_code == 200, 120)
    yield f"{base}/auto", deploy
    serve.delete("auto")


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("auto")
    if app is None:
        return 0
    deployment = app.deployments.get("Model")
    return deployment.replica_states.get("RUNNING", 0) if deployment else 0


def scaler_for(prometheus_url: str, deploy) -> LocalAutoscaler:
    return LocalAutoscaler(
        SPEC,
        max_num_seqs=2,
        prometheus_url=prometheus_url,
        namespace="tests",
        name="auto",
        get_ready=running_replicas,
        set_replicas=deploy,
        replicas=1,
        interval=1.0,
    )


def test_burst_scales_up_then_steps_down_without_failures(auto_app, tmp_path):
    base, deploy = auto_app
    target = base.split("//", 1)[1].split("/", 1)[0]
    with PrometheusServer([target], "1s", metrics_path="/auto/metrics", workdir=tmp_path / "prom") as prom:
        scaler = scaler_for(prom.url, deploy)
        eventually(lambda: prom.query('modelfleet_queue_depth{model_deployment="auto"}'), 60)
        scaler.start()
        try:
            started = time.monotonic()
            failures = asyncio.run(stream_burst(base, "auto", count=24, max_tokens=96))
            assert failures == [], failures[:3]
            # The burst arrived at once, before any new replica was up. The backlog waited
            # unassigned, so the replicas that came up served part of it.
            tokens = 'modelfleet_generation_tokens_total{model_deployment="auto"}'
            served = f"count(max_over_time({tokens}[10m]) > 0)"
            eventually(lambda: prom.query(served) and float(prom.query(served)[0]["value"][1]) >= 2, 10)
            ups = [p for p in scaler.timeline if p.decision == "ScaleUp"]
            seen = [(round(p.t, 1), p.queue, p.replicas, p.decision) for p in scaler.timeline]
            assert ups, f"timeline {seen}; errors {scaler.errors[-3:]}"
            assert max(p.replicas for p in scaler.timeline) > 1
            assert ups[0].t - (started - scaler.started) < 30  # decided during the burst
            # After the burst: one step at a time back to the minimum.
            eventually(lambda: scaler.replicas == 1, 90)
            downs = [p for p in scaler.timeline if p.decision == "ScaleDown"]
            peak = max(p.replicas for p in scaler.timeline)
            seen = [(round(p.t, 1), p.queue, p.replicas, p.decision) for p in scaler.timeline]
            assert len(downs) == peak - 1, seen
            assert all(
                b.replicas - a.replicas >= -1
                for a, b in zip(scaler.timeline, scaler.timeline[1:], strict=False)
            )
            assert not [e for e in scaler.errors if "did not answer" in e]
        finally:
            scaler.stop()

        # Prometheus goes away mid-run: the count freezes and the reason is kept.
        scaler = scaler_for(prom.url, deploy)
        assert scaler.step().decision is not None
    tick = scaler.step()
    assert tick.decision is None and "did not answer" in tick.error
    assert scaler.replicas == 1 and scaler.timeline[-1].decision == "MetricsUnavailable"


def held_gauge(page: str) -> float | None:
    """modelfleet_ingress_waiting_requests on a metrics page (None when absent)."""
    return next(iter(per_replica(page, "modelfleet_ingress_waiting_requests").values()), None)


def test_scaled_to_zero_a_request_is_held_then_answered_503_after_the_cold_start_timeout(serving: Serving):
    """With no model replica the ingress holds a request, shows it in
    modelfleet_ingress_waiting_requests, and answers 503 once the cold-start timeout passes."""
    from ray import serve

    from modelfleet.serving.app import build_application
    from modelfleet.serving.scaling import set_model_replicas
    from modelfleet.serving.settings import ServeSettings

    settings = ServeSettings(
        name="cold",
        namespace="tests",
        model="builtin://tiny-llama",
        device="cpu",
        replicas=1,
        cold_start_timeout_s=6.0,
    )
    base = serving.main.base.rsplit("/", 1)[0] + "/cold"
    # A deploy cannot ask for 0 replicas; the external-scaler API can (as the operator does).
    target = serve.RunTarget(
        build_application(settings), name="cold", route_prefix="/cold", external_scaler_enabled=True
    )
    serve.run_many([target], wait_for_applications_running=True)
    try:
        set_model_replicas("cold", 0)
        eventually(lambda: httpx.get(f"{base}/ready", timeout=5).status_code == 503, 60)

        async def hold_and_watch() -> tuple[httpx.Response, float]:
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": "cold", "prompt": "hello", "max_tokens": 4}
                request = asyncio.create_task(client.post(f"{base}/v1/completions", json=body))
                seen = 0.0
                while not request.done():
                    seen = max(seen, held_gauge((await client.get(f"{base}/metrics")).text) or 0.0)
                    await asyncio.sleep(0.5)
                return await request, seen

        started = time.monotonic()
        resp, held = asyncio.run(hold_and_watch())
        assert resp.status_code == 503, resp.text
        assert time.monotonic() - started >= 5.5  # held for the timeout, not refused at once
        error = resp.json()["error"]
        assert error["code"] == "no_replica_ready" and "6s" in error["message"]
        assert int(resp.headers["retry-after"]) > 0
        assert held == 1.0
        # Nothing is held any more, and the ingress still answers.
        eventually(lambda: held_gauge(httpx.get(f"{base}/metrics").text) == 0.0, 10)
        assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 200
    finally:
        serve.delete("cold")


def test_scale_to_zero_when_idle_then_from_zero_on_the_first_request(auto_app, tmp_path):
    """minReplicas 0: after the idle window the autoscaler takes the model to zero replicas; the
    next request is held at the ingress, its held count makes the autoscaler start a replica,
    and the request is answered."""
    base, deploy = auto_app
    target = base.split("//", 1)[1].split("/", 1)[0]
    spec = SPEC.model_copy(update={"min_replicas": 0, "scale_to_zero_idle_seconds": 30})
    with PrometheusServer([target], "1s", metrics_path="/auto/metrics", workdir=tmp_path / "prom") as prom:
        eventually(lambda: prom.query('modelfleet_queue_depth{model_deployment="auto"}'), 60)
        scaler = scaler_for(prom.url, deploy)
        scaler.spec = spec
        scaler.start()
        try:
            eventually(lambda: scaler.replicas == 0, 90)
            eventually(lambda: running_replicas() == 0, 60)
            assert [p.decision for p in scaler.timeline].count("ScaleToZero") == 1
            eventually(lambda: httpx.get(f"{base}/ready", timeout=5).status_code == 503, 30)

            asked = time.monotonic() - scaler.started
            resp = httpx.post(
                f"{base}/v1/completions",
                json={"model": "auto", "prompt": "wake up", "max_tokens": 8, "temperature": 0},
                timeout=300,
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["usage"]["completion_tokens"] == 8
            woke = [p for p in scaler.timeline if p.decision == "ScaleFromZero"]
            seen = [(round(p.t, 1), p.queue, p.replicas, p.decision) for p in scaler.timeline[-12:]]
            assert woke and woke[0].t >= asked and woke[0].replicas == 1, seen
            assert woke[0].queue and woke[0].queue >= 1  # the held request was the signal
        finally:
            scaler.stop()
            deploy(1)
            eventually(lambda: httpx.get(f"{base}/ready", timeout=5).status_code == 200, 120)
