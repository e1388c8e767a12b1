"""Deploying the Serve config into a Ray cluster through its dashboard's REST API.

The operator, not the head pod, deploys: it already holds the config, sees the result at once
(a bad config is an error here, not a log line in a pod), and re-deploys after a head restart
because each status refresh compares what Serve runs with what the spec asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from modelfleet.operator.serveconfig import MODEL_DEPLOYMENT, SCALE_PATH


class DeployError(RuntimeError):
    """The dashboard refused a change; the message carries its answer."""


@dataclass(frozen=True)
class ServeState:
    reachable: bool
    status: str  # RUNNING, DEPLOYING, DEPLOY_FAILED, NOT_DEPLOYED, or why it is unknown
    target: int | None = None  # the replica count Serve is driving towards
    running: int = 0  # Model replicas Serve reports RUNNING
    message: str = ""
    config: dict[str, Any] | None = None


class Dashboard:
    """One Ray head's dashboard, over a client shared by all heads (building an HTTP client
    builds a TLS context, which costs more than the call itself)."""

    def __init__(self, client: httpx.Client, base_url: str, token: str | None):
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def state(self, app: str) -> ServeState:
        try:
            resp = self.client.get(f"{self.base_url}/api/serve/applications/", headers=self.headers)
            resp.raise_for_status()
            body = resp.json()
        except (httpx.HTTPError, ValueError) as err:
            return ServeState(False, f"Ray dashboard unreachable ({type(err).__name__}: {err})")
        details = (body.get("applications") or {}).get(app)
        if not details:
            return ServeState(True, "NOT_DEPLOYED")
        deployment = (details.get("deployments") or {}).get(MODEL_DEPLOYMENT) or {}
        replicas = deployment.get("replicas") or []
        running = sum(1 for r in replicas if r.get("state") == "RUNNING")
        target = deployment.get("target_num_replicas")
        if target is None:
            target = (deployment.get("deployment_config") or {}).get("num_replicas")
        return ServeState(
            True,
            details.get("status", "UNKNOWN"),
            target,
            running,
            details.get("message", ""),
            details.get("deployed_app_config"),
        )

    def deploy(self, config: dict[str, Any]) -> None:
        resp = self.client.put(f"{self.base_url}/api/serve/applications/", json=config, headers=self.headers)
        resp.raise_for_status()

    def scale(self, app: str, replicas: int) -> None:
        """Set the Model deployment's replica target in place (0 included), restarting nothing."""
        resp = self.client.post(
            f"{self.base_url}{SCALE_PATH.format(app=app)}",
            json={"target_num_replicas": replicas},
            headers=self.headers,
        )
        if resp.status_code != 200:
            raise DeployError(f"scaling {app} to {replicas} answered {resp.status_code}: {resp.text[:300]}")
