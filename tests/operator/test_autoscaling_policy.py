"""The autoscaling policy, table-tested as a pure function of signals, memory and time."""

from __future__ import annotations

import pytest

from modelfleet.api import AutoscalingSpec
from modelfleet.operator.autoscaling.policy import Memory, Signals, decide

SPEC = AutoscalingSpec(
    enabled=True,
    min_replicas=1,
    max_replicas=8,
    target_queue_depth=4,
    scale_up_stabilization_seconds=0,
    scale_down_stabilization_seconds=60,
)
SEQS = 16


def run(signals: Signals, spec: AutoscalingSpec = SPEC, mem: Memory | None = None, now: float = 1000.0):
    return decide(spec, SEQS, signals, mem or Memory(), now)


@pytest.mark.parametrize(
    ("queue", "running", "current", "ready", "placeable", "desired", "reason"),
    [
        (0, 0, 1, 1, 99, 1, "Steady"),
        (4, 2, 1, 1, 99, 1, "Steady"),  # at the target, not above
        (5, 2, 1, 1, 99, 2, "ScaleUp"),
        (40, 16, 1, 1, 99, 8, "ScaleUp"),  # a 10x burst goes up in one step, to the maximum
        (20, 16, 1, 1, 99, 5, "ScaleUp"),
        (20, 16, 5, 1, 99, 5, "Steady"),  # four replicas still loading cover it: no overshoot
        (40, 16, 1, 1, 3, 3, "ScaleUp"),  # the fleet holds only three
        (40, 16, 3, 3, 3, 3, "CapacityLimited"),
        (3, 0, 0, 0, 99, 1, "BelowMinimum"),  # someone scaled below minReplicas
        (0, 0, 12, 12, 99, 8, "AboveMaximum"),
    ],
)
def test_decisions(queue, running, current, ready, placeable, desired, reason):
    decision, _ = run(Signals(queue, running, current, ready, placeable))
    assert (decision.desired, decision.reason) == (desired, reason), decision.message


def test_capacity_cut_is_flagged_with_the_fleet_size():
    decision, _ = run(Signals(40, 16, 1, 1, 3))
    assert decision.capacity_limited and "the fleet holds 3" in decision.message
    decision, _ = run(Signals(40, 16, 3, 3, 3))
    assert decision.capacity_limited and decision.desired == 3


def test_scale_up_waits_for_its_stabilization():
    spec = SPEC.model_copy(update={"scale_up_stabilization_seconds": 10})
    d1, mem = run(Signals(40, 16, 1, 1, 99), spec, now=100)
    assert d1.reason == "Steady"
    d2, mem = run(Signals(40, 16, 1, 1, 99), spec, mem, now=105)
    assert d2.reason == "Steady"
    d3, _ = run(Signals(40, 16, 1, 1, 99), spec, mem, now=110)
    assert (d3.reason, d3.desired) == ("ScaleUp", 8)


def test_a_dip_resets_the_up_window():
    spec = SPEC.model_copy(update={"scale_up_stabilization_seconds": 10})
    _, mem = run(Signals(40, 16, 1, 1, 99), spec, now=100)
    _, mem = run(Signals(0, 16, 1, 1, 99), spec, mem, now=105)
    d, _ = run(Signals(40, 16, 1, 1, 99), spec, mem, now=111)
    assert d.reason == "Steady"


def test_scale_down_one_step_after_the_window_and_only_when_running_fits():
    mem = Memory()
    d, mem = run(Signals(0, 10, 4, 4, 99), mem=mem, now=0)
    assert d.reason == "Steady"
    d, mem = run(Signals(0, 10, 4, 4, 99), mem=mem, now=59)
    assert d.reason == "Steady"
    d, mem = run(Signals(0, 10, 4, 4, 99), mem=mem, now=60)
    assert (d.reason, d.desired) == ("ScaleDown", 3)
    # The next step waits a whole window again.
    d, mem = run(Signals(0, 10, 3, 3, 99), mem=mem, now=90)
    assert d.reason == "Steady"
    d, mem = run(Signals(0, 10, 3, 3, 99), mem=mem, now=120)
    assert (d.reason, d.desired) == ("ScaleDown", 2)


