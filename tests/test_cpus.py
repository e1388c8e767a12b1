"""The CPU split `modelfleet serve` applies when the engine runs on the CPU."""

from __future__ import annotations

import logging
import os

import pytest

from modelfleet.cpus import bind, cpu_list, plan_cpus
from modelfleet.serving.settings import ServeSettings


@pytest.mark.parametrize(
    "allowed, serving, engine",
    [
        ({0, 1}, (0,), (1,)),
        ({2, 3}, (2,), (3,)),  # a container's cpuset need not start at 0
        (range(4), (0,), (1, 2, 3)),
        (range(8), (0, 1), (2, 3, 4, 5, 6, 7)),
        ([5, 1, 3], (1,), (3, 5)),
    ],
)
def test_a_quarter_of_the_cpus_serve_and_the_rest_run_engines(allowed, serving, engine):
    plan = plan_cpus(allowed)
    assert plan is not None
    assert (plan.serving, plan.engine) == (serving, engine)
    assert not set(plan.serving) & set(plan.engine)


def test_one_cpu_a_tensor_parallel_engine_or_too_few_cores_for_the_engines_is_not_split():
    assert plan_cpus({0}) is None
    assert plan_cpus({0, 1, 2, 3}, tensor_parallel_size=2) is None
    assert plan_cpus({0, 1}, replicas=2) is None  # two engines would share one core
    assert plan_cpus(range(4), replicas=3).engine == (1, 2, 3)
    assert plan_cpus(range(4), replicas=4) is None


def test_cpu_lists_read_as_linux_writes_them():
    assert cpu_list({0, 1, 2, 3, 6}) == "0-3,6"
    assert cpu_list([9, 5, 6, 7]) == "5-7,9"
    assert cpu_list({4}) == "4"
    assert plan_cpus(range(8)).describe() == "engine on CPU 2-7, serving on CPU 0-1"


def test_binding_to_cpus_the_machine_lacks_warns_and_changes_nothing(caplog):
    before = os.sched_getaffinity(0)
    with caplog.at_level(logging.WARNING, logger="modelfleet"):
        assert bind({100_000}, "engine process") is False
    assert os.sched_getaffinity(0) == before
    assert "cannot bind the engine process to CPU 100000" in caplog.text


def test_binding_takes_effect_and_can_be_undone():
    before = os.sched_getaffinity(0)
    one = min(before)
    try:
        assert bind({one}, "test") is True
        assert os.sched_getaffinity(0) == {one}
    finally:
        os.sched_setaffinity(0, before)


def test_settings_take_engine_cpus_from_a_config_list_and_refuse_bad_ones():
    settings = ServeSettings.from_dict({"name": "m", "engine_cpus": [1, 2]})
    assert settings.engine_cpus == (1, 2)
    assert ServeSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match="engine_cpus must be CPU numbers"):
        ServeSettings(name="m", engine_cpus=(-1,))
