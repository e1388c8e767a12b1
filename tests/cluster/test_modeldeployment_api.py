"""The ModelDeployment CRD on a real API server: schema, CEL rules, columns, /scale, GC."""

from __future__ import annotations

import copy
import json
import secrets
from pathlib import Path

import pytest
from manifest_cases import INVALID_CASES, VALID_CASES, InvalidCase, ValidCase

from e2e.cluster import Cluster
from e2e.waiting import eventually

pytestmark = pytest.mark.cluster

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
SERVER_CASES = [c for c in INVALID_CASES if c.server]


def dry_run(cluster: Cluster, namespace: str, manifest: dict):
    """`kubectl apply --dry-run=server` into `namespace`, whatever namespace the file names."""
    doc = copy.deepcopy(manifest)
    doc.get("metadata", {}).pop("namespace", None)
    return cluster.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False
    )


def test_crd_is_established(cluster: Cluster, crd: str) -> None:
    conditions = {
        c["type"]: c["status"] for c in cluster.get_json("crd", crd)["status"]["conditions"]
    }
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    resources = cluster.kubectl("api-resources", "--api-group=modelfleet.dev").stdout
    assert "md" in resources.split() and "ModelDeployment" in resources


@pytest.fixture(scope="module")
def dry_run_namespace(cluster: Cluster, crd: str) -> str:
    """One namespace for the many server-side dry runs, which create nothing."""
    name = "dry-run-" + secrets.token_hex(3)
    cluster.kubectl("create", "namespace", name)
    return name


@pytest.mark.parametrize("case", VALID_CASES, ids=lambda c: c.name)
def test_valid_manifest_is_accepted(cluster: Cluster, dry_run_namespace: str, case: ValidCase):
    done = dry_run(cluster, dry_run_namespace, case.manifest)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("case", SERVER_CASES, ids=lambda c: c.name)
def test_invalid_manifest_is_refused_by_the_server_naming_the_field(
    cluster: Cluster, dry_run_namespace: str, case: InvalidCase
) -> None:
    done = dry_run(cluster, dry_run_namespace, case.manifest)
    assert done.returncode != 0, f"the API server accepted {case.name}: {done.stdout}"
    # Invalid (422) reads "... is invalid: <field>: ..."; strict decoding (400) "Error from server".
    assert "is invalid" in done.stderr or "Error from server" in done.stderr, done.stderr
    assert case.field in done.stderr, done.stderr


@pytest.fixture
def tiny(cluster: Cluster, crd: str, namespace: str) -> str:
    cluster.kubectl("apply", "-n", namespace, "-f", str(TINY))
    return "tiny"


def test_get_prints_the_columns(cluster: Cluster, namespace: str, tiny: str) -> None:
    header, row = cluster.kubectl("get", "md", "-n", namespace).stdout.splitlines()
    assert header.split() == ["NAME", "MODEL", "TP", "READY", "QUEUE", "PHASE", "AGE"]
    assert row.split()[:3] == [tiny, "builtin://tiny-llama", "1"]


def test_scale_goes_through_the_scale_subresource(
    cluster: Cluster, namespace: str, tiny: str
) -> None:
    cluster.kubectl("scale", "md", tiny, "--replicas", "3", "-n", namespace)
    assert cluster.get_json("md", tiny, "-n", namespace)["spec"]["replicas"] == 3
    path = f"/apis/modelfleet.dev/v1alpha1/namespaces/{namespace}/modeldeployments/{tiny}/scale"
    scale = json.loads(cluster.kubectl("get", "--raw", path).stdout)
    assert scale["kind"] == "Scale"
    assert scale["spec"]["replicas"] == 3


def test_deleting_a_model_deployment_collects_what_it_owns(
    cluster: Cluster, namespace: str, tiny: str
) -> None:
    uid = cluster.get_json("md", tiny, "-n", namespace)["metadata"]["uid"]
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{tiny}-serve-config",
            "ownerReferences": [{
                "apiVersion": "modelfleet.dev/v1alpha1", "kind": "ModelDeployment",
                "name": tiny, "uid": uid, "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "data": {"config": "{}"},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(child))
    cluster.kubectl("delete", "md", tiny, "-n", namespace, "--wait=false")

    def collected() -> bool:
        found = cluster.kubectl("get", "configmap", f"{tiny}-serve-config", "-n", namespace,
                                check=False)
        return found.returncode != 0 and "NotFound" in found.stderr

    eventually(collected, timeout=60)
