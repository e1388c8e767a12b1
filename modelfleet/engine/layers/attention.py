"""Attention over the paged KV cache: store the new keys/values by slot, then attend.

The cache of one layer is two flat tensors [num_blocks * block_size, Hkv, D]; a token's slot is
block_table[pos // block_size] * block_size + pos % block_size. Decode gathers whole blocks
(contiguous copies) and masks the positions past each context; the cache starts zeroed and
block 0 is reserved, so padding reads finite values that the mask weighs by exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelfleet.engine.layers.context import get_context


class Attention(nn.Module):
    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.scale = n_heads, n_kv_heads, head_dim, scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.block_size = 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D] -> [T, H * D]
        ctx = get_context()
        self.k_cache.index_copy_(0, ctx.slot_mapping, k)
        self.v_cache.index_copy_(0, ctx.slot_mapping, v)
        outs = [self._prefill(q, k, v, ctx)] if ctx.seqs else []
        outs += [
            self._decode(q[start : start + len(tables)], tables, mask)
            for start, tables, mask in ctx.decode_groups
        ]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.reshape(q.shape[0], self.n_heads * self.head_dim)

    def _prefill(self, q, k, v, ctx) -> torch.Tensor:
        outs = []
        gqa = self.n_heads != self.n_kv_heads
        for (start, n, ctx_len), slots in zip(ctx.seqs, ctx.prefix_slots, strict=True):
            qi = q[start : start + n].transpose(0, 1)  # [H, n, D]
            if slots is None:  # nothing cached: keys are this step's own
                ki, vi = k[start : start + n], v[start : start + n]
                mask, causal = None, True
            else:  # a cached prefix: gather the whole context from the cache
                ki, vi = self.k_cache[slots], self.v_cache[slots]  # [ctx, Hkv, D]
                pos_q = torch.arange(ctx_len - n, ctx_len, device=q.device)
                mask = torch.arange(ctx_len, device=q.device)[None, :] <= pos_q[:, None]
                causal = False
            ki, vi = ki.transpose(0, 1), vi.transpose(0, 1)  # [Hkv, ctx, D]
            o = F.scaled_dot_product_attention(
                qi.unsqueeze(0), ki.unsqueeze(0), vi.unsqueeze(0),
                attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=gqa,
            )  # [1, H, n, D]
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs, dim=0)

    def _decode(self, q: torch.Tensor, tables: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # q: [B, H, D]; tables: [B, nb] block ids (0 = padding); mask: [B, 1, 1, nb * bs]
        b, nb = tables.shape
        width = self.block_size * self.n_kv_heads * self.head_dim
        flat = tables.flatten()
        shape = (b, nb * self.block_size, self.n_kv_heads, self.head_dim)
        k = self.k_cache.view(-1, width).index_select(0, flat).view(shape)  # [B, L, Hkv, D]
        v = self.v_cache.view(-1, width).index_select(0, flat).view(shape)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads,
        )  # [B, H, 1, D]
        return out.squeeze(2)
