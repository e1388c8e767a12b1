"""A request's tokens and its place in the KV cache, as the scheduler and block manager see it."""

from __future__ import annotations

import itertools
from enum import Enum, auto

import torch

from modelfleet.engine.params import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, token_ids: list[int], params: SamplingParams, block_size: int,
                 generator: torch.Generator | None = None) -> None:
        self.seq_id = next(_ids)
        self.status = Status.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.block_size = block_size
        self.block_table: list[int] = []
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at the last prefill
        self.num_computed_tokens = 0  # tokens whose keys/values are in the cache
        self.generator = generator  # per-request sampling RNG (seeded requests)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_blocks(self) -> int:
        return -(-len(self.token_ids) // self.block_size)

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]
