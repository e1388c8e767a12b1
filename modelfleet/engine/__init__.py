"""The torch inference engine: models, tensor-parallel layers, paged KV cache, scheduler, sampler.

    engine = LLMEngine(EngineConfig(model="builtin://tiny-llama"))
    async for delta in engine.generate("Hello", SamplingParams(max_tokens=32)):
        print(delta.text, end="")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names resolve on first use, so that importing the light parts (config, params, errors)
# does not load torch: the client of an engine process never needs it.
_WHERE = {
    "TINY_LLAMA_URI": "builtin",
    "EngineConfig": "config",
    "ModelConfig": "config",
    "Completion": "engine",
    "LLMEngine": "engine",
    "InvalidConfig": "errors",
    "InvalidRequest": "errors",
    "EngineStats": "params",
    "RequestOutput": "params",
    "SamplingParams": "params",
    "TokenLogprob": "params",
    "Usage": "params",
}

if TYPE_CHECKING:
    from modelfleet.engine.builtin import TINY_LLAMA_URI
    from modelfleet.engine.config import EngineConfig, ModelConfig
    from modelfleet.engine.engine import Completion, LLMEngine
    from modelfleet.engine.errors import InvalidConfig, InvalidRequest
    from modelfleet.engine.params import EngineStats, RequestOutput, SamplingParams, TokenLogprob, Usage


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value

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
