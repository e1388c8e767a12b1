"""Capacity judgement and status computation, table-tested without a cluster."""

from __future__ import annotations

import pytest
from manifest_cases import with_

from modelfleet.api import parse_manifest
from modelfleet.operator.capacity import judge
from modelfleet.operator.settings import OperatorSettings
from modelfleet.operator.status import Observation, compute_status, failed_status, transitions

H100 = "NVIDIA-H100-80GB-HBM3"


def node(name, gpus, product=H100, taint=True, labels=None, unschedulable=False):
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product, **(labels or {})}},
        "spec": {
            "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
            if taint
            else [],
            "unschedulable": unschedulable,
        },
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "64"}},
    }


def pod(node_name, gpus, phase="Running"):
    return {
        "spec": {
            "nodeName": node_name,
            "containers": [{"resources": {"requests": {"nvidia.com/gpu": gpus}}}],
        },
        "status": {"phase": phase},
    }


def md_of(changes):
    md = parse_manifest(with_(changes))
    md.metadata.uid = "u"
    md.metadata.generation = 1
    return md


def verdict(md, nodes, pods, own=0, want=None):
    return judge(md, nodes, pods, own, want)


def test_tp16_on_8_gpu_nodes_names_the_counts():
    md = md_of({"spec.engine.tensorParallelSize": 16, "spec.resources.gpu.product": H100})
    v = verdict(md, [node("a", 8), node("b", 8)], [])
    assert v.limited and v.reason == "InsufficientGPUsOnAnyNode"
    assert v.message == (
        "1 replica cannot be placed: it needs 16 x nvidia.com/gpu (NVIDIA-H100-80GB-HBM3) "
        "on one node; the largest node has 8"
    )


@pytest.mark.parametrize(
    ("tp", "replicas", "nodes", "pods", "limited", "placeable"),
    [
        (4, 2, [("a", 8)], [], False, 2),
        (4, 3, [("a", 8)], [], True, 2),
        (4, 3, [("a", 8), ("b", 8)], [("a", 8)], True, 2),
        (2, 4, [("a", 8)], [("a", 2, "Succeeded")], False, 4),  # finished pods free their GPUs
        (8, 1, [("a", 8)], [("a", 1)], True, 0),
        (1, 16, [("a", 8), ("b", 8)], [], False, 16),
    ],
)
def test_placement_table(tp, replicas, nodes, pods, limited, placeable):
    md = md_of({"spec.engine.tensorParallelSize": tp, "spec.replicas": replicas})
    v = verdict(md, [node(*n) for n in nodes], [pod(*p) for p in pods])
    assert (v.limited, v.placeable) == (limited, placeable), v.message


def test_product_selector_taints_and_cordons_filter_nodes():
    md = md_of({"spec.resources.gpu.product": H100, "spec.placement.nodeSelector": {"pool": "llm"}})
    nodes = [
        node("wrong-product", 8, product="NVIDIA-A100-SXM4-80GB", labels={"pool": "llm"}),
        node("wrong-pool", 8, labels={"pool": "batch"}),
        node("cordoned", 8, labels={"pool": "llm"}, unschedulable=True),
    ]
    v = verdict(md, nodes, [])
    assert v.limited and "no eligible node" in v.message
    assert v.reason == "InsufficientGPUsOnAnyNode"
    v = verdict(md, [*nodes, node("good", 8, labels={"pool": "llm"})], [])
    assert not v.limited


def test_untolerated_taint_excludes_a_node():
    md = md_of({})
    tainted = node("a", 8)
    tainted["spec"]["taints"].append({"key": "dedicated", "value": "other", "effect": "NoSchedule"})
    assert verdict(md, [tainted], []).limited
    md = md_of(
        {
            "spec.placement.tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "other", "effect": "NoSchedule"}
            ]
        }
    )
    assert not verdict(md, [tainted], []).limited


def test_cpu_mode_is_never_gpu_limited():
    md = md_of({"spec.resources.accelerator": "cpu", "spec.replicas": 5})
    assert not verdict(md, [], []).limited


