"""The Helm chart with the built helm: lint, least-privilege RBAC, namespaced mode, server dry run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from e2e.cluster import Cluster

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parents[2] / "helm" / "modelfleet"


def helm(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cluster.bin_dir / "helm"), *args], capture_output=True, text=True, check=check, timeout=120
    )


def render(cluster: Cluster, *sets: str) -> list[dict]:
    args = ["template", "modelfleet", str(CHART), "--namespace", "modelfleet-system"]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(cluster, *args).stdout) if d]


def test_lint_is_clean(cluster: Cluster):
    out = helm(cluster, "lint", str(CHART), "--strict", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


def test_values_schema_refuses_bad_values(cluster: Cluster):
    out = helm(cluster, "template", "x", str(CHART), "--set", "logFormat=xml", check=False)
    assert out.returncode != 0 and "logFormat" in out.stderr


def rules_of(docs: list[dict], kind: str) -> list[dict]:
    return [r for d in docs if d["kind"] == kind for r in d["rules"]]


def test_rbac_is_least_privilege(cluster: Cluster):
    docs = render(cluster)
    rules = rules_of(docs, "ClusterRole")
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert "delete" not in rule["verbs"], (
            f"children go by garbage collection, not by the operator: {rule}"
        )
    secrets = next(r for r in rules if "secrets" in r["resources"])
    assert sorted(secrets["verbs"]) == ["create", "get"]
    reads = next(r for r in rules if "nodes" in r["resources"])
    assert sorted(reads["verbs"]) == ["get", "list", "watch"]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"} <= kinds
    assert "Role" not in kinds
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_namespaced_mode_uses_roles(cluster: Cluster):
    docs = render(cluster, "watchNamespaces={team-a,team-b}")
    roles = [d for d in docs if d["kind"] == "Role"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    cluster_rules = rules_of(docs, "ClusterRole")
    granted = {res for r in cluster_rules for res in r["resources"]}
    assert "deployments" not in granted and "modeldeployments" not in granted and "secrets" not in granted
    assert {"nodes", "pods"} <= granted
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MODELFLEET_WATCH_NAMESPACES"] == "team-a,team-b"


def test_optional_monitoring_and_dashboard(cluster: Cluster):
    kinds = {d["kind"] for d in render(cluster)}
    assert not {"ServiceMonitor", "PodMonitor"} & kinds
    docs = render(
        cluster,
        "metrics.serviceMonitor=true",
        "metrics.servingPodMonitor=true",
        "grafana.dashboard=true",
        "replicaCount=2",
    )
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "PodMonitor", "ConfigMap", "ClusterKopfPeering"} <= kinds
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert "args" not in deployment["spec"]["template"]["spec"]["containers"][0]  # peering, not standalone


def test_rendered_chart_is_accepted_by_the_api_server(cluster: Cluster, crd: str, namespace: str):
    cluster.kubectl("apply", "--server-side", "-f", str(CHART / "crds" / "kopf-peering.yaml"))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s"
    )
    for sets in ([], [f"watchNamespaces={{{namespace}}}", "replicaCount=2"]):
        args = ["template", "modelfleet", str(CHART), "--namespace", namespace]
        for s in sets:
            args += ["--set", s]
        rendered = helm(cluster, *args).stdout
        done = cluster.kubectl(
            "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=rendered, check=False
        )
        assert done.returncode == 0, done.stderr
