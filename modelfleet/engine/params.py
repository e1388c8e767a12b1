"""What a request asks for (SamplingParams) and what it gets back (RequestOutput deltas)."""

from __future__ import annotations

from dataclasses import dataclass, field

from modelfleet.engine.errors import InvalidRequest

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None -> up to max_model_len
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n alternatives per token (0 = only the chosen token)

    def __post_init__(self) -> None:
        self.verify()

    def verify(self) -> None:
        """Raise InvalidRequest naming the first bad field."""
        if self.max_tokens is not None and (
            not _is_int(self.max_tokens) or self.max_tokens < 1
        ):
            raise InvalidRequest("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise InvalidRequest("temperature", f"must be >= 0, got {self.temperature!r}")
        if not _is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise InvalidRequest("top_k", f"must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not _is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequest(
                "repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_num(value) or not -2.0 <= value <= 2.0:
                raise InvalidRequest(name, f"must be in [-2, 2], got {value!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidRequest("seed", f"must be an integer, got {self.seed!r}")
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
                raise InvalidRequest("stop", f"must be a string or a list of strings, got {self.stop!r}")
            if any(s == "" for s in stops):
                raise InvalidRequest("stop", "must not contain an empty string")
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, list | tuple)
            or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)
        ):
            raise InvalidRequest(
                "stop_token_ids", f"must be a list of token ids, got {self.stop_token_ids!r}"
            )
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise InvalidRequest(
                "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # not NaN


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    """One streamed delta of a request: what is new since the previous one."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # None, "stop", "length", "abort"
    usage: Usage
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hits: int  # full blocks found in the prefix cache
    prefix_cache_queries: int  # full blocks looked up
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int = 0
    steps_total: int = 0  # forward passes run; generation_tokens_total over it is the mean batch
