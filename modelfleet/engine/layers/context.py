"""Per-step attention metadata, set by the model runner and read by every Attention layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionContext:
    """A step's prompts take the first rows, its decoding sequences the rest."""

    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    # prompts: per sequence (query start, query length, context length); context = cached + query
    seqs: list[tuple[int, int, int]]
    prefix_slots: list[torch.Tensor | None]  # prompts: [ctx] slots to gather, None if no prefix hit
    # decode: groups of sequences with similar context lengths (each padded to its own longest):
    # (first row, block tables [b, nb] padded with block 0, visible keys [b, 1, 1, nb * block_size])
    decode_groups: list[tuple[int, torch.Tensor, torch.Tensor]]


_context: AttentionContext | None = None


def set_context(ctx: AttentionContext | None) -> None:
    global _context
    _context = ctx


def get_context() -> AttentionContext:
    assert _context is not None, "attention called outside a model step"
    return _context
