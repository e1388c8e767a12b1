"""The autoscaler on a real local Serve application, reading a real Prometheus that scrapes the
application's /metrics: a burst raises replicas; afterwards they step down with no failed
request; Prometheus stopping mid-run freezes the count and says why."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from serving_support import Serving, eventually

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


async def burst(base: str, count: int, max_tokens: int) -> list[str]:
    """`count` concurrent streamed completions; returns the failures."""
    failures: list[str] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": "auto",
            "prompt": f"request {i} says",
            "max_tokens": max_tokens,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
        }
        try:
            async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    failures.append(f"{resp.status_code}: {(await resp.aread())[:200]!r}")
                    return
                async for line in resp.aiter_lines():
                    if line == "data: [DONE]":
                        return
                failures.append("stream ended without [DONE]")
        except httpx.HTTPError as err:
            failures.append(f"{type(err).__name__}: {err}")

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(one(client, i) for i in range(count)))
    return failures


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
            failures = asyncio.run(burst(base, count=24, max_tokens=96))
            assert failures == [], failures[:3]
            ups = [p for p in scaler.timeline if p.decision == "ScaleUp"]
            seen = [(round(p.t, 1), p.queue, p.replicas, p.decision) for p in scaler.timeline]
            assert ups, f"timeline {seen}; errors {scaler.errors[-3:]}"
            assert max(p.replicas for p in scaler.timeline) > 1
            assert ups[0].t - (started - scaler.started) < 30  # decided during the burst
            # After the burst: one step at a time back to the minimum.
            eventually(lambda: scaler.replicas == 1, 90)
            downs = [p for p in scaler.timeline if p.decision == "ScaleDown"]
            peak = max(p.replicas for p in scaler.timeline)
            assert len(downs) == peak - 1
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
