"""The autoscaling policy as a pure function: signals and memory in, desired replicas out.

Up: when waiting requests per ready replica exceed the target (for scaleUpStabilizationSeconds),
jump straight to ceil(queue / target) replicas, counting replicas still loading so a start in
progress is not ordered twice. Down: one replica at a time, only after the queue stayed at or
below target for scaleDownStabilizationSeconds and the running requests fit in one replica
fewer; the next step waits another window. To zero: minReplicas 0 and no request for
scaleToZeroIdleSeconds. From zero: any request the ingress holds (with no replica ready, its
held requests count as the queue). Always within min..max and never above
what the fleet can place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from modelfleet.api import AutoscalingSpec

# A replica counts as able to take one fewer's running load up to this share of maxNumSeqs.
FIT_UTILISATION = 0.8


@dataclass(frozen=True)
class Signals:
    """What Prometheus and the cluster say now."""

    queue: float  # waiting requests across all replicas
    running: float  # requests producing tokens across all replicas
    current: int  # spec.replicas now (ready plus loading)
    ready: int  # replicas serving
    placeable: int  # the most replicas the fleet can hold now
    held: float = 0.0  # requests at the ingress with no first byte yet

    @property
    def waiting(self) -> float:
        """Waiting requests: in the replicas' queues, or all held at the ingress while none is ready."""
        return max(self.queue, self.held) if self.ready == 0 else self.queue


@dataclass(frozen=True)
class Memory:
    """What the policy remembers between ticks (kept by the loop, per ModelDeployment)."""

    high_since: float | None = None  # queue per replica above target since
    low_since: float | None = None  # queue at or below target since
    last_busy: float | None = None  # last tick that saw any waiting or running request


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str  # ScaleUp, ScaleDown, ScaleToZero, ScaleFromZero, Steady, CapacityLimited, Below/AboveMinimum
    message: str
    capacity_limited: bool = False


def _clip(spec: AutoscalingSpec, want: int, placeable: int) -> tuple[int, bool]:
    """Within min..max; above what the fleet can place only never. True when capacity cut it."""
    bounded = max(spec.min_replicas, min(spec.max_replicas, want))
    if bounded > placeable:
        return max(min(bounded, placeable), 0), True
    return bounded, False


def decide(
    spec: AutoscalingSpec, max_num_seqs: int, s: Signals, mem: Memory, now: float
) -> tuple[Decision, Memory]:
    target = spec.target_queue_depth
    s = replace(s, queue=s.waiting)
    busy = s.queue > 0 or s.running > 0
    mem = replace(mem, last_busy=now if busy or mem.last_busy is None else mem.last_busy)
    per_replica = s.queue / max(s.ready, 1)
    high = s.queue > 0 and per_replica > target
    mem = replace(
        mem,
        high_since=(now if mem.high_since is None else mem.high_since) if high else None,
        low_since=None if high else (now if mem.low_since is None else mem.low_since),
    )

    # Outside the bounds (a user edited them): come back inside at once.
    if s.current < spec.min_replicas or s.current > spec.max_replicas:
        want, cut = _clip(spec, s.current, s.placeable)
        reason = "BelowMinimum" if s.current < spec.min_replicas else "AboveMaximum"
        return Decision(
            want, reason, f"{s.current} replicas is outside {spec.min_replicas}..{spec.max_replicas}", cut
        ), mem

    if s.current == 0:
        if s.queue > 0:
            want, cut = _clip(spec, max(1, math.ceil(s.queue / target)), s.placeable)
            return Decision(want, "ScaleFromZero", f"{s.queue:g} requests waiting with no replica", cut), mem
        return Decision(0, "Steady", "scaled to zero, no requests"), mem

    if high and mem.high_since is not None and now - mem.high_since >= spec.scale_up_stabilization_seconds:
        need = math.ceil(s.queue / target)
        if need > s.current:
            want, cut = _clip(spec, need, s.placeable)
            message = (
                f"{s.queue:g} waiting on {s.ready} ready replica(s) ({per_replica:.1f} each, target "
                f"{target:g}): {need} replicas wanted"
            )
            if want > s.current:
                note = f"; the fleet holds {s.placeable}" if cut else ""
                return Decision(want, "ScaleUp", message + note, cut), mem
            if cut:
                held = f"; the fleet holds {s.placeable}"
                return Decision(s.current, "CapacityLimited", message + held, True), mem
            return Decision(s.current, "AtMaximum", message + f"; maxReplicas is {spec.max_replicas}"), mem
        return Decision(
            s.current, "Steady", f"{s.current} replicas (some loading) cover {s.queue:g} waiting"
        ), mem

    idle_for = now - (now if mem.last_busy is None else mem.last_busy)
    if spec.min_replicas == 0 and not busy and idle_for >= spec.scale_to_zero_idle_seconds:
        return Decision(0, "ScaleToZero", f"no requests for {idle_for:.0f}s"), replace(mem, low_since=now)

    low_for = now - mem.low_since if mem.low_since is not None else 0.0
    fewer = s.current - 1
    fits = fewer >= max(spec.min_replicas, 1) and s.running <= fewer * max_num_seqs * FIT_UTILISATION
    if not high and low_for >= spec.scale_down_stabilization_seconds and fits:
        message = (
            f"queue at or below {target:g} per replica for {low_for:.0f}s and {s.running:g} running "
            f"requests fit in {fewer}"
        )
        return Decision(fewer, "ScaleDown", message), replace(mem, low_since=now)

    return Decision(
        s.current, "Steady", f"{s.queue:g} waiting, {s.running:g} running on {s.ready} ready"
    ), mem
