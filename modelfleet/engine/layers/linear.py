"""Linears split across ranks: column-parallel (split outputs) and row-parallel (split inputs)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelfleet.engine.layers.loading import read_slice, shape_of
from modelfleet.engine.layers.parallel import all_reduce, tp_rank, tp_size


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows; each rank keeps out/tp outputs, no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        assert out_features % self.tp_size == 0
        self.out_per_rank = out_features // self.tp_size
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, src: Any, shard: Any = None) -> None:
        n = param.shape[0]
        param.data.copy_(read_slice(src, 0, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out/tp]
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up of the MLP)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def weight_loader(self, param: nn.Parameter, src: Any, shard: int = 0) -> None:
        size = self.out_sizes[shard] // self.tp_size
        offset = sum(self.out_sizes[:shard]) // self.tp_size
        param.data.narrow(0, offset, size).copy_(read_slice(src, 0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; each rank owns heads/tp query and kv heads."""

    def __init__(self, hidden: int, head_dim: int, n_heads: int, n_kv_heads: int, bias: bool) -> None:
        self.head_dim, self.n_heads, self.n_kv_heads = head_dim, n_heads, n_kv_heads
        super().__init__(hidden, (n_heads + 2 * n_kv_heads) * head_dim, bias)

    def weight_loader(self, param: nn.Parameter, src: Any, shard: str = "q") -> None:
        q = self.n_heads * self.head_dim // self.tp_size
        kv = self.n_kv_heads * self.head_dim // self.tp_size
        size, offset = {"q": (q, 0), "k": (kv, q), "v": (kv, q + kv)}[shard]
        param.data.narrow(0, offset, size).copy_(read_slice(src, 0, self.tp_rank * size, size))


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns; partial sums are all-reduced across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        assert in_features % self.tp_size == 0
        self.in_per_rank = in_features // self.tp_size
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, src: Any, shard: Any = None) -> None:
        if param.dim() == 1:  # the bias is whole on every rank, added once (rank 0)
            param.data.copy_(read_slice(src, 0, 0, shape_of(src)[0]))
            return
        n = param.shape[1]
        param.data.copy_(read_slice(src, 1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in/tp] -> [T, out]
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        return all_reduce(y)
