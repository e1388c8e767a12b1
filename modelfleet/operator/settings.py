"""Operator settings: one dataclass, each field read from a MODELFLEET_* environment variable."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

PREFIX = "MODELFLEET_"


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator needs to know about its cluster. Environment: MODELFLEET_<FIELD>."""

    serving_image: str = "modelfleet:latest"
    """Image of the Ray head and worker pods when a ModelDeployment names none."""
    image_pull_policy: str = "IfNotPresent"
    """Pull policy of the serving pods."""
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    """Prometheus the autoscaler asks when a ModelDeployment names none."""
    prometheus_timeout_seconds: float = 3.0
    """Timeout of each Prometheus query; a slower answer counts as metrics unavailable."""
    autoscale_interval_seconds: float = 2.0
    """How often the autoscaler reads the queue depth of each autoscaled ModelDeployment."""
    watch_namespaces: tuple[str, ...] = ()
    """Namespaces to watch, comma-separated; empty means all namespaces."""
    log_format: str = "text"
    """text or json."""
    reconcile_interval_seconds: float = 10.0
    """How often each ModelDeployment's status is refreshed from its children and the nodes."""
    head_cpu: str = "2"
    """CPU request of each Ray head pod."""
    head_memory: str = "4Gi"
    """Memory request of each Ray head pod."""
    startup_timeout_seconds: int = 3600
    """How long a worker may take to load its model before the kubelet restarts it."""
    drain_timeout_seconds: int = 120
    """How long a stopping worker waits for its in-flight requests."""
    dashboard_url: str = "http://{head}.{namespace}.svc:8265"
    """Where a Ray head's dashboard answers; {head} and {namespace} are filled in."""
    dashboard_timeout_seconds: float = 5.0
    """Timeout of each call to a Ray head's dashboard API."""
    health_port: int = 8080
    """Port of the operator's /healthz."""
    metrics_port: int = 8081
    """Port of the operator's Prometheus /metrics (0 turns it off)."""
    peering: str = "modelfleet"
    """kopf peering object name; replicas of the operator sharing it never act together."""
    cluster_domain: str = "cluster.local"
    """DNS suffix used in status.endpoint."""
    extra: dict[str, str] = field(default_factory=dict)
    """Unrecognised MODELFLEET_* variables, kept for diagnostics."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorSettings:
        env = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        extra: dict[str, str] = {}
        for key, raw in env.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX) :].lower()
            f = known.get(name)
            if f is None:
                extra[name] = raw
                continue
            values[name] = _convert(name, f.type, raw)
        if values.get("log_format", "text") not in ("text", "json"):
            raise ValueError(f"{PREFIX}LOG_FORMAT must be text or json, got {values['log_format']!r}")
        return cls(**values, extra=extra)


def _convert(name: str, kind: Any, raw: str) -> Any:
    kind = str(kind)
    try:
        if "tuple" in kind:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if kind in ("float",):
            return float(raw)
        if kind in ("int",):
            return int(raw)
    except ValueError:
        raise ValueError(f"{PREFIX}{name.upper()} must be a {kind}, got {raw!r}") from None
    return raw
