"""OpenAI response bodies and server-sent-event chunks, built as plain dicts and strings.

One `ChoiceState` per choice keeps what a streamed response needs across deltas (the
text offset for completion logprobs, the finish reason); `Transcript` accumulates a
non-streamed response.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

DONE = "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _top(entries: list[tuple[int, str, float]]) -> dict[str, float]:
    return {tok: lp for _, tok, lp in entries}


def completion_logprobs(logprobs: list[Any], offset: int) -> tuple[dict[str, Any], int]:
    """The legacy completions `logprobs` object for a run of tokens starting at `offset`."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in logprobs:
        tokens.append(lp.token)
        token_lps.append(lp.logprob)
        top = _top(lp.top)
        top.setdefault(lp.token, lp.logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(lp.token)
    body = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
    return body, offset


def chat_logprobs(logprobs: list[Any]) -> dict[str, Any]:
    """The chat `logprobs.content` list for a run of tokens."""
    content = []
    for lp in logprobs:
        content.append(
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode("utf-8")),
                "top_logprobs": [
                    {"token": tok, "logprob": val, "bytes": list(tok.encode("utf-8"))}
                    for _, tok, val in lp.top
                ],
            }
        )
    return {"content": content}


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    text_offset: int = 0
    finish_reason: str | None = None
    completion_tokens: int = 0
    role_sent: bool = False


class ResponseWriter:
    """Turns engine deltas into one OpenAI response: chunks when streaming, a body otherwise."""

    def __init__(self, kind: str, model: str, n_choices: int, want_logprobs: bool, include_usage: bool):
        self.kind = kind  # "completion" | "chat"
        self.model = model
        self.id = new_id("cmpl" if kind == "completion" else "chatcmpl")
        self.created = int(time.time())
        self.choices = [ChoiceState(i) for i in range(n_choices)]
        self.want_logprobs = want_logprobs
        self.include_usage = include_usage
        self.prompt_tokens = 0

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        chunk = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def opening(self) -> str:
        """Chat streams start with the assistant role, before any token."""
        if self.kind != "chat":
            return ""
        parts = []
        for c in self.choices:
            c.role_sent = True
            delta = {
                "index": c.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            parts.append(sse(self._chunk([delta])))
        return "".join(parts)

    def record(
        self, index: int, text: str, n_tokens: int, logprobs: list[Any] | None, finish_reason: str | None
    ) -> ChoiceState:
        c = self.choices[index]
        c.text.append(text)
        c.completion_tokens += n_tokens
        if logprobs and self.want_logprobs:
            c.logprobs.extend(logprobs)
        if finish_reason is not None:
            c.finish_reason = "stop" if finish_reason == "abort" else finish_reason
        return c

    def delta_chunk(
        self, index: int, text: str, logprobs: list[Any] | None, finish_reason: str | None
    ) -> str:
        """One SSE event for a delta of one choice."""
        c = self.choices[index]
        lp: dict[str, Any] | None = None
        if self.want_logprobs and logprobs:
            if self.kind == "completion":
                lp, c.text_offset = completion_logprobs(logprobs, c.text_offset)
            else:
                lp = chat_logprobs(logprobs)
        finish = None if finish_reason is None else ("stop" if finish_reason == "abort" else finish_reason)
        if self.kind == "completion":
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
        else:
            delta = {"content": text} if text or finish is None else {}
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return sse(self._chunk([choice]))

    def closing(self) -> str:
        """The usage chunk (when asked for) and the terminator."""
        out = ""
        if self.include_usage:
            chunk = self._chunk([])
            chunk["usage"] = usage_dict(self.prompt_tokens, self.completion_tokens)
            out += sse(chunk)
        return out + DONE

    def body(self) -> dict[str, Any]:
        """The whole non-streamed response."""
        choices = []
        for c in self.choices:
            text = "".join(c.text)
            lp: dict[str, Any] | None = None
            if self.want_logprobs:
                lp = (
                    completion_logprobs(c.logprobs, 0)[0]
                    if self.kind == "completion"
                    else chat_logprobs(c.logprobs)
                )
            if self.kind == "completion":
                choices.append(
                    {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}
                )
            else:
                choices.append(
                    {
                        "index": c.index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": lp,
                        "finish_reason": c.finish_reason,
                    }
                )
        return {
            "id": self.id,
            "object": "text_completion" if self.kind == "completion" else "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage_dict(self.prompt_tokens, self.completion_tokens),
        }


def error_event(body: dict[str, Any]) -> str:
    """An error after the stream has started: one event carrying it, then the terminator."""
    return sse(body) + DONE
