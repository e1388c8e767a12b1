"""The caller's side of an engine, without torch: turning prompts into token ids, checking
requests against the model's limits, and `generate()` on top of `submit()`.

Shared by LLMEngine and by the client of an engine process, which imports no torch at all
(its process only relays requests and outputs; the child has the model).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from modelfleet.engine.errors import InvalidRequest
from modelfleet.engine.params import RequestOutput, SamplingParams

if TYPE_CHECKING:
    from modelfleet.engine.config import EngineConfig, ModelConfig
    from modelfleet.engine.tokenizer import Tokenizer

Prompt = str | list[int] | list[dict[str, Any]]


class EngineFrontend:
    """What an engine does on the caller's side, shared by LLMEngine and the client of an
    engine process (`modelfleet.engine.process`): turning a prompt into token ids, checking
    a request against the model's limits before anything is queued, and `generate()` on
    top of the subclass's `submit()` and `abort()`.

    Needs `tokenizer`, `model_config`, `max_model_len`, `config` and `kv_blocks_total`."""

    tokenizer: Tokenizer
    model_config: ModelConfig
    max_model_len: int
    config: EngineConfig
    kv_blocks_total: int

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)

    def validate(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """Raise InvalidRequest naming the bad parameter; return the prompt's token ids."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequest("params", "must be a SamplingParams")
        params.verify()
        ids = self._tokenize(prompt)
        n = len(ids)
        if n >= self.max_model_len:
            raise InvalidRequest(
                "prompt", f"{n} tokens leave no room to generate within max_model_len={self.max_model_len}"
            )
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                "max_tokens",
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len={self.max_model_len}",
            )
        total = n + (params.max_tokens or self.max_model_len - n)
        if -(-total // self.config.block_size) > self.kv_blocks_total:
            raise InvalidRequest(
                "max_tokens",
                f"{total} tokens do not fit the KV cache ({self.kv_blocks_total} blocks)",
            )
        return ids

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream deltas of one request. Closing the iterator early aborts it and frees its blocks."""
        queue: asyncio.Queue = asyncio.Queue()
        req = self.submit(prompt, params, queue, request_id)
        done = False
        try:
            while True:
                out = await queue.get()
                if isinstance(out, Exception):
                    done = True
                    raise out
                if out.finish_reason is not None:
                    done = True
                yield out
                if done:
                    return
        finally:
            if not done:
                self.abort(req)

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt", "must not be empty")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, list) or not prompt:
            raise InvalidRequest("prompt", "must be a non-empty string, token id list or message list")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.model_config.vocab_size
            if any(t < 0 or t >= vocab for t in prompt):
                raise InvalidRequest("prompt", f"token ids must be in [0, {vocab})")
            return list(prompt)
        if all(isinstance(m, dict) for m in prompt):
            for m in prompt:
                if not isinstance(m.get("role"), str) or "content" not in m:
                    raise InvalidRequest("messages", "each message needs a role and a content")
            text = self.apply_chat_template(prompt)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if not ids:
                raise InvalidRequest("messages", "render to an empty prompt")
            return ids
        raise InvalidRequest("prompt", "must be a string, a list of token ids or a list of messages")
