"""The autoscaler's tick: read Prometheus, run the policy, say what to write.

`Autoscaler.tick` is used by the operator (which writes spec.replicas through /scale) and by
`LocalAutoscaler`, which drives a Serve application's replica count directly (for
`modelfleet serve`-style local runs, the tests and the benchmark).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from modelfleet.api import AutoscalingSpec
from modelfleet.operator.autoscaling.policy import Decision, Memory, Signals, decide
from modelfleet.operator.autoscaling.prometheus import Load, MetricsUnavailable, read_load


@dataclass(frozen=True)
class Tick:
    """One round's outcome."""

    decision: Decision | None  # None when metrics were unavailable
    load: Load | None
    error: str = ""
    waiting: float = 0.0  # the queue the policy acted on (held requests count while none is ready)


class Autoscaler:
    """Per-deployment memory plus one HTTP client to Prometheus."""

    def __init__(self, timeout: float = 3.0):
        self.client = httpx.Client(timeout=timeout)
        self.memory: dict[str, Memory] = {}
        self._lock = threading.Lock()

    def tick(
        self,
        key: str,
        spec: AutoscalingSpec,
        max_num_seqs: int,
        prometheus_url: str,
        namespace: str,
        name: str,
        current: int,
        ready: int,
        placeable: int,
        now: float | None = None,
    ) -> Tick:
        now = time.monotonic() if now is None else now
        try:
            load = read_load(self.client, prometheus_url, namespace, name, spec.queue_depth_query)
        except MetricsUnavailable as err:
            return Tick(None, None, str(err))
        signals = Signals(load.queue, load.running, current, ready, placeable, load.held)
        with self._lock:
            mem = self.memory.get(key, Memory())
            decision, mem = decide(spec, max_num_seqs, signals, mem, now)
            self.memory[key] = mem
        return Tick(decision, load, waiting=signals.waiting)

    def forget(self, key: str) -> None:
        with self._lock:
            self.memory.pop(key, None)


@dataclass
class TimelinePoint:
    t: float
    queue: float | None
    running: float | None
    replicas: int
    decision: str


@dataclass
class LocalAutoscaler:
    """Runs the policy every `interval` seconds against a replica count it sets itself."""

    spec: AutoscalingSpec
    max_num_seqs: int
    prometheus_url: str
    namespace: str
    name: str
    get_ready: Callable[[], int]
    set_replicas: Callable[[int], None]
    replicas: int
    interval: float = 1.0
    placeable: int = 1 << 30
    timeline: list[TimelinePoint] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scaler = Autoscaler()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.monotonic()

    def step(self) -> Tick:
        tick = self.scaler.tick(
            self.name,
            self.spec,
            self.max_num_seqs,
            self.prometheus_url,
            self.namespace,
            self.name,
            self.replicas,
            self.get_ready(),
            self.placeable,
        )
        changed = tick.decision is not None and tick.decision.desired != self.replicas
        if tick.decision is None:
            self.errors.append(tick.error)
        elif changed:
            self.replicas = tick.decision.desired
        # The decision is on the timeline before it is carried out, so a reader that sees the
        # new count also finds the decision behind it.
        self.timeline.append(
            TimelinePoint(
                time.monotonic() - self.started,
                tick.waiting if tick.load else None,
                tick.load.running if tick.load else None,
                self.replicas,
                tick.decision.reason if tick.decision else "MetricsUnavailable",
            )
        )
        if changed:
            self.set_replicas(self.replicas)
        return tick

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.step()
            except Exception as err:  # keep going: one bad tick must not end autoscaling
                self.errors.append(f"{type(err).__name__}: {err}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="modelfleet-autoscaler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