def test_scale_down_holds_while_running_load_needs_the_replicas():
    # 3 replicas x 16 seqs; 30 running do not fit in 2 x 16 x 0.8.
    _, mem = run(Signals(0, 30, 3, 3, 99), now=0)
    d, _ = run(Signals(0, 30, 3, 3, 99), mem=mem, now=120)
    assert d.reason == "Steady"


def test_a_queue_spike_restarts_the_down_window():
    spec = SPEC.model_copy(update={"max_replicas": 3})
    _, mem = run(Signals(0, 0, 3, 3, 99), spec, now=0)
    d, mem = run(Signals(30, 0, 3, 3, 99), spec, mem=mem, now=30)
    assert (d.desired, d.reason) == (3, "AtMaximum")
    d, mem = run(Signals(0, 0, 3, 3, 99), spec, mem=mem, now=61)
    assert d.reason == "Steady"
    d, _ = run(Signals(0, 0, 3, 3, 99), spec, mem=mem, now=91)
    assert d.reason == "Steady"
    d, _ = run(Signals(0, 0, 3, 3, 99), spec, mem=mem, now=121)
    assert d.reason == "ScaleDown"


def test_never_below_the_minimum():
    _, mem = run(Signals(0, 0, 1, 1, 99), now=0)
    d, _ = run(Signals(0, 0, 1, 1, 99), mem=mem, now=10_000)
    assert (d.desired, d.reason) == (1, "Steady")


def test_scale_to_zero_after_idle_and_back_on_the_first_request():
    spec = SPEC.model_copy(update={"min_replicas": 0, "scale_to_zero_idle_seconds": 120})
    _, mem = run(Signals(0, 1, 1, 1, 99), spec, now=0)
    d, mem = run(Signals(0, 0, 1, 1, 99), spec, mem, now=100)
    assert d.reason == "Steady"
    d, mem = run(Signals(0, 0, 1, 1, 99), spec, mem, now=121)
    assert (d.desired, d.reason) == (0, "ScaleToZero")
    d, mem = run(Signals(0, 0, 0, 0, 99), spec, mem, now=200)
    assert (d.desired, d.reason) == (0, "Steady")
    d, _ = run(Signals(1, 0, 0, 0, 99), spec, mem, now=201)
    assert (d.desired, d.reason) == (1, "ScaleFromZero")


def test_requests_held_at_the_ingress_count_only_while_no_replica_is_ready():
    spec = SPEC.model_copy(update={"min_replicas": 0})
    # Scaled to zero there is no replica queue at all: the held requests are the signal.
    d, _ = run(Signals(0, 0, 0, 0, 99, held=9), spec)
    assert (d.desired, d.reason) == (3, "ScaleFromZero")
    d, _ = run(Signals(0, 0, 0, 0, 2, held=9), spec)
    assert (d.desired, d.reason, d.capacity_limited) == (2, "ScaleFromZero", True)
    # One replica loading, none ready: the held burst still sizes the step.
    d, _ = run(Signals(0, 0, 1, 0, 99, held=20), spec)
    assert (d.desired, d.reason) == (5, "ScaleUp")
    # Once a replica serves, held requests are in its queue or prefill already: not counted twice.
    d, _ = run(Signals(2, 1, 1, 1, 99, held=30), spec)
    assert (d.desired, d.reason) == (1, "Steady")
    assert Signals(2, 1, 1, 1, 99, held=30).waiting == 2 and Signals(2, 0, 1, 0, 99, held=30).waiting == 30


def test_below_minimum_is_raised_at_once():
    spec = SPEC.model_copy(update={"min_replicas": 3})
    d, _ = run(Signals(0, 0, 1, 1, 99), spec)
    assert (d.desired, d.reason) == (3, "BelowMinimum")
