"""One tensor-parallel rank: the model shard, its KV cache, and the forward pass of a step.

Rank 0 lives in the engine's process; it broadcasts each step (a small picklable StepInput)
to the other ranks, which run the same forward and take part in the collectives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from modelfleet.engine.config import EngineConfig, ModelConfig
from modelfleet.engine.layers.attention import Attention
from modelfleet.engine.layers.context import AttentionContext, set_context
from modelfleet.engine.layers.parallel import broadcast_object, destroy_tp, init_tp, tp_size
from modelfleet.engine.loader import build_model, load_weights
from modelfleet.engine.models import MODELS

log = logging.getLogger(__name__)

DECODE_GROUP = 16  # sequences per padded attention call in a decode step


@dataclass
class RunnerSpec:
    """Everything a rank needs to build itself; picklable, sent to worker processes."""

    engine: EngineConfig
    model_path: str
    model: ModelConfig
    dtype: torch.dtype
    device: str  # "cpu" or "cuda"
    max_model_len: int
    init_method: str = ""  # tcp://host:port, unique per engine
    local_device_index: int | None = None  # cuda index for this rank; None -> rank (mp) or 0


@dataclass
class StepInput:
    """One forward: the first `num_prefill` sequences run a prompt (every token past a cached
    prefix), the others decode their last token; rows of the inputs follow that order."""

    num_prefill: int
    input_ids: list[int]  # [T]
    positions: list[int]  # [T]
    block_tables: list[list[int]]  # [B][blocks]
    query_lens: list[int]  # [B]
    context_lens: list[int]  # [B] tokens in the cache after this step
    all_logits: bool = False  # logits of every token, not only each sequence's last (tests)


class ModelRunner:
    def __init__(self, spec: RunnerSpec, rank: int) -> None:
        self.spec, self.rank = spec, rank
        tp = spec.engine.tensor_parallel_size
        self._threads = torch.get_num_threads()
        if spec.device == "cuda":
            index = spec.local_device_index if spec.local_device_index is not None else rank
            torch.cuda.set_device(index)
            self.device = f"cuda:{index}"
            backend = "nccl"
        else:
            self.device = "cpu"
            backend = "gloo"
            if tp > 1:  # share the cores between ranks instead of oversubscribing them
                torch.set_num_threads(max(1, (torch.get_num_threads() + tp - 1) // tp))
        init_tp(rank, tp, spec.init_method, backend)
        self.block_size = spec.engine.block_size
        self.model = build_model(MODELS[spec.model.architecture], spec.model, spec.dtype, self.device)
        if spec.engine.load_format == "dummy":
            init_dummy_weights(self.model, seed=1234 + rank)
        else:
            load_weights(self.model, Path(spec.model_path), show_progress=rank == 0)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.num_blocks = 0

    # -- KV cache ---------------------------------------------------------------------------

    def bytes_per_block(self) -> int:
        m = self.spec.model
        per_token = 2 * m.num_layers * (m.num_kv_heads // tp_size()) * m.head_dim
        return per_token * self.block_size * self.spec.dtype.itemsize

    def available_kv_bytes(self) -> int:
        frac = self.spec.engine.kv_cache_memory_fraction
        if self.device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            used = total - free
            return max(0, int(total * frac) - used - (512 << 20))  # headroom for activations
        import os

        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(avail * frac * 0.5)  # leave the rest to activations and other processes

    def allocate_kv_cache(self, num_blocks: int) -> None:
        m = self.spec.model
        kv_heads = m.num_kv_heads // tp_size()
        shape = (num_blocks * self.block_size, kv_heads, m.head_dim)
        for layer in self.attn_layers:
            layer.k_cache, layer.v_cache = self._zeros(shape), self._zeros(shape)
            layer.block_size = self.block_size
        self.num_blocks = num_blocks

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.device != "cpu":
            return torch.zeros(shape, dtype=self.spec.dtype, device=self.device)
        # calloc'd pages: zero without touching them, so unused cache costs no resident memory
        import numpy as np

        dtype = self.spec.dtype
        if dtype == torch.bfloat16:  # numpy has no bfloat16: allocate int16 and reinterpret
            return torch.from_numpy(np.zeros(shape, dtype=np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.zeros(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))

    # -- steps ------------------------------------------------------------------------------

    def call(self, method: str, *args):
        """Rank 0: run `method` on every rank (workers receive it by broadcast)."""
        if tp_size() > 1:
            broadcast_object((method, args))
        return getattr(self, method)(*args)

    def worker_loop(self) -> None:
        while True:
            method, args = broadcast_object()
            if method == "exit":
                break
            getattr(self, method)(*args)

    def exit(self) -> None:
        destroy_tp()
        torch.set_num_threads(self._threads)

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, step: StepInput) -> AttentionContext:
        slot_mapping: list[int] = []
        for table, q, ctx in zip(step.block_tables, step.query_lens, step.context_lens, strict=True):
            slot_mapping += self._slots(table, ctx - q, ctx)
        p = step.num_prefill
        seqs, prefix = [], []
        start = 0
        prompts = zip(step.block_tables[:p], step.query_lens[:p], step.context_lens[:p], strict=True)
        for table, q, ctx in prompts:
            seqs.append((start, q, ctx))
            prefix.append(self._tensor(self._slots(table, 0, ctx)) if ctx > q else None)
            start += q
        # decode, on the rows after the prompts': whole blocks of every context, padding reads
        # the zero block; sequences come sorted by length, and groups of them are padded only
        # to their own longest context
        groups = []
        tables_d, lens_d = step.block_tables[p:], step.context_lens[p:]
        for first in range(0, len(tables_d), DECODE_GROUP):
            lens = lens_d[first : first + DECODE_GROUP]
            width = -(-max(lens) // self.block_size)
            tables = [t[:width] + [0] * (width - len(t[:width]))
                      for t in tables_d[first : first + DECODE_GROUP]]
            visible = torch.arange(width * self.block_size)[None, :] < torch.tensor(lens)[:, None]
            groups.append((start + first, self._tensor(tables), visible[:, None, None, :].to(self.device)))
        return AttentionContext(self._tensor(slot_mapping), seqs, prefix, groups)

    @torch.inference_mode()
    def run(self, step: StepInput) -> torch.Tensor | None:
        """Forward one step. Returns logits [B, V] (or [T, V] with all_logits) on rank 0."""
        set_context(self.prepare(step))
        try:
            hidden = self.model(self._tensor(step.input_ids), self._tensor(step.positions))
            if step.num_prefill and not step.all_logits:  # each sequence's last row
                last = torch.tensor(step.query_lens).cumsum(0) - 1
                hidden = hidden[last.to(self.device)]
            logits = self.model.compute_logits(hidden)
        finally:
            set_context(None)
        return logits if self.rank == 0 else None


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def worker_main(spec: RunnerSpec, rank: int) -> None:
    """Entry point of ranks 1..tp-1 (a spawned process or a Ray actor)."""
    logging.basicConfig(level=logging.WARNING)
    runner = ModelRunner(spec, rank)
    runner.worker_loop()
    runner.exit()
