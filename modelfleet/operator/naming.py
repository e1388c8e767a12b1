"""Names and labels of the objects a ModelDeployment owns; one place so builders and status agree."""

from __future__ import annotations

from modelfleet.api import API_VERSION, KIND, ModelDeployment

MANAGED_BY = "modelfleet"
PART_OF = "modelfleet"
SPEC_HASH = "modelfleet.dev/spec-hash"
COMPONENT_HEAD = "ray-head"
COMPONENT_WORKER = "worker"
COMPONENT_ENDPOINT = "endpoint"

GCS_PORT = 6379
DASHBOARD_PORT = 8265
CLIENT_PORT = 10001
SERVE_PORT = 8000
METRICS_PORT = 8080


def head_name(md: ModelDeployment) -> str:
    return f"{md.name}-head"


def workers_name(md: ModelDeployment) -> str:
    return f"{md.name}-workers"


def serve_config_name(md: ModelDeployment) -> str:
    return f"{md.name}-serve"


def ray_token_name(md: ModelDeployment) -> str:
    return f"{md.name}-ray-token"


def labels(md: ModelDeployment, component: str) -> dict[str, str]:
    """The recommended app.kubernetes.io labels every child carries."""
    return {
        "app.kubernetes.io/name": "modelfleet",
        "app.kubernetes.io/instance": md.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": PART_OF,
    }


def selector(md: ModelDeployment, component: str) -> dict[str, str]:
    """The subset of labels that selects one component's pods (never changes for a name)."""
    return {
        "app.kubernetes.io/name": "modelfleet",
        "app.kubernetes.io/instance": md.name,
        "app.kubernetes.io/component": component,
    }


def selector_string(md: ModelDeployment, component: str = COMPONENT_WORKER) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(md, component).items())


def owner_reference(md: ModelDeployment) -> dict[str, object]:
    if not md.metadata.uid:
        raise ValueError(f"ModelDeployment {md.namespace}/{md.name} has no uid; read it from the server")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": md.name,
        "uid": md.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(md: ModelDeployment, name: str, component: str) -> dict[str, object]:
    """Metadata of a child: name, namespace, labels, owner reference."""
    return {
        "name": name,
        "namespace": md.namespace,
        "labels": labels(md, component),
        "ownerReferences": [owner_reference(md)],
    }


def endpoint_url(md: ModelDeployment, cluster_domain: str = "cluster.local") -> str:
    return f"http://{md.name}.{md.namespace}.svc.{cluster_domain}:{md.spec.service.port}/v1"
