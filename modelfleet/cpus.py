"""CPU binding for a machine where the engine runs on the CPU (`modelfleet serve
--cpu-binding auto`).

There the engine's model steps and everything that serves them (Ray Serve's replicas, the
HTTP path, Ray's own processes) take turns on the same cores: each time a serving process
wakes it may preempt the engine mid-step, and on a 2-core machine the engine gets about 80%
of a core under load where offline it has all of one. Binding splits the machine the way CPU
inference servers do (vLLM's CPU backend keeps cores for its frontend the same way): the
engine processes get cores of their own and the serving processes the rest. The engine then
steps faster (on 2 cores at 32 streams, a third faster, and 4-34% more tokens/s served, by how
the requests arrive); the serving path has fewer cores, so a burst of requests takes longer to
admit and the time to first token grows 2-3x (benchmarks/RESULTS.md, "CPU binding"). Off
unless asked for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("modelfleet")

BINDINGS = ("auto", "off")


@dataclass(frozen=True)
class CpuPlan:
    serving: tuple[int, ...]
    """Ray, the Serve replicas and the HTTP path."""
    engine: tuple[int, ...]
    """The engine processes (shared by all the replicas' engines)."""

    def describe(self) -> str:
        return f"engine on CPU {cpu_list(self.engine)}, serving on CPU {cpu_list(self.serving)}"


def plan_cpus(allowed: Iterable[int], tensor_parallel_size: int = 1, replicas: int = 1) -> CpuPlan | None:
    """How to split `allowed` (this process' CPUs), or None when binding does not apply.

    A quarter of the CPUs, at least one, serve; the rest run the engines, which need one each
    (fewer, and engines that could have spread over every core would queue for theirs). A
    tensor-parallel engine's ranks are Ray actors, which start where Ray's other processes
    run, so only one-rank engines (a process of their own) are bound. Pure, so the split can
    be tested for any machine."""
    cpus = sorted(set(allowed))
    n_serving = max(1, len(cpus) // 4)
    if tensor_parallel_size != 1 or len(cpus) - n_serving < max(replicas, 1):
        return None
    return CpuPlan(serving=tuple(cpus[:n_serving]), engine=tuple(cpus[n_serving:]))


def bind(cpus: Iterable[int], what: str) -> bool:
    """Bind this process (and what it starts from now on) to `cpus`; False, with a warning
    naming them, where the machine refuses (a container's cpuset without them)."""
    cpus = set(cpus)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as err:
        here = cpu_list(os.sched_getaffinity(0))
        log.warning("cannot bind the %s to CPU %s: %s; it runs on CPU %s", what, cpu_list(cpus), err, here)
        return False
    return True


def cpu_list(cpus: Iterable[int]) -> str:
    """`0-3,6` for {0, 1, 2, 3, 6}, as Linux writes CPU lists."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
