"""kopf handlers: thin wrappers that run a reconcile and write what changed.

Import this module (or run `modelfleet operator`) to register the handlers with kopf.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import kopf

from modelfleet.api import GROUP, PLURAL, VERSION
from modelfleet.operator.metrics import PHASES, RECONCILE_SECONDS, RECONCILES
from modelfleet.operator.reconcile import Reconciler
from modelfleet.operator.settings import OperatorSettings

SETTINGS = OperatorSettings.from_env()
log = logging.getLogger("modelfleet.operator")
_phases: dict[str, str] = {}
_written: dict[str, dict[str, Any]] = {}  # the status this process last wrote, per object
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


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


def _key(body: Any) -> str:
    return f"{body['metadata'].get('namespace')}/{body['metadata']['name']}"


def _lock(body: Any) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(_key(body), threading.Lock())


def _run(body: Any, memo: kopf.Memo, step: Callable[[dict[str, Any]], tuple[dict, list]]) -> None:
    """Run one status-producing step for an object, one at a time per object.

    Handlers and the timer of one object run concurrently in kopf, and a merge patch replaces
    the whole conditions list, so each step starts from the status this process last wrote
    (fresher than the event's body) and writes it itself, under the object's lock.
    """
    key = _key(body)
    with _lock(body):
        previous = _written.get(key) or dict(body.get("status") or {})
        status, events = step(previous)
        if status != previous:
            meta = body["metadata"]
            memo.reconciler.kube.patch_status("ModelDeployment", meta["namespace"], meta["name"], status)
            _written[key] = status
    for kind, reason, message in events:
        kopf.event(body, type=kind, reason=reason, message=message)
    _phases[key] = status.get("phase", "Pending")
    _count_phases()


def _reconcile(
    trigger: str, body: Any, memo: kopf.Memo, previous: dict[str, Any], apply_children: bool
) -> tuple[dict, list]:
    started = time.perf_counter()
    try:
        status, events = memo.reconciler.reconcile(body, apply_children=apply_children, previous=previous)
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
def reconcile(body: kopf.Body, memo: kopf.Memo, reason: str, **_: Any) -> None:
    """Create or change: apply every child, then report."""
    _run(body, memo, lambda previous: _reconcile(str(reason), body, memo, previous, apply_children=True))


TICK = min(SETTINGS.autoscale_interval_seconds, SETTINGS.reconcile_interval_seconds)


@kopf.timer(GROUP, VERSION, PLURAL, interval=TICK, initial_delay=TICK)
def tick(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Every tick: autoscale; every reconcile interval also observe pods, Serve and capacity and
    recreate children that went missing."""

    def step(previous: dict[str, Any]) -> tuple[dict, list]:
        status, events = previous, []
        if time.monotonic() - memo.get("last_refresh", 0.0) >= SETTINGS.reconcile_interval_seconds:
            status, events = _reconcile("timer", body, memo, previous, apply_children=False)
        status, scaled = memo.reconciler.autoscale(body, status)
        return status, events + scaled

    _run(body, memo, step)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Children go with their owner (garbage collection); only forget the phase and scaler memory."""
    key = _key(body)
    memo.reconciler.autoscaler.forget(key)
    _phases.pop(key, None)
    _written.pop(key, None)
    with _locks_guard:
        _locks.pop(key, None)
    _count_phases()
