"""The tensor-parallel group of this process: its rank, its size, and the collectives layers use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class _TPState:
    rank: int = 0
    size: int = 1
    cpu_group: object | None = None  # gloo group for control messages, also under NCCL


_state = _TPState()


def init_tp(rank: int, size: int, init_method: str, backend: str) -> None:
    """Join the engine's group. The address is unique per engine, so replicas never collide."""
    _state.rank, _state.size = rank, size
    if size == 1:
        return
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    _state.cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD


def destroy_tp() -> None:
    if _state.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _state.rank, _state.size, _state.cpu_group = 0, 1, None


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    # x: [T, N/tp] -> [T, N]
    if _state.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_object(obj: object = None) -> object:
    """Rank 0 sends a small picklable object to every rank over the CPU group."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_state.cpu_group)
    return box[0]


def barrier() -> None:
    if _state.size > 1:
        dist.barrier(group=_state.cpu_group)
