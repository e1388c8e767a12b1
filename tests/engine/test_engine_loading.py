"""Loading: each rank reads only its slices, dtypes convert, auto follows the checkpoint."""

from __future__ import annotations

import torch

from modelfleet.engine import EngineConfig, LLMEngine, SamplingParams
from modelfleet.engine.builtin import write_llama_dir
from modelfleet.engine.config import ModelConfig
from modelfleet.engine.layers import parallel
from modelfleet.engine.loader import load_weights
from modelfleet.engine.models.llama import LlamaForCausalLM


class RecordingSlice:
    """Stands in for a safetensors slice and records which parts were read."""

    def __init__(self, tensor: torch.Tensor, log: list) -> None:
        self.tensor, self.log = tensor, log

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index):
        self.log.append(index)
        return self.tensor[index]


def test_rank_one_of_two_reads_only_its_half(tiny_path, monkeypatch):
    from safetensors import safe_open

    cfg = ModelConfig.from_dir(tiny_path)
    monkeypatch.setattr(parallel._state, "rank", 1)
    monkeypatch.setattr(parallel._state, "size", 2)
    model = LlamaForCausalLM(cfg)
    reads: dict[str, list] = {}
    real_open = safe_open

    class Recording:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, name):
            return RecordingSlice(self.f.get_tensor(name), reads.setdefault(name, []))

    monkeypatch.setattr("modelfleet.engine.loader.safe_open", Recording)
    load_weights(model, tiny_path, show_progress=False)
    q = "model.layers.0.self_attn.q_proj.weight"
    (index,) = reads[q]
    assert index[0] == slice(32, 64)  # 4 heads x 16: rank 1 owns heads 2-3
    (index,) = reads["model.layers.0.self_attn.o_proj.weight"]
    assert index == (slice(None), slice(32, 64))
    (index,) = reads["model.layers.0.mlp.down_proj.weight"]
    assert index == (slice(None), slice(96, 192))
    vocab = cfg.vocab_size
    (index,) = reads["model.embed_tokens.weight"]
    assert index[0] == slice((vocab + 1) // 2, vocab)
    # norms are read whole, everything else only in part
    assert all(ix == slice(None, None, None) for ix in reads["model.norm.weight"])


def test_dtype_conversion_and_auto(tmp_path):
    engine = LLMEngine(EngineConfig(dtype="bfloat16", device="cpu"))
    assert next(engine.runner.model.parameters()).dtype == torch.bfloat16
    out = engine.generate_batch(["Hello"], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5
    engine.close()
    write_llama_dir(tmp_path, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                    dtype=torch.bfloat16)
    auto = LLMEngine(EngineConfig(model=str(tmp_path), device="cpu"))
    assert next(auto.runner.model.parameters()).dtype == torch.bfloat16
    assert auto.max_model_len == 128
    auto.close()