def test_own_bound_replicas_count_as_placed():
    md = md_of({"spec.engine.tensorParallelSize": 8, "spec.replicas": 2})
    # Both nodes are full of this deployment's own pods: nothing more is needed.
    v = verdict(md, [node("a", 8), node("b", 8)], [pod("a", 8), pod("b", 8)], own=2)
    assert not v.limited


# --- status ----------------------------------------------------------------------------------


def cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_ready_when_all_replicas_serve():
    md = md_of({"spec.replicas": 2})
    s = compute_status(md, Observation(workers=2, ready=2, updated=2, head_ready=True), {})
    assert s["phase"] == "Ready" and s["ready"] == "2/2" and s["readyReplicas"] == 2
    assert cond(s, "Ready")["status"] == "True" and cond(s, "Progressing")["status"] == "False"
    assert s["selector"] == (
        "app.kubernetes.io/name=modelfleet,app.kubernetes.io/instance=tiny,app.kubernetes.io/component=worker"
    )
    assert s["endpoint"] == "http://tiny.default.svc.cluster.local:8000/v1"
    assert s["observedGeneration"] == 1


def test_pending_with_capacity_limit_says_why():
    md = md_of({"spec.engine.tensorParallelSize": 16})
    v = verdict(md, [node("a", 8)], [])
    s = compute_status(
        md, Observation(workers=1, capacity=v, unschedulable="pod x: 0/1 nodes are available"), {}
    )
    assert s["phase"] == "Pending"
    limited = cond(s, "CapacityLimited")
    assert limited["status"] == "True" and "the largest node has 8" in limited["message"]
    events = transitions({}, s)
    assert ("Warning", "CapacityLimited", limited["message"]) in events


def test_loading_then_degraded_after_a_replica_dies():
    md = md_of({"spec.replicas": 2})
    loading = compute_status(md, Observation(workers=2, ready=1, updated=2, head_ready=True), {})
    assert loading["phase"] == "Loading"
    ready = compute_status(md, Observation(workers=2, ready=2, updated=2, head_ready=True), loading)
    degraded = compute_status(md, Observation(workers=2, ready=1, updated=2, head_ready=True), ready)
    assert degraded["phase"] == "Degraded" and cond(degraded, "Degraded")["status"] == "True"
    back = compute_status(md, Observation(workers=2, ready=2, updated=2, head_ready=True), degraded)
    assert back["phase"] == "Ready" and cond(back, "Degraded")["status"] == "False"
    assert [e[1] for e in transitions(ready, degraded)] == ["Degraded"]


def test_losing_the_only_replica_while_serving_is_degraded_not_loading():
    md = md_of({})
    ready = compute_status(md, Observation(workers=1, ready=1, updated=1, head_ready=True), {})
    assert ready["phase"] == "Ready"
    for seen in (  # the pod is gone, or its replacement is still loading
        Observation(workers=0, ready=0, updated=0, head_ready=True),
        Observation(workers=1, ready=0, updated=1, head_ready=True),
    ):
        lost = compute_status(md, seen, ready)
        assert lost["phase"] == "Degraded", seen
        assert cond(lost, "Ready")["reason"] == "ReplicasUnavailable"
        assert cond(lost, "Degraded")["status"] == "True"
    # A fresh object with no replica yet is loading, not degraded.
    fresh = Observation(workers=1, ready=0, updated=1, head_ready=True)
    assert compute_status(md, fresh, {})["phase"] == "Loading"


def test_crash_looping_worker_is_degraded_with_the_pod_named():
    md = md_of({})
    s = compute_status(
        md, Observation(workers=1, ready=0, updated=1, crashing="pod tiny-workers-x: crash"), {}
    )
    assert s["phase"] == "Degraded" and "tiny-workers-x" in cond(s, "Degraded")["message"]


def test_unchanged_world_gives_an_identical_status():
    md = md_of({})
    seen = Observation(workers=1, ready=1, updated=1, head_ready=True)
    first = compute_status(md, seen, {})
    assert compute_status(md, seen, first) == first
    assert transitions(first, first) == []


