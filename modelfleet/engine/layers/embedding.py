"""Embedding and LM head split along the vocabulary: each rank holds ceil(V/tp) rows."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelfleet.engine.layers.loading import read_slice, shape_of
from modelfleet.engine.layers.parallel import all_gather_last_dim, all_reduce, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // self.tp_size)
        self.start = self.tp_rank * self.per_rank
        self.end = min(vocab_size, self.start + self.per_rank)
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, src: Any, shard: Any = None) -> None:
        rows = self.end - self.start
        assert shape_of(src)[0] == self.vocab_size, "vocabulary size differs from config.json"
        param.data.zero_()  # the last rank's padding rows stay zero
        param.data[:rows].copy_(read_slice(src, 0, self.start, rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [T] -> [T, hidden]
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.end)
        y = F.embedding((ids - self.start) * mine, self.weight) * mine.unsqueeze(-1)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: [B, hidden] -> logits [B, V] (every rank gets the whole row)
        logits = F.linear(h, self.weight)
        if self.tp_size > 1:
            logits = all_gather_last_dim(logits)
        return logits[:, : self.vocab_size]
