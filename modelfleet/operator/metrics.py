"""The operator's own Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter(
    "modelfleet_operator_reconciles_total",
    "Reconciles of ModelDeployments by trigger and result",
    ["trigger", "result"],
)
RECONCILE_SECONDS = Histogram(
    "modelfleet_operator_reconcile_duration_seconds",
    "Time one reconcile took",
    ["trigger"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PHASES = Gauge(
    "modelfleet_operator_modeldeployments", "ModelDeployments this operator manages, by phase", ["phase"]
)
SCALE_DECISIONS = Counter(
    "modelfleet_operator_autoscale_decisions_total",
    "Autoscaler decisions that changed replicas, by reason",
    ["reason"],
)
DESIRED = Gauge(
    "modelfleet_operator_desired_replicas", "Replicas the autoscaler wants", ["namespace", "model_deployment"]
)
QUEUE = Gauge(
    "modelfleet_operator_observed_queue_depth",
    "Queue depth the autoscaler last read",
    ["namespace", "model_deployment"],
)
