"""kopf handlers: thin wrappers that run a reconcile and write what changed.

Import this module (or run `modelfleet operator`) to register the handlers with kopf.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf

from modelfleet.api import GROUP, PLURAL, VERSION
from modelfleet.operator.metrics import PHASES, RECONCILE_SECONDS, RECONCILES
from modelfleet.operator.reconcile import Reconciler
from modelfleet.operator.settings import OperatorSettings

SETTINGS = OperatorSettings.from_env()
log = logging.getLogger("modelfleet.operator")
_phases: dict[str, str] = {}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Handler progress and the last-handled spec live in annotations: the CRD's structural schema
    # would prune kopf's default status.kopf field.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="modelfleet.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="modelfleet.dev", key="last-handled-configuration"
    )
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING  # our own events say what happened; kopf's are noise
    settings.peering.name = SETTINGS.peering
    settings.peering.mandatory = False
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    memo.reconciler = Reconciler(SETTINGS)


def _finish(body: Any, patch: kopf.Patch, status: dict[str, Any], events: list[tuple[str, str, str]]) -> None:
    previous = dict(body.get("status") or {})
    if status != previous:
        patch.status.update(status)
    for kind, reason, message in events:
        kopf.event(body, type=kind, reason=reason, message=message)
    key = f"{body['metadata'].get('namespace')}/{body['metadata']['name']}"
    _phases[key] = status.get("phase", "Pending")
    _count_phases()


def _reconcile(trigger: str, body: Any, memo: kopf.Memo, apply_children: bool) -> tuple[dict, list]:
    started = time.perf_counter()
    try:
        status, events = memo.reconciler.reconcile(body, apply_children=apply_children)
    except Exception:
        RECONCILES.labels(trigger, "error").inc()
        raise
    finally:
        RECONCILE_SECONDS.labels(trigger).observe(time.perf_counter() - started)
    RECONCILES.labels(trigger, "ok").inc()
    memo.last_refresh = time.monotonic()
    return status, events


def _count_phases() -> None:
    for phase in ("Pending", "Loading", "Ready", "Degraded", "Failed"):
        PHASES.labels(phase).set(sum(1 for p in _phases.values() if p == phase))


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, reason: str, **_: Any) -> None:
    """Create or change: apply every child, then report."""
    status, events = _reconcile(str(reason), body, memo, apply_children=True)
    _finish(body, patch, status, events)


TICK = min(SETTINGS.autoscale_interval_seconds, SETTINGS.reconcile_interval_seconds)


@kopf.timer(GROUP, VERSION, PLURAL, interval=TICK, initial_delay=TICK)
def tick(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Every tick: autoscale; every reconcile interval also observe pods, Serve and capacity and
    recreate children that went missing. One timer, so one writer of status at a time."""
    status, events = dict(body.get("status") or {}), []
    if time.monotonic() - memo.get("last_refresh", 0.0) >= SETTINGS.reconcile_interval_seconds:
        status, events = _reconcile("timer", body, memo, apply_children=False)
    status, scaled = memo.reconciler.autoscale(body, status)
    _finish(body, patch, status, events + scaled)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Children go with their owner (garbage collection); only forget the phase and scaler memory."""
    memo.reconciler.autoscaler.forget(f"{body['metadata'].get('namespace')}/{body['metadata']['name']}")
    _phases.pop(f"{body['metadata'].get('namespace')}/{body['metadata']['name']}", None)
    _count_phases()
