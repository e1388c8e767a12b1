"""The torch inference engine: models, tensor-parallel layers, paged KV cache, scheduler, sampler.

    engine = LLMEngine(EngineConfig(model="builtin://tiny-llama"))
    async for delta in engine.generate("Hello", SamplingParams(max_tokens=32)):
        print(delta.text, end="")
"""

from modelfleet.engine.builtin import TINY_LLAMA_URI
from modelfleet.engine.config import EngineConfig, ModelConfig
from modelfleet.engine.engine import Completion, LLMEngine
from modelfleet.engine.errors import InvalidConfig, InvalidRequest
from modelfleet.engine.params import (
    EngineStats,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    Usage,
)

__all__ = [
    "TINY_LLAMA_URI",
    "Completion",
    "EngineConfig",
    "EngineStats",
    "InvalidConfig",
    "InvalidRequest",
    "LLMEngine",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
    "Usage",
]
