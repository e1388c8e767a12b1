"""The status a ModelDeployment shows: phase, conditions and counts, computed from observations.

Pure: the handlers gather what they saw (worker pods, the head, Serve, the fleet's capacity)
into an `Observation`, and `compute_status` says what status.* should be. Conditions keep
their lastTransitionTime while their status does not change, so an unchanged world produces
an identical status and nothing is written.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from modelfleet.api import ModelDeployment
from modelfleet.operator import naming
from modelfleet.operator.capacity import Verdict


@dataclass(frozen=True)
class Observation:
    """What the operator saw of one ModelDeployment's world."""

    workers: int = 0  # worker pods that exist (not terminating)
    ready: int = 0  # worker pods whose replica serves
    updated: int = 0  # worker pods on the current spec hash
    head_ready: bool = False
    serve: str = "Unknown"  # the Serve application's status, or why it is unknown
    capacity: Verdict | None = None
    unschedulable: str = ""  # the scheduler's message for a pending worker, if any
    crashing: str = ""  # a worker pod that keeps restarting, if any


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
    at: str,
) -> list[dict[str, Any]]:
    """A new condition list with one condition set (lastTransitionTime kept when status is unchanged)."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = (
        old["lastTransitionTime"]
        if old and old.get("status") == value and old.get("lastTransitionTime")
        else at
    )
    new = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }
    return [*(c for c in conditions if c.get("type") != type_), new]


def failed_status(
    md_name: str, generation: int | None, problems: list[str], previous: dict[str, Any]
) -> dict[str, Any]:
    """The status of an object whose spec cannot be used at all."""
    at = now()
    message = "; ".join(problems)[:4000]
    conditions = list(previous.get("conditions") or [])
    conditions = set_condition(conditions, "Ready", False, "InvalidSpec", message, generation, at)
    conditions = set_condition(
        conditions, "Progressing", False, "InvalidSpec", "fix the spec", generation, at
    )
    return {**previous, "phase": "Failed", "observedGeneration": generation, "conditions": conditions}


def compute_status(
    md: ModelDeployment, seen: Observation, previous: dict[str, Any], cluster_domain: str = "cluster.local"
) -> dict[str, Any]:
    generation = md.metadata.generation
    desired = md.spec.replicas
    at = now()
    conditions = list(previous.get("conditions") or [])
    limited = seen.capacity is not None and seen.capacity.limited
    # Serving before on this very spec: losing replicas now is a fault, not a start.
    lost = previous.get("phase") in ("Ready", "Degraded") and previous.get("observedGeneration") == generation

    if desired == 0:
        phase, ready_reason, ready_msg = "Ready", "ScaledToZero", "no replicas requested"
    elif seen.ready >= desired and seen.updated >= desired:
        phase, ready_reason, ready_msg = "Ready", "AllReplicasReady", f"{seen.ready}/{desired} replicas serve"
    elif seen.ready == 0 and lost:
        phase, ready_reason = "Degraded", "ReplicasUnavailable"
        ready_msg = f"0/{desired} replicas serve"
    elif seen.ready == 0:
        if limited or seen.unschedulable or seen.workers == 0:
            phase = "Pending"
            ready_reason = "Unschedulable" if (limited or seen.unschedulable) else "WaitingForWorkers"
        else:
            phase, ready_reason = "Loading", "ModelLoading"
        ready_msg = f"0/{desired} replicas serve"
    else:
        phase = "Degraded" if lost or seen.crashing else "Loading"
        ready_reason = "ReplicasUnavailable" if phase == "Degraded" else "ReplicasLoading"
        ready_msg = f"{seen.ready}/{desired} replicas serve"
    if seen.crashing and phase != "Pending":
        phase = "Degraded"
        ready_reason = "WorkerCrashing"
    conditions = set_condition(conditions, "Ready", phase == "Ready", ready_reason, ready_msg, generation, at)

    rolling = seen.updated < min(desired, seen.workers) or seen.workers != desired
    progressing = phase in ("Pending", "Loading") or rolling
    if progressing:
        p_reason = (
            "ScalingUp"
            if seen.workers < desired
            else "ScalingDown"
            if seen.workers > desired
            else ("RollingUpdate" if rolling else "ModelLoading")
        )
        p_msg = (
            f"{seen.updated}/{desired} replicas on the current spec, {seen.ready} serving; "
            f"Ray head {'ready' if seen.head_ready else 'not ready'}; Serve: {seen.serve}"
        )
    else:
        p_reason, p_msg = "Complete", f"all {desired} replicas on the current spec"
    conditions = set_condition(conditions, "Progressing", progressing, p_reason, p_msg, generation, at)

    degraded = phase == "Degraded"
    if degraded:
        d_msg = seen.crashing or f"{desired - seen.ready} of {desired} replicas stopped serving"
        conditions = set_condition(conditions, "Degraded", True, ready_reason, d_msg, generation, at)
    else:
        conditions = set_condition(conditions, "Degraded", False, "AsExpected", "", generation, at)

    if seen.capacity is not None:
        reason = seen.capacity.reason
        message = seen.capacity.message if limited else ""
        if not limited and seen.unschedulable:
            reason, message = "Unschedulable", seen.unschedulable
            limited = True
        conditions = set_condition(conditions, "CapacityLimited", limited, reason, message, generation, at)

    status = dict(previous)
    status.update(
        {
            "phase": phase,
            "conditions": conditions,
            "observedGeneration": generation,
            "replicas": seen.workers,
            "readyReplicas": seen.ready,
            "ready": f"{seen.ready}/{desired}",
            "selector": naming.selector_string(md),
            "endpoint": naming.endpoint_url(md, cluster_domain),
        }
    )
    if not md.spec.autoscaling.enabled:
        status["desiredReplicas"] = desired
    return status


def transitions(previous: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Events for what changed: (type, reason, message)."""
    out: list[tuple[str, str, str]] = []
    if previous.get("phase") != current.get("phase"):
        ready = next((c for c in current["conditions"] if c["type"] == "Ready"), {})
        kind = "Warning" if current.get("phase") in ("Degraded", "Failed") else "Normal"
        out.append(
            (
                kind,
                current["phase"],
                f"{previous.get('phase') or 'New'} -> {current['phase']}: {ready.get('message', '')}",
            )
        )
    old = {c["type"]: c for c in previous.get("conditions") or []}
    for cond in current.get("conditions") or []:
        before = old.get(cond["type"])
        if (
            cond["type"] == "CapacityLimited"
            and cond["status"] == "True"
            and (before is None or before.get("status") != "True" or before.get("message") != cond["message"])
        ):
            out.append(("Warning", "CapacityLimited", cond["message"]))
    return out
