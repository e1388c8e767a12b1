"""The operator against the real control plane with a kwok GPU fleet.

The operator runs as a real process (`modelfleet operator`), as in a pod, with a 1 s status
refresh. Pods under kwok do not run Ray, so the Serve side is checked through the Serve config
the operator keeps in a ConfigMap; the dashboard URL points at a closed loopback port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from metrics_exporter import MetricsExporter

from e2e.cluster import Cluster, free_port
from e2e.prometheus import PrometheusServer
from e2e.waiting import eventually

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
H100 = "NVIDIA-H100-80GB-HBM3"


class Operator:
    """`modelfleet operator` as a child process with its log in a file."""

    def __init__(self, cluster: Cluster, log: Path, prometheus_url: str):
        self.cluster, self.log, self.prometheus_url = cluster, log, prometheus_url
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "MODELFLEET_RECONCILE_INTERVAL_SECONDS": "1",
            "MODELFLEET_DASHBOARD_URL": "http://127.0.0.1:9/{namespace}/{head}",
            "MODELFLEET_DASHBOARD_TIMEOUT_SECONDS": "0.5",
            "MODELFLEET_HEALTH_PORT": str(self.health_port),
            "MODELFLEET_METRICS_PORT": str(free_port()),
            "MODELFLEET_SERVING_IMAGE": "modelfleet:test",
            "MODELFLEET_PROMETHEUS_URL": self.prometheus_url,
            "MODELFLEET_AUTOSCALE_INTERVAL_SECONDS": "1",
            "MODELFLEET_HEAD_CPU": "100m",
            "MODELFLEET_HEAD_MEMORY": "128Mi",
        }
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelfleet.cli", "operator", "--standalone"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        import httpx

        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.tail()
            return httpx.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2).status_code == 200

        eventually(healthy, timeout=60)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 40) -> str:
        return (
            "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""
        )


@pytest.fixture(scope="module")
def exporter() -> Iterator[MetricsExporter]:
    with MetricsExporter() as e:
        yield e


@pytest.fixture(scope="module")
def prometheus(exporter: MetricsExporter, tmp_path_factory) -> Iterator[PrometheusServer]:
    with PrometheusServer([exporter.address], "1s", workdir=tmp_path_factory.mktemp("prometheus")) as server:
        yield server


# Enough of the Prometheus Operator's CRD for the operator to notice it and create PodMonitors.
POD_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "podmonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {"kind": "PodMonitor", "plural": "podmonitors", "singular": "podmonitor"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, crd: str, prometheus: PrometheusServer, tmp_path_factory
) -> Iterator[Operator]:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(POD_MONITOR_CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/podmonitors.monitoring.coreos.com")
    eventually(lambda: cluster.kubectl("get", "podmonitors", "-A", check=False).returncode == 0, timeout=30)
    op = Operator(cluster, tmp_path_factory.mktemp("operator") / "operator.log", prometheus.url)
    op.start()
    yield op
    op.stop()
    assert "Traceback" not in op.log.read_text(errors="replace"), op.tail(80)


def manifest(name: str, **spec) -> str:
    doc = yaml.safe_load((ROOT / "examples/tiny.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"].update(spec)
    return yaml.safe_dump(doc)


def apply(cluster: Cluster, namespace: str, text: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=text)


def get(cluster: Cluster, namespace: str, *what: str) -> dict:
    return cluster.get_json("-n", namespace, *what)


def md_status(cluster: Cluster, namespace: str, name: str) -> dict:
    return get(cluster, namespace, "md", name).get("status") or {}


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def children(cluster: Cluster, namespace: str, name: str) -> dict[str, list[str]]:
    kinds = "deployments,services,configmaps,secrets,poddisruptionbudgets"
    items = get(cluster, namespace, kinds, "-l", f"app.kubernetes.io/instance={name}")["items"]
    out: dict[str, list[str]] = {}
    for item in items:
        out.setdefault(item["kind"], []).append(item["metadata"]["name"])
    return {k: sorted(v) for k, v in out.items()}


EXPECTED = {
    "ConfigMap": ["{n}-serve"],
    "Deployment": ["{n}-head", "{n}-workers"],
    "PodDisruptionBudget": ["{n}-workers"],
    "Secret": ["{n}-ray-token"],
    "Service": ["{n}", "{n}-head"],
}


def expected(name: str) -> dict[str, list[str]]:
    return {k: sorted(v.format(n=name) for v in vs) for k, vs in EXPECTED.items()}


def worker_pods(cluster: Cluster, namespace: str, name: str) -> list[dict]:
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/component=worker"
    pods = get(cluster, namespace, "pods", "-l", selector)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def serve_target(cluster: Cluster, namespace: str, name: str) -> int:
    config = json.loads(get(cluster, namespace, "configmap", f"{name}-serve")["data"]["serve-config.json"])
    return config["applications"][0]["deployments"][0]["num_replicas"]


def test_tiny_gets_every_child_and_becomes_ready(cluster: Cluster, namespace: str, operator: Operator):
    apply(cluster, namespace, (ROOT / "examples/tiny.yaml").read_text())
    eventually(lambda: children(cluster, namespace, "tiny") == expected("tiny"), timeout=60)
    md = get(cluster, namespace, "md", "tiny")
    for kind in ("deployment/tiny-head", "deployment/tiny-workers", "service/tiny", "configmap/tiny-serve"):
        owners = get(cluster, namespace, kind)["metadata"]["ownerReferences"]
        assert owners[0]["uid"] == md["metadata"]["uid"] and owners[0]["controller"] is True
    (pod,) = eventually(lambda: worker_pods(cluster, namespace, "tiny"), timeout=60)
    requests = pod["spec"]["containers"][0]["resources"]["requests"]
    assert requests["nvidia.com/gpu"] == "1"
    node = eventually(lambda: get(cluster, namespace, "pod", pod["metadata"]["name"])["spec"].get("nodeName"))
    assert get(cluster, "", "node", node)["metadata"]["labels"]["nvidia.com/gpu.product"] == H100

    status = eventually(
        lambda: (s := md_status(cluster, namespace, "tiny")).get("phase") == "Ready" and s, timeout=90
    )
    assert status["readyReplicas"] == 1 and status["replicas"] == 1 and status["ready"] == "1/1"
    assert status["observedGeneration"] == md["metadata"]["generation"]
    assert status["endpoint"] == f"http://tiny.{namespace}.svc.cluster.local:8000/v1"
    assert status["selector"].startswith("app.kubernetes.io/name=modelfleet")
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "CapacityLimited")["status"] == "False"
    monitor = get(cluster, namespace, "podmonitors", "tiny")
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "tiny"
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    table = cluster.kubectl("get", "md", "tiny", "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "MODEL", "TP", "READY", "QUEUE", "PHASE", "AGE"]
    assert row.split()[:4] == ["tiny", "builtin://tiny-llama", "1", "1/1"] and "Ready" in row
    events = cluster.kubectl("describe", "md", "tiny", "-n", namespace).stdout
    assert "Ready" in events.split("Events:")[-1]


def test_too_big_for_any_node_is_capacity_limited(cluster: Cluster, namespace: str, operator: Operator):
    text = manifest(
        "huge",
        engine={"tensorParallelSize": 16},
        resources={"gpu": {"product": H100}, "cpu": "1", "memory": "1Gi"},
    )
    apply(cluster, namespace, text)

    def limited():
        status = md_status(cluster, namespace, "huge")
        return condition(status, "CapacityLimited").get("status") == "True" and status

    status = eventually(limited, timeout=60)
    message = condition(status, "CapacityLimited")["message"]
    assert message == (
        f"1 replica cannot be placed: it needs 16 x nvidia.com/gpu ({H100}) on one node; "
        "the largest node has 8"
    )
    assert status["phase"] == "Pending"
    describe = cluster.kubectl("describe", "md", "huge", "-n", namespace).stdout
    assert "CapacityLimited" in describe and "the largest node has 8" in describe


def test_scale_changes_workers_and_serve_target(cluster: Cluster, namespace: str, operator: Operator):
    apply(cluster, namespace, manifest("scaled"))
    eventually(lambda: md_status(cluster, namespace, "scaled").get("phase") == "Ready", timeout=90)
    cluster.kubectl("scale", "md", "scaled", "-n", namespace, "--replicas", "3")
    eventually(
        lambda: get(cluster, namespace, "deployment", "scaled-workers")["spec"]["replicas"] == 3, timeout=30
    )
    assert serve_target(cluster, namespace, "scaled") == 3
    eventually(lambda: md_status(cluster, namespace, "scaled").get("readyReplicas") == 3, timeout=90)
    scale = get(cluster, namespace, "md", "scaled", "--subresource", "scale")
    assert (
        scale["status"]["replicas"] == 3
        and "app.kubernetes.io/instance=scaled" in scale["status"]["selector"]
    )
    cluster.kubectl("scale", "md", "scaled", "-n", namespace, "--replicas", "1")
    eventually(lambda: len(worker_pods(cluster, namespace, "scaled")) == 1, timeout=60)
    assert serve_target(cluster, namespace, "scaled") == 1


def test_spec_change_rolls_pods_and_metadata_change_does_not(
    cluster: Cluster, namespace: str, operator: Operator
):
    apply(cluster, namespace, manifest("roll", replicas=2))
    eventually(lambda: md_status(cluster, namespace, "roll").get("phase") == "Ready", timeout=90)
    before = sorted(p["metadata"]["name"] for p in worker_pods(cluster, namespace, "roll"))
    generation = get(cluster, namespace, "deployment", "roll-workers")["metadata"]["generation"]

    cluster.kubectl("label", "md", "roll", "-n", namespace, "team=ml")
    cluster.kubectl("annotate", "md", "roll", "-n", namespace, "note=hello")
    time.sleep(4)  # several status refreshes
    assert sorted(p["metadata"]["name"] for p in worker_pods(cluster, namespace, "roll")) == before
    assert get(cluster, namespace, "deployment", "roll-workers")["metadata"]["generation"] == generation

    cluster.kubectl(
        "patch",
        "md",
        "roll",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"engine": {"maxNumSeqs": 8}}}',
    )

    def rolled():
        pods = worker_pods(cluster, namespace, "roll")
        names = {p["metadata"]["name"] for p in pods}
        return len(pods) == 2 and not names & set(before)

    eventually(rolled, timeout=120)
    eventually(lambda: md_status(cluster, namespace, "roll").get("phase") == "Ready", timeout=60)
    config = json.loads(get(cluster, namespace, "configmap", "roll-serve")["data"]["serve-config.json"])
    assert config["applications"][0]["args"]["manifest"]["spec"]["engine"]["maxNumSeqs"] == 8


def test_delete_leaves_nothing_behind(cluster: Cluster, namespace: str, operator: Operator):
    apply(cluster, namespace, manifest("gone"))
    eventually(lambda: children(cluster, namespace, "gone") == expected("gone"), timeout=60)
    cluster.kubectl("delete", "md", "gone", "-n", namespace, "--wait=true", timeout=60)
    eventually(
        lambda: children(cluster, namespace, "gone") == {} and not worker_pods(cluster, namespace, "gone"),
        timeout=90,
    )


def test_killed_mid_reconcile_converges_without_duplicates(
    cluster: Cluster, namespace: str, operator: Operator
):
    names = [f"crash-{i}" for i in range(4)]
    operator.kill()
    try:
        for name in names:
            apply(cluster, namespace, manifest(name))
        operator.start()
        time.sleep(0.7)  # some children exist, some do not
        operator.kill()
    finally:
        operator.start()
    for name in names:
        eventually(lambda n=name: md_status(cluster, namespace, n).get("phase") == "Ready", timeout=120)
        assert children(cluster, namespace, name) == expected(name)
        assert len(worker_pods(cluster, namespace, name)) == 1
    owned = get(
        cluster,
        namespace,
        "deployments,services,configmaps,secrets,poddisruptionbudgets",
        "-l",
        "app.kubernetes.io/managed-by=modelfleet",
    )["items"]
    assert {o["metadata"]["labels"]["app.kubernetes.io/instance"] for o in owned} == set(names)


def test_malformed_object_is_failed_and_the_operator_keeps_going(
    cluster: Cluster, namespace: str, operator: Operator
):
    """An object stored before the schema refused it (validation relaxed, then restored)."""
    crd = get(cluster, "", "crd", "modeldeployments.modelfleet.dev")
    original = json.dumps(crd)
    loose = json.loads(original)
    schema = loose["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["spec"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    schema.pop("x-kubernetes-validations", None)
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        loose["metadata"].pop(key, None)
    loose.pop("status", None)
    cluster.kubectl("replace", "-f", "-", input=json.dumps(loose))
    try:
        bad = yaml.safe_load(manifest("broken"))
        bad["spec"]["engine"]["tensorParallelSize"] = "two"
        eventually(
            lambda: (
                cluster.kubectl(
                    "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(bad), check=False
                ).returncode
                == 0
            ),
            timeout=30,
        )
    finally:
        restored = json.loads(original)
        for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
            restored["metadata"].pop(key, None)
        restored.pop("status", None)
        cluster.kubectl("replace", "-f", "-", input=json.dumps(restored))

    def failed():
        status = md_status(cluster, namespace, "broken")
        return status.get("phase") == "Failed" and status

    status = eventually(failed, timeout=60)
    ready = condition(status, "Ready")
    assert ready["reason"] == "InvalidSpec" and "spec.engine.tensorParallelSize" in ready["message"]
    assert children(cluster, namespace, "broken") == {}
    apply(cluster, namespace, manifest("healthy"))
    eventually(lambda: md_status(cluster, namespace, "healthy").get("phase") == "Ready", timeout=90)
    assert operator.proc is not None and operator.proc.poll() is None


def scale_writes(cluster: Cluster, namespace: str, name: str) -> list[dict]:
    fields = get(cluster, namespace, "md", name, "--show-managed-fields")["metadata"].get("managedFields", [])
    return [f for f in fields if f.get("subresource") == "scale"]


def test_autoscaler_writes_through_scale_and_respects_capacity(
    cluster: Cluster, namespace: str, operator: Operator, exporter: MetricsExporter
):
    auto = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 2,
        "targetQueueDepth": 4,
        "scaleDownStabilizationSeconds": 0,
    }
    exporter.set(namespace, "auto", {"r1": 100.0}, {"r1": 8})
    apply(cluster, namespace, manifest("auto", autoscaling=auto))
    eventually(lambda: get(cluster, namespace, "md", "auto")["spec"]["replicas"] == 2, timeout=60)
    assert scale_writes(cluster, namespace, "auto"), "the autoscaler's write must go through /scale"
    status = eventually(
        lambda: (s := md_status(cluster, namespace, "auto")).get("desiredReplicas") == 2 and s
    )
    assert status["observedQueueDepth"] == 100.0 and status.get("lastScaleTime")
    assert condition(status, "AutoscalingActive")["status"] == "True"
    eventually(
        lambda: get(cluster, namespace, "deployment", "auto-workers")["spec"]["replicas"] == 2, timeout=30
    )
    assert serve_target(cluster, namespace, "auto") == 2

    # A replica needing 16 GPUs on one node never fits: hold the count and say why.
    big = {**auto, "maxReplicas": 4}
    exporter.set(namespace, "big", {"r1": 100.0})
    apply(
        cluster,
        namespace,
        manifest(
            "big", autoscaling=big, engine={"tensorParallelSize": 16}, resources={"cpu": "1", "memory": "1Gi"}
        ),
    )

    def capped():
        s = md_status(cluster, namespace, "big")
        return condition(s, "CapacityLimited").get("reason") == "AutoscalerCapped" and s

    status = eventually(capped, timeout=60)
    assert "the fleet holds 0" in condition(status, "CapacityLimited")["message"]
    assert get(cluster, namespace, "md", "big")["spec"]["replicas"] == 1

    # The burst ends: one step down, again through /scale.
    exporter.set(namespace, "auto", {"r1": 0.0, "r2": 0.0}, {"r1": 0, "r2": 0})
    eventually(lambda: get(cluster, namespace, "md", "auto")["spec"]["replicas"] == 1, timeout=60)
    describe = cluster.kubectl("describe", "md", "auto", "-n", namespace).stdout
    assert "ScaledUp" in describe and "ScaledDown" in describe


def test_missing_metrics_keep_replicas(cluster: Cluster, namespace: str, operator: Operator):
    auto = {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "scaleDownStabilizationSeconds": 0}
    apply(cluster, namespace, manifest("blind", replicas=2, autoscaling=auto))

    def unavailable():
        s = md_status(cluster, namespace, "blind")
        return condition(s, "AutoscalingActive").get("reason") == "MetricsUnavailable" and s

    status = eventually(unavailable, timeout=60)
    assert "no sample" in condition(status, "AutoscalingActive")["message"]
    time.sleep(3)
    assert get(cluster, namespace, "md", "blind")["spec"]["replicas"] == 2
    assert not scale_writes(cluster, namespace, "blind")


def test_plan_judges_the_fleet_in_the_conditions_words(cluster: Cluster, tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(manifest("huge", engine={"tensorParallelSize": 16}, resources={"gpu": {"product": H100}}))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelfleet.cli",
            "plan",
            "-f",
            str(path),
            "--kubeconfig",
            str(cluster.kubeconfig),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert (
        f"# fleet: CapacityLimited: 1 replica cannot be placed: it needs 16 x nvidia.com/gpu ({H100}) "
        "on one node; the largest node has 8"
    ) in out.stdout
