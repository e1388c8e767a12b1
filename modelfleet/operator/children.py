"""Every object one ModelDeployment owns, built as plain manifests (no cluster needed)."""

from __future__ import annotations

import base64
import json
from typing import Any

from modelfleet.api import ModelDeployment
from modelfleet.operator import naming
from modelfleet.operator.pods import PROXY_LABEL, head_pod_template, worker_pod_template
from modelfleet.operator.serveconfig import serve_config
from modelfleet.operator.settings import OperatorSettings

SERVE_CONFIG_KEY = "serve-config.json"


def head_deployment(md: ModelDeployment, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": naming.metadata(md, naming.head_name(md), naming.COMPONENT_HEAD),
        "spec": {
            "replicas": 1,
            # One head at a time: a second GCS would split the cluster.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": naming.selector(md, naming.COMPONENT_HEAD)},
            "template": head_pod_template(md, settings),
        },
    }


def head_service(md: ModelDeployment) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": naming.metadata(md, naming.head_name(md), naming.COMPONENT_HEAD),
        "spec": {
            "type": "ClusterIP",
            "selector": naming.selector(md, naming.COMPONENT_HEAD),
            "ports": [
                {"name": "gcs", "port": naming.GCS_PORT, "targetPort": naming.GCS_PORT},
                {"name": "dashboard", "port": naming.DASHBOARD_PORT, "targetPort": naming.DASHBOARD_PORT},
                {"name": "client", "port": naming.CLIENT_PORT, "targetPort": naming.CLIENT_PORT},
                {"name": "serve", "port": naming.SERVE_PORT, "targetPort": naming.SERVE_PORT},
            ],
        },
    }


def worker_deployment(md: ModelDeployment, settings: OperatorSettings, *, surge: bool) -> dict[str, Any]:
    """One pod per Serve replica; a roll surges one pod only when the fleet has room for it."""
    rolling = {"maxSurge": 1, "maxUnavailable": 0} if surge else {"maxSurge": 0, "maxUnavailable": 1}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": naming.metadata(md, naming.workers_name(md), naming.COMPONENT_WORKER),
        "spec": {
            "replicas": md.spec.replicas,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling},
            # A model can take an hour to load; do not report the rollout as stuck before that.
            "progressDeadlineSeconds": settings.startup_timeout_seconds + 600,
            "selector": {"matchLabels": naming.selector(md, naming.COMPONENT_WORKER)},
            "template": worker_pod_template(md, settings),
        },
    }


def endpoint_service(md: ModelDeployment) -> dict[str, Any]:
    """The OpenAI endpoint: every pod running a Serve HTTP proxy that is ready."""
    service = md.spec.service
    meta = naming.metadata(md, md.name, naming.COMPONENT_ENDPOINT)
    if service.annotations:
        meta["annotations"] = dict(service.annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": service.type,
            "selector": {
                "app.kubernetes.io/instance": md.name,
                "app.kubernetes.io/name": "modelfleet",
                PROXY_LABEL: "true",
            },
            "ports": [
                {"name": "http", "port": service.port, "targetPort": naming.SERVE_PORT, "protocol": "TCP"}
            ],
        },
    }


def disruption_budget(md: ModelDeployment) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": naming.metadata(md, naming.workers_name(md), naming.COMPONENT_WORKER),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": naming.selector(md, naming.COMPONENT_WORKER)},
        },
    }


def pod_monitor(md: ModelDeployment) -> dict[str, Any]:
    """A Prometheus Operator PodMonitor scraping the Serve /metrics of every proxy pod."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": naming.metadata(md, md.name, naming.COMPONENT_ENDPOINT),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/instance": md.name, PROXY_LABEL: "true"}},
            "podMetricsEndpoints": [{"port": "serve", "path": "/metrics", "interval": "5s"}],
        },
    }


def serve_config_map(md: ModelDeployment) -> dict[str, Any]:
    """The Serve config, kept in the cluster as the record of what the operator deploys."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": naming.metadata(md, naming.serve_config_name(md), naming.COMPONENT_HEAD),
        "data": {SERVE_CONFIG_KEY: json.dumps(serve_config(md), indent=2, sort_keys=True)},
    }


def ray_token_secret(md: ModelDeployment, token: str) -> dict[str, Any]:
    """The shared token of this Ray cluster's head and workers (Ray's token auth)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": naming.metadata(md, naming.ray_token_name(md), naming.COMPONENT_HEAD),
        "type": "Opaque",
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }


def build_children(
    md: ModelDeployment, settings: OperatorSettings, *, surge: bool = False, with_pod_monitor: bool = False
) -> list[dict[str, Any]]:
    """Every child but the token Secret (created once, never rewritten), in apply order."""
    children = [
        serve_config_map(md),
        head_service(md),
        head_deployment(md, settings),
        worker_deployment(md, settings, surge=surge),
        endpoint_service(md),
        disruption_budget(md),
    ]
    if with_pod_monitor:
        children.append(pod_monitor(md))
    return children