def test_transition_time_kept_while_status_holds():
    md = md_of({})
    first = compute_status(md, Observation(workers=1, ready=1, updated=1), {})
    old = [dict(c, lastTransitionTime="2020-01-01T00:00:00Z") for c in first["conditions"]]
    again = compute_status(md, Observation(workers=1, ready=1, updated=1), {**first, "conditions": old})
    assert all(c["lastTransitionTime"] == "2020-01-01T00:00:00Z" for c in again["conditions"])


def test_scale_to_zero_is_ready():
    md = md_of({"spec.replicas": 0, "spec.autoscaling": {"enabled": True, "minReplicas": 0}})
    s = compute_status(md, Observation(), {})
    assert s["phase"] == "Ready" and cond(s, "Ready")["reason"] == "ScaledToZero"


def test_failed_status_lists_problems():
    s = failed_status("x", 3, ["spec.engine.tensorParallelSize: must be a valid integer"], {})
    assert s["phase"] == "Failed" and s["observedGeneration"] == 3
    assert cond(s, "Ready")["reason"] == "InvalidSpec"
    assert "tensorParallelSize" in cond(s, "Ready")["message"]


def test_settings_from_environment():
    s = OperatorSettings.from_env(
        {
            "MODELFLEET_SERVING_IMAGE": "img:1",
            "MODELFLEET_WATCH_NAMESPACES": "a, b",
            "MODELFLEET_RECONCILE_INTERVAL_SECONDS": "2.5",
            "OTHER": "x",
        }
    )
    assert s.serving_image == "img:1" and s.watch_namespaces == ("a", "b")
    assert s.reconcile_interval_seconds == 2.5
    with pytest.raises(ValueError, match="MODELFLEET_HEALTH_PORT"):
        OperatorSettings.from_env({"MODELFLEET_HEALTH_PORT": "eighty"})
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        OperatorSettings.from_env({"MODELFLEET_LOG_FORMAT": "xml"})


def test_drain_waits_for_the_replica_to_stop(tmp_path):
    import threading

    from modelfleet.operator.drain import wait_until_stopped

    ready = tmp_path / "ready"
    ready.write_text("1")
    threading.Timer(0.3, ready.unlink).start()
    assert wait_until_stopped(str(ready), timeout=10, poll=0.05)
    ready.write_text("1")
    assert not wait_until_stopped(str(ready), timeout=0.2, poll=0.05)


def test_namespace_terminating_is_recognised():
    from kubernetes.client.rest import ApiException

    from modelfleet.operator.reconcile import namespace_terminating

    body = b'{"details":{"causes":[{"reason":"NamespaceTerminating"}]},"code":403}'
    assert namespace_terminating(ApiException(status=403, reason="Forbidden", body=body))
    assert not namespace_terminating(
        ApiException(status=403, reason="Forbidden", body=b'{"reason":"Forbidden"}')
    )
    assert not namespace_terminating(ApiException(status=409, reason="Conflict", body=body))


def test_a_namespace_going_away_mid_refresh_keeps_the_status_and_raises_nothing():
    """The API server refuses the Ray token Secret because the namespace is being deleted (a race
    a real cluster shows only now and then, so the refusal is injected here): the refresh keeps
    the last status instead of failing the handler."""
    from kubernetes.client.exceptions import ApiException

    from modelfleet.operator.reconcile import Reconciler
    from modelfleet.operator.settings import OperatorSettings

    body = b'{"details":{"causes":[{"reason":"NamespaceTerminating"}]},"code":403}'

    class Refusing:
        def create(self, obj):
            raise ApiException(status=403, reason="Forbidden", body=body)

    class Fleet:
        def pods(self, namespace, selector):
            return []

        def deployment(self, namespace, name):
            return {"status": {"readyReplicas": 1}}

    rec = Reconciler(OperatorSettings(), kube=Refusing())  # type: ignore[arg-type]
    rec.fleet = Fleet()  # type: ignore[assignment]
    manifest = {
        "apiVersion": "modelfleet.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "gone", "namespace": "ending", "uid": "u1", "generation": 1},
        "spec": {"model": {"uri": "builtin://tiny-llama"}},
    }
    previous = {"phase": "Ready"}
    assert rec.reconcile(manifest, apply_children=False, previous=previous) == (previous, [])
