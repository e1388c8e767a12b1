"""Starting and stopping the ranks 1..tp-1 of an engine: spawned processes or Ray actors."""

from __future__ import annotations

from typing import Any

from modelfleet.engine.model_runner import RunnerSpec, worker_main
from modelfleet.ports import free_port


class MPWorkers:
    """Ranks as torch.multiprocessing processes on this machine."""

    def __init__(self, spec: RunnerSpec) -> None:
        import torch.multiprocessing as mp

        spec.init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(target=worker_main, args=(spec, rank), daemon=True, name=f"modelfleet-tp{rank}")
            for rank in range(1, spec.engine.tensor_parallel_size)
        ]
        for p in self.procs:
            p.start()

    def join(self, timeout: float = 30.0) -> None:
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(5)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)


class _RayRank:
    def run(self, spec: RunnerSpec, rank: int) -> None:
        worker_main(spec, rank)


class RayWorkers:
    """Ranks as Ray actors, in the caller's placement group when there is one (bundle = rank)."""

    def __init__(self, spec: RunnerSpec) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        host = ray.util.get_node_ip_address()
        spec.init_method = f"tcp://{host}:{free_port(host)}"
        spec.local_device_index = 0  # each actor sees only its own GPU
        pg = ray.util.get_current_placement_group()
        gpus = 1 if spec.device == "cuda" else 0
        self.actors: list[Any] = []
        self.refs: list[Any] = []
        for rank in range(1, spec.engine.tensor_parallel_size):
            options: dict[str, Any] = {"num_gpus": gpus, "num_cpus": 0 if gpus else 1}
            if pg is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank
                )
            actor = ray.remote(_RayRank).options(**options).remote()
            self.actors.append(actor)
            self.refs.append(actor.run.remote(spec, rank))

    def join(self, timeout: float = 30.0) -> None:
        import ray

        try:
            ray.get(self.refs, timeout=timeout)
        finally:
            for a in self.actors:
                ray.kill(a)

    def alive(self) -> bool:
        return True


def start_workers(spec: RunnerSpec):
    if spec.engine.tensor_parallel_size == 1:
        return None
    return (MPWorkers if spec.engine.worker_backend == "mp" else RayWorkers)(spec)
