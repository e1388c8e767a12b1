"""Can the fleet place a ModelDeployment's replicas? Judged from nodes and the pods bound to them.

A replica needs `tensorParallelSize` GPUs on one node. Free GPUs on a node are its allocatable
GPUs minus the GPU requests of the non-terminated pods bound to it. The verdict's message is
what the CapacityLimited condition and `modelfleet plan` print.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelfleet.api import ModelDeployment
from modelfleet.api.quantity import parse_quantity
from modelfleet.operator.pods import GPU_PRODUCT_LABEL, worker_tolerations


@dataclass(frozen=True)
class NodeRoom:
    name: str
    allocatable: int
    free: int


@dataclass(frozen=True)
class Verdict:
    """How many more replicas fit, and why not when some do not."""

    limited: bool
    placeable: int  # replicas that fit now, counting the ones already bound
    message: str
    reason: str = "Fits"  # or InsufficientGPUsOnAnyNode, InsufficientFreeGPUs


def _count(value: Any) -> int:
    try:
        return int(parse_quantity(value))
    except (ValueError, TypeError):
        return 0


def _tolerates(taint: dict[str, Any], tolerations: list[dict[str, Any]]) -> bool:
    if taint.get("effect") == "PreferNoSchedule":
        return True
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t.get("key") == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def eligible(node: dict[str, Any], md: ModelDeployment, tolerations: list[dict[str, Any]]) -> bool:
    """Does the node match the replica's product, node selector and taints?"""
    meta, spec = node.get("metadata", {}), node.get("spec", {})
    labels = meta.get("labels") or {}
    if spec.get("unschedulable"):
        return False
    product = md.spec.resources.gpu.product
    if product and labels.get(GPU_PRODUCT_LABEL) != product:
        return False
    if any(labels.get(k) != v for k, v in md.spec.placement.node_selector.items()):
        return False
    return all(_tolerates(t, tolerations) for t in spec.get("taints") or [])


def node_rooms(
    nodes: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    md: ModelDeployment,
) -> list[NodeRoom]:
    resource = md.spec.resources.gpu.resource_name
    used: dict[str, int] = {}
    for pod in pods:
        node = pod.get("spec", {}).get("nodeName")
        if not node or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            continue
        for c in pod.get("spec", {}).get("containers", []):
            used[node] = used.get(node, 0) + _count(
                (c.get("resources", {}).get("requests") or {}).get(resource, 0)
            )
    tolerations = worker_tolerations(md)
    rooms = []
    for node in nodes:
        if not eligible(node, md, tolerations):
            continue
        name = node["metadata"]["name"]
        alloc = _count((node.get("status", {}).get("allocatable") or {}).get(resource, 0))
        rooms.append(NodeRoom(name, alloc, max(0, alloc - used.get(name, 0))))
    return rooms


def judge(
    md: ModelDeployment,
    nodes: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    own_bound: int,
    want: int | None = None,
) -> Verdict:
    """Can `want` (default spec.replicas) replicas run, given `own_bound` already bound?"""
    want = md.spec.replicas if want is None else want
    need = md.spec.gpus_per_replica
    if need == 0:
        return Verdict(False, want, "CPU replicas: no GPUs needed")
    resource = md.spec.resources.gpu.resource_name
    product = md.spec.resources.gpu.product
    what = f"{need} x {resource}" + (f" ({product})" if product else "")
    rooms = node_rooms(nodes, pods, md)
    largest = max((r.allocatable for r in rooms), default=0)
    missing = want - own_bound
    if missing <= 0:
        return Verdict(False, want, "all replicas are placed")
    fits = sum(r.free // need for r in rooms)
    if fits >= missing:
        return Verdict(False, own_bound + fits, f"{missing} more replica(s) fit")
    short = missing - fits
    noun = "replica cannot" if short == 1 else "replicas cannot"
    if largest < need:
        where = "no eligible node has any" if not rooms else f"the largest node has {largest}"
        message = f"{short} {noun} be placed: it needs {what} on one node; {where}"
        return Verdict(True, own_bound, message, "InsufficientGPUsOnAnyNode")
    message = (
        f"{short} {noun} be placed: each needs {what} on one node; the most free on any eligible "
        f"node is {max(r.free for r in rooms)} ({len(rooms)} eligible node(s))"
    )
    return Verdict(True, own_bound + fits, message, "InsufficientFreeGPUs")
