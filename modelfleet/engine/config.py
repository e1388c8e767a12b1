"""The engine's config (checked once, here) and the model shape read from config.json."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfleet.engine.errors import InvalidConfig

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# torch is imported where a dtype or device is needed, so that the client of an engine
# process can check a config without loading torch.
DTYPES = ("float32", "float16", "bfloat16")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class EngineConfig:
    """What a replica asks of its engine. Every field is checked in __post_init__."""

    model: str = "builtin://tiny-llama"
    dtype: str = "auto"  # auto follows the checkpoint (float32 on a CPU when it is half)
    max_model_len: int | None = None  # None -> max_position_embeddings of config.json
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256
    kv_cache_memory_fraction: float = 0.9
    num_kv_blocks: int | None = None  # overrides the memory fraction
    block_size: int = 16
    device: str = "auto"  # auto: cuda if available else cpu
    worker_backend: str = "mp"  # "mp" (torch.multiprocessing) or "ray" (actors)
    max_num_batched_tokens: int | None = None  # prefill token budget per step
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds requests that carry no seed of their own
    load_format: str = "auto"  # "dummy": random weights of the checkpoint's shape (benchmarks)
    # Every model step lasts at least this long: the rest of it is spent asleep. It stands in
    # for a device whose step takes a fixed time and leaves the host's cores free, so that
    # serving and autoscaling can be measured on a CPU-only machine as they behave on GPU nodes.
    emulated_step_s: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidConfig("model", "must be a non-empty URI or path")
        if self.dtype not in ("auto", *DTYPES):
            raise InvalidConfig("dtype", f"must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 2
        ):
            raise InvalidConfig("max_model_len", f"must be an integer >= 2, got {self.max_model_len!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise InvalidConfig(
                "tensor_parallel_size", f"must be an integer >= 1, got {self.tensor_parallel_size!r}"
            )
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise InvalidConfig("max_num_seqs", f"must be an integer >= 1, got {self.max_num_seqs!r}")
        if not 0.0 < float(self.kv_cache_memory_fraction) <= 1.0:
            raise InvalidConfig(
                "kv_cache_memory_fraction", f"must be in (0, 1], got {self.kv_cache_memory_fraction!r}"
            )
        if self.num_kv_blocks is not None and (
            not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1
        ):
            raise InvalidConfig("num_kv_blocks", f"must be an integer >= 1, got {self.num_kv_blocks!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise InvalidConfig("block_size", f"must be a power of two <= 256, got {self.block_size!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidConfig("device", f"must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not _cuda_available():
            raise InvalidConfig("device", "cuda was asked for but no GPU is visible")
        if self.worker_backend not in ("mp", "ray"):
            raise InvalidConfig("worker_backend", f"must be mp or ray, got {self.worker_backend!r}")
        if self.load_format not in ("auto", "dummy"):
            raise InvalidConfig("load_format", f"must be auto or dummy, got {self.load_format!r}")
        if not 0.0 <= float(self.emulated_step_s) <= 10.0:
            raise InvalidConfig(
                "emulated_step_s", f"must be in [0, 10] seconds, got {self.emulated_step_s!r}"
            )
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise InvalidConfig("max_num_batched_tokens", "must be >= 1")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if _cuda_available() else "cpu"
        return self.device


@dataclass
class ModelConfig:
    """The shape of a Llama-family checkpoint, normalised across transformers versions."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    torch_dtype: str | None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ModelConfig:
        path = Path(path)
        raw = json.loads((path / "config.json").read_text())
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise InvalidConfig(
                "model", f"unsupported architecture {archs}; supported: {SUPPORTED_ARCHITECTURES}"
            )
        # transformers 5 nests rope settings in rope_parameters; 4.x keeps rope_theta/rope_scaling
        rope = dict(raw.get("rope_parameters") or {})
        scaling = raw.get("rope_scaling") or rope or None
        rope_theta = float(raw.get("rope_theta", rope.get("rope_theta", 10000.0)))
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            scaling = None if kind == "default" else {**scaling, "rope_type": kind}
        heads = raw["num_attention_heads"]
        qwen = arch == "Qwen2ForCausalLM"
        eos = _as_list(raw.get("eos_token_id"))
        gen = path / "generation_config.json"
        if gen.exists():
            eos = _as_list(json.loads(gen.read_text()).get("eos_token_id")) + eos
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=True if qwen else bool(raw.get("attention_bias", False)),
            o_bias=False if qwen else bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            eos_token_ids=list(dict.fromkeys(eos)),
            bos_token_id=raw.get("bos_token_id"),
        )

    def check_parallel(self, tp: int) -> None:
        if self.num_heads % tp or self.num_kv_heads % tp:
            raise InvalidConfig(
                "tensor_parallel_size",
                f"{tp} must divide the attention heads ({self.num_heads}) "
                f"and the key/value heads ({self.num_kv_heads})",
            )
        if self.intermediate_size % tp:
            raise InvalidConfig(
                "tensor_parallel_size", f"{tp} must divide intermediate_size ({self.intermediate_size})"
            )


def resolve_dtype(requested: str, checkpoint: str | None, device: str) -> torch.dtype:
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    name = checkpoint or "float32"
    dtype = getattr(torch, name) if name in DTYPES else torch.float32
    if device == "cpu" and dtype == torch.float16:
        return torch.float32  # half matmuls on CPUs are slow or missing
    return dtype


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]
