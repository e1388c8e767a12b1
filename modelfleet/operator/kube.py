"""A thin Kubernetes client over raw JSON: server-side apply, get, list, create, delete.

The official client's typed models are slow to build and lose unknown fields; the operator only
needs plain dicts, so it calls the REST paths directly through the client's ApiClient (which
carries the kubeconfig or in-cluster credentials).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

FIELD_MANAGER = "modelfleet"

# kind -> (API prefix, plural, namespaced)
KINDS: dict[str, tuple[str, str, bool]] = {
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "Service": ("/api/v1", "services", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Secret": ("/api/v1", "secrets", True),
    "Pod": ("/api/v1", "pods", True),
    "Node": ("/api/v1", "nodes", False),
    "Event": ("/api/v1", "events", True),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
    "PodMonitor": ("/apis/monitoring.coreos.com/v1", "podmonitors", True),
    "ModelDeployment": ("/apis/modelfleet.dev/v1alpha1", "modeldeployments", True),
    "CustomResourceDefinition": ("/apis/apiextensions.k8s.io/v1", "customresourcedefinitions", False),
}


class NotFound(Exception):
    """The object does not exist."""


def load_config(pool_size: int = 32) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else KUBECONFIG / ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        # Read KUBECONFIG now: the client library reads it once, at import.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
    configuration = client.Configuration.get_default_copy()
    # Handlers, timers and parallel applies share one client; urllib3's default pool of 10
    # would drop and reopen TLS connections under load.
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


def path(kind: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    prefix, plural, namespaced = KINDS[kind]
    out = prefix + (f"/namespaces/{namespace}" if namespaced and namespace else "") + f"/{plural}"
    if name:
        out += f"/{name}"
    if sub:
        out += f"/{sub}"
    return out


class Kube:
    """JSON in, JSON out, over one ApiClient (thread-safe for the kopf executor)."""

    def __init__(self, api: client.ApiClient | None = None, timeout: float = 30.0):
        self.api = api or load_config()
        self.timeout = timeout

    def call(
        self,
        method: str,
        url: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        method, full_url, headers, payload, _ = self.api.param_serialize(
            method,
            url,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(
            method, full_url, header_params=headers, body=payload, _request_timeout=self.timeout
        )
        data = resp.read()
        if resp.status == 404:
            raise NotFound(url)
        if resp.status >= 400:
            raise ApiException(status=resp.status, reason=resp.reason, body=data)
        return json.loads(data) if data else None

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        return self.call("GET", path(kind, namespace, name))

    def find(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.get(kind, namespace, name)
        except NotFound:
            return None

    def list(
        self,
        kind: str,
        namespace: str | None = None,
        selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        query = []
        if selector:
            query.append(("labelSelector", selector))
        if field_selector:
            query.append(("fieldSelector", field_selector))
        return self.call("GET", path(kind, namespace), query=query).get("items", [])

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: idempotent create-or-update owned by the operator's field manager."""
        meta = obj["metadata"]
        url = path(obj["kind"], meta.get("namespace"), meta["name"])
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        return self.call("PATCH", url, body=obj, query=query, content_type="application/apply-patch+yaml")

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create; None when it already exists."""
        meta = obj["metadata"]
        try:
            return self.call("POST", path(obj["kind"], meta.get("namespace")), body=obj)
        except ApiException as err:
            if err.status == 409:
                return None
            raise

    def patch_status(self, kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return self.call(
            "PATCH",
            path(kind, namespace, name, "status"),
            body={"status": status},
            content_type="application/merge-patch+json",
        )


class FleetCache:
    """Nodes, live pods and the operator's Deployments, listed at most once per `ttl` seconds.

    Every reconcile and every status refresh reads this one snapshot, so observing N
    ModelDeployments costs three list calls per `ttl`, not calls per object.
    """

    def __init__(self, kube: Kube, ttl: float = 2.0):
        self.kube = kube
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = 0.0
        self._nodes: list[dict[str, Any]] = []
        self._pods: list[dict[str, Any]] = []
        self._deployments: dict[tuple[str, str], dict[str, Any]] = {}

    def _refresh(self) -> None:
        if time.monotonic() - self._at > self.ttl:
            self._nodes = self.kube.list("Node")
            self._pods = self.kube.list("Pod", field_selector="status.phase!=Succeeded,status.phase!=Failed")
            deployments = self.kube.list("Deployment", selector="app.kubernetes.io/managed-by=modelfleet")
            self._deployments = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in deployments}
            self._at = time.monotonic()

    def snapshot(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        with self._lock:
            self._refresh()
            return self._nodes, self._pods

    def deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            self._refresh()
            return self._deployments.get((namespace, name))

    def pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Live (not deleting) pods in a namespace carrying all `labels`."""
        with self._lock:
            self._refresh()
            pods = self._pods
        return [
            p
            for p in pods
            if p["metadata"].get("namespace") == namespace
            and not p["metadata"].get("deletionTimestamp")
            and all((p["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())
        ]
