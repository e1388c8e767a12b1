"""The autoscaler reading a real Prometheus server (Debian's package) that scrapes loopback targets."""

from __future__ import annotations

import pytest
from metrics_exporter import MetricsExporter

from e2e.prometheus import PrometheusServer
from e2e.waiting import eventually
from modelfleet.api import AutoscalingSpec
from modelfleet.operator.autoscaling.loop import Autoscaler
from modelfleet.operator.autoscaling.prometheus import QUEUE_QUERY

SPEC = AutoscalingSpec(enabled=True, min_replicas=1, max_replicas=8, target_queue_depth=4)


@pytest.fixture(scope="module")
def exporters():
    with MetricsExporter() as a, MetricsExporter() as b:
        yield a, b


@pytest.fixture(scope="module")
def prometheus(exporters, tmp_path_factory):
    server = PrometheusServer(
        [e.address for e in exporters], scrape_interval="1s", workdir=tmp_path_factory.mktemp("prometheus")
    )
    with server:
        yield server


def tick(scaler, url, current=1, ready=1, placeable=99):
    return scaler.tick("ns/chat", SPEC, 16, url, "ns", "chat", current, ready, placeable)


def test_burst_read_through_prometheus_scales_up_once_per_replica(exporters, prometheus):
    a, b = exporters
    # Both proxies serve the same merged page: the same replica's series twice must count once.
    for e in (a, b):
        e.set("ns", "chat", {"r1": 30.0, "r2": 10.0}, {"r1": 16, "r2": 16})
    query = QUEUE_QUERY.format(ns="ns", name="chat")
    eventually(
        lambda: prometheus.query(query) and float(prometheus.query(query)[0]["value"][1]) == 40.0, timeout=30
    )
    result = tick(Autoscaler(), prometheus.url, current=2, ready=2)
    assert result.load is not None and result.load.queue == 40.0 and result.load.running == 32.0
    assert result.decision is not None
    assert (result.decision.desired, result.decision.reason) == (8, "ScaleUp")


def test_missing_series_is_unavailable_not_zero(prometheus):
    result = Autoscaler().tick("x/none", SPEC, 16, prometheus.url, "x", "none", 3, 3, 99)
    assert result.decision is None and "no sample" in result.error


def test_scaled_to_zero_the_ingress_held_requests_scale_from_zero(exporters, prometheus):
    a, b = exporters
    # No model replica: no queue series, only the ingress' held requests (both proxies list it).
    for e in (a, b):
        e.set("ns", "cold", {}, held={"ingress-1": 6.0})
    eventually(lambda: prometheus.query('modelfleet_ingress_waiting_requests{model_deployment="cold"}'), 30)
    spec = SPEC.model_copy(update={"min_replicas": 0})
    result = Autoscaler().tick("ns/cold", spec, 16, prometheus.url, "ns", "cold", 0, 0, 99)
    assert result.load is not None and (result.load.queue, result.load.held) == (0.0, 6.0)
    assert result.decision is not None
    assert (result.decision.desired, result.decision.reason) == (2, "ScaleFromZero")
    assert result.waiting == 6.0


def test_prometheus_down_is_unavailable_and_decides_nothing(exporters, tmp_path):
    a, _ = exporters
    a.set("ns", "down", {"r1": 50.0})
    server = PrometheusServer([a.address], scrape_interval="1s", workdir=tmp_path)
    with server:
        query = QUEUE_QUERY.format(ns="ns", name="down")
        eventually(lambda: prometheus_has(server, query), timeout=30)
        assert tick_for(server.url, "down").decision is not None
    after = tick_for(server.url, "down")
    assert after.decision is None and "did not answer" in after.error


def prometheus_has(server, query):
    return bool(server.query(query))


def tick_for(url, name):
    return Autoscaler(timeout=1).tick(f"ns/{name}", SPEC, 16, url, "ns", name, 1, 1, 99)
