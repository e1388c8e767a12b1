"""Random-weight Hugging Face checkpoints written by transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from modelfleet.engine.builtin import materialize

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_hf_checkpoint(path: Path, arch: str, *, tie: bool, max_shard_size: str | None = None,
                        seed: int = 0, **overrides) -> torch.nn.Module:
    """Build a transformers model with random weights, save it with save_pretrained, return it."""
    import transformers

    base = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=2047, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
    )
    base.update(overrides)
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    model_cls = getattr(transformers, arch)
    torch.manual_seed(seed)
    config = config_cls(**base)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base_value = 1.0 if "norm" in name else 0.0
            p.copy_(torch.randn_like(p) * 0.15 + base_value)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    tiny = materialize()
    for name in TOKENIZER_FILES:
        shutil.copy(tiny / name, path / name)
    return model


