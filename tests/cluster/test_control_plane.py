"""The local control plane is the real thing: versioned binaries, RBAC, scheduling, GC."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from e2e import build
from e2e.cluster import Cluster, process_alive
from e2e.waiting import eventually

pytestmark = pytest.mark.cluster

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def deployment(name: str, gpus: int | None) -> dict:
    container: dict = {"name": "main", "image": "registry.invalid/none:latest"}
    spec: dict = {"containers": [container]}
    if gpus is not None:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
        spec["tolerations"] = [GPU_TOLERATION]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }


def apply(cluster: Cluster, namespace: str, doc: dict) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))


def pods(cluster: Cluster, namespace: str, app: str) -> list[dict]:
    return cluster.get_json("pods", "-n", namespace, "-l", f"app={app}")["items"]


def test_versions_are_the_built_release(cluster: Cluster) -> None:
    out = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert out["clientVersion"]["gitVersion"] == build.KUBERNETES_VERSION
    assert out["serverVersion"]["gitVersion"] == build.KUBERNETES_VERSION
    for binary in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"):
        out = subprocess.run([str(cluster.bin_dir / binary), "--version"], capture_output=True,
                             text=True, check=True)
        assert out.stdout.split() == ["Kubernetes", build.KUBERNETES_VERSION], (binary, out.stdout)
    etcd = subprocess.run([str(cluster.bin_dir / "etcd"), "--version"], capture_output=True, text=True)
    assert f"etcd Version: {build.ETCD_VERSION.removeprefix('v')}" in etcd.stdout


def test_helm_renders_for_this_kubernetes(cluster: Cluster, tmp_path) -> None:
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n"
        "data: {kube: {{ .Capabilities.KubeVersion.Version | quote }}}\n"
    )
    helm = str(cluster.bin_dir / "helm")
    out = subprocess.run([helm, "template", str(chart)], capture_output=True, text=True, check=True)
    minor = build.KUBERNETES_VERSION.split(".")[1]
    kube = yaml.safe_load(out.stdout)["data"]["kube"]
    assert int(kube.split(".")[1]) >= int(minor), kube  # not helm's 1.20 fallback


def test_rbac_is_enforced(cluster: Cluster, namespace: str) -> None:
    sa = f"system:serviceaccount:{namespace}:default"
    denied = cluster.kubectl("auth", "can-i", "create", "pods", "-n", namespace, "--as", sa,
                             check=False)
    assert denied.stdout.strip() == "no"
    assert cluster.kubectl("auth", "can-i", "create", "pods", "-n", namespace).stdout.strip() == "yes"


def test_fake_fleet_looks_like_gpu_operator_nodes(cluster: Cluster) -> None:
    gpu = cluster.get_json("nodes", "-l", "nvidia.com/gpu.present=true")["items"]
    assert len(gpu) == 2
    for node in gpu:
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert node["metadata"]["labels"]["nvidia.com/gpu.count"] == "8"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node["spec"][
            "taints"
        ]
    cpu = cluster.get_json("nodes", "-l", "!nvidia.com/gpu.present")["items"]
    assert [n["metadata"]["name"] for n in cpu] == ["kwok-cpu-0"]


def test_gpu_deployment_binds_to_a_gpu_node_and_runs(cluster: Cluster, namespace: str) -> None:
    apply(cluster, namespace, deployment("gpu4", gpus=4))

    def running() -> dict | None:
        found = [p for p in pods(cluster, namespace, "gpu4") if p["status"].get("phase") == "Running"]
        return found[0] if found else None

    pod = eventually(running, timeout=60)
    assert pod["spec"]["nodeName"].startswith("kwok-gpu-")


def test_pod_without_gpus_lands_on_the_cpu_node(cluster: Cluster, namespace: str) -> None:
    apply(cluster, namespace, deployment("head", gpus=None))

    def scheduled() -> str | None:
        found = [p["spec"].get("nodeName") for p in pods(cluster, namespace, "head")]
        return found[0] if found and found[0] else None

    assert eventually(scheduled, timeout=60) == "kwok-cpu-0"


def test_oversized_gpu_request_stays_pending_with_the_reason(
    cluster: Cluster, namespace: str
) -> None:
    apply(cluster, namespace, deployment("gpu16", gpus=16))

    def unschedulable() -> str | None:
        for pod in pods(cluster, namespace, "gpu16"):
            for cond in pod["status"].get("conditions", []):
                if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                    return cond["message"]
        return None

    message = eventually(unschedulable, timeout=60)
    assert "Insufficient nvidia.com/gpu" in message
    (pod,) = pods(cluster, namespace, "gpu16")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")
    events = cluster.kubectl("get", "events", "-n", namespace,
                             "--field-selector", "reason=FailedScheduling").stdout
    assert "Insufficient nvidia.com/gpu" in events


def test_deleting_an_owner_collects_its_children(cluster: Cluster, namespace: str) -> None:
    apply(cluster, namespace, deployment("owner", gpus=None))
    eventually(lambda: pods(cluster, namespace, "owner"), timeout=60)
    assert cluster.get_json("replicasets", "-n", namespace)["items"]

    cluster.kubectl("delete", "deployment", "owner", "-n", namespace, "--wait=false")

    def collected() -> bool:
        return not cluster.get_json("replicasets", "-n", namespace)["items"] and not pods(
            cluster, namespace, "owner"
        )

    eventually(collected, timeout=60)


def test_cluster_tool_runs_a_second_cluster_and_leaves_nothing(cluster: Cluster, tmp_path) -> None:
    """`up`/`status`/`down` through the CLI, beside the session's cluster."""
    second = tmp_path / "second"
    cli = [sys.executable, "-m", "e2e.cluster"]
    root = build.__file__.rsplit("/e2e/", 1)[0]
    up = subprocess.run([*cli, "up", "--dir", str(second)], cwd=root, capture_output=True, text=True,
                        timeout=180)
    assert up.returncode == 0, up.stderr
    status = json.loads(subprocess.run([*cli, "status", "--dir", str(second)], cwd=root,
                                       capture_output=True, text=True, check=True).stdout)
    assert status["apiserver_ready"], status
    assert status["version"] == build.KUBERNETES_VERSION
    pids = [c["pid"] for c in status["components"].values()]
    ports = {c["port"] for c in status["components"].values()}
    state = Cluster(cluster.dir).read_state()
    assert not ports & set(state["ports"].values())

    down = subprocess.run([*cli, "down", "--dir", str(second)], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert not [pid for pid in pids if process_alive(pid)]
    assert (second / "logs" / "kube-apiserver.log").exists()
    assert cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
