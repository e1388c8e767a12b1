"""Logits of the engine against transformers on the same random weights, float32 on the CPU.

Each prompt is prefilled through the paged cache, then decoded greedily for 24 steps, one token
at a time through the cache; every step's logits are compared with one full transformers forward
over the same tokens. Tolerance: absolute 2e-4 and relative 1e-4; the largest difference seen
is under 1e-5 on logits of magnitude up to 6.
"""

from __future__ import annotations

import pytest
import torch
from engine_checkpoints import write_hf_checkpoint

from modelfleet.engine import EngineConfig, LLMEngine, SamplingParams
from modelfleet.engine.model_runner import StepInput
from modelfleet.engine.sequence import Sequence

DECODE_STEPS = 24
ATOL, RTOL = 2e-4, 1e-4

CASES = {
    # Llama 3.1: GQA, llama3 RoPE scaling, untied head, odd vocabulary (uneven vocab split at TP 2)
    "llama31": ("LlamaForCausalLM", False, dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
    })),
    # Qwen2: q/k/v bias, tied embeddings, sharded safetensors with an index
    "qwen2": ("Qwen2ForCausalLM", True, dict(rope_parameters={"rope_type": "default",
                                                                "rope_theta": 1000000.0})),
    "mistral": ("MistralForCausalLM", False, dict(num_key_value_heads=4, sliding_window=None)),
}


def engine_logits(engine: LLMEngine, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Prefill all prompts in one step, then decode greedily in batched steps; per prompt a
    [len(prompt) + DECODE_STEPS - 1 + 1, V] stack: prefill logits of every token, then one row per step."""
    bm = engine.block_manager
    seqs = [Sequence(p, SamplingParams(temperature=0), engine.config.block_size) for p in prompts]
    for s in seqs:
        bm.allocate(s)
    step = StepInput(
        len(prompts), [t for p in prompts for t in p], [i for p in prompts for i in range(len(p))],
        [s.block_table for s in seqs], [len(p) for p in prompts], [len(p) for p in prompts],
        all_logits=True,
    )
    logits = engine.runner.call("run", step)
    rows: list[list[torch.Tensor]] = []
    start = 0
    for p in prompts:
        rows.append([logits[start : start + len(p)]])
        start += len(p)
    for _ in range(DECODE_STEPS):
        for s, r in zip(seqs, rows, strict=True):
            s.token_ids.append(int(r[-1][-1].argmax()))
            bm.append(s)
        step = StepInput(0, [s.token_ids[-1] for s in seqs], [len(s) - 1 for s in seqs],
                         [s.block_table for s in seqs], [1] * len(seqs), [len(s) for s in seqs])
        logits = engine.runner.call("run", step)
        for i, r in enumerate(rows):
            r.append(logits[i : i + 1])
    for s in seqs:
        bm.free_seq(s)
    return [torch.cat(r) for r in rows], [s.token_ids for s in seqs]


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    arch, tie, extra = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    shard = "60KB" if request.param == "qwen2" else None
    model = write_hf_checkpoint(path, arch, tie=tie, max_shard_size=shard, **extra)
    return request.param, path, model


PROMPTS = [[1, 5, 900, 33, 7, 1500, 42, 8, 99, 3, 17, 250, 600, 31, 44, 45, 46, 47, 48, 2000],
           [1, 300, 301],
           [1, *range(100, 137)]]


@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_transformers(checkpoint, tp):
    name, path, hf_model = checkpoint
    if name == "qwen2":
        assert (path / "model.safetensors.index.json").exists(), "expected a sharded checkpoint"
    engine = LLMEngine(EngineConfig(model=str(path), tensor_parallel_size=tp, num_kv_blocks=64,
                                    block_size=8, device="cpu"))
    try:
        ours, tokens = engine_logits(engine, PROMPTS)
    finally:
        engine.close()
    for prompt, got, toks in zip(PROMPTS, ours, tokens, strict=True):
        with torch.no_grad():
            ref = hf_model(torch.tensor([toks])).logits[0]  # [len, V]
        expected = ref[: len(prompt) + DECODE_STEPS]
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
