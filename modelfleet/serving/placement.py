"""Where a model replica's processes go: one pure function from the parallel layout to
the Ray placement-group bundles, so the shape is decided once and tested without Ray.

A replica is one Serve actor (the engine driver, TP rank 0) plus `tp - 1` worker
actors. Every rank gets its own bundle; STRICT_PACK keeps the bundles of one replica
on one node, which tensor parallelism needs (the all-reduce runs over the node's
interconnect, never the network).
"""

from __future__ import annotations

from typing import Any

STRATEGY = "STRICT_PACK"


def replica_bundles(tensor_parallel_size: int, use_gpu: bool) -> list[dict[str, float]]:
    """The placement-group bundles for one replica: bundle 0 holds the replica actor.

    On GPUs each TP rank gets one GPU and one CPU; in CPU mode each rank gets one CPU.
    """
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    bundle: dict[str, float] = {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}
    return [dict(bundle) for _ in range(tensor_parallel_size)]


def replica_actor_options(use_gpu: bool) -> dict[str, Any]:
    """Resources of the replica actor itself; a subset of bundle 0 by construction."""
    return {"num_cpus": 1.0, "num_gpus": 1.0 if use_gpu else 0.0}


def placement_options(tensor_parallel_size: int, use_gpu: bool) -> dict[str, Any]:
    """The Serve deployment options that place one replica and its TP workers."""
    return {
        "ray_actor_options": replica_actor_options(use_gpu),
        "placement_group_bundles": replica_bundles(tensor_parallel_size, use_gpu),
        "placement_group_strategy": STRATEGY,
    }


def cpus_needed(tensor_parallel_size: int, replicas: int) -> int:
    """Logical CPUs a local Ray must declare to place every replica's bundles, plus the
    ingress and metrics actors (which ask for none) and some headroom for Serve's own."""
    return tensor_parallel_size * replicas + 2
