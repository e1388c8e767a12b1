"""Reading a rank's own slice of a checkpoint tensor without materialising the whole tensor."""

from __future__ import annotations

from typing import Any

import torch


def shape_of(src: Any) -> tuple[int, ...]:
    return tuple(src.shape) if isinstance(src, torch.Tensor) else tuple(src.get_shape())


def read_slice(src: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """src: a torch.Tensor or a safetensors slice; returns src[..., start:start+length, ...] on dim."""
    if isinstance(src, torch.Tensor):
        return src.narrow(dim, start, length)
    index = [slice(None)] * len(src.get_shape())
    index[dim] = slice(start, start + length)
    return src[tuple(index)]


def read_all(src: Any) -> torch.Tensor:
    return src if isinstance(src, torch.Tensor) else src[:]


def default_weight_loader(param: torch.nn.Parameter, src: Any, shard: Any = None) -> None:
    tensor = read_all(src)
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs model {tuple(param.shape)}")
    param.data.copy_(tensor)
