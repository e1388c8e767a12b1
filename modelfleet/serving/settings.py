"""The serving settings: everything a Serve application needs from a ModelDeployment,
flattened into one plain, JSON-serialisable object so that it can travel as Serve
application args (an operator-written Serve config) or be built by `modelfleet serve`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

API_KEY_ENV = "MODELFLEET_API_KEY"

# Ray Serve settings of every process that hosts the application (read when Ray starts its
# workers, so they are set before `ray.init` / `ray start`): user code and the handle's
# router run on each replica's main event loop instead of threads of their own, which
# saves two thread hops per streamed chunk (about a fifth more tokens/s through the
# endpoint under load). The engine's model steps run in a process of their own (on a
# thread for a tensor-parallel engine), so the event loop stays free. Calls between the
# proxy, the ingress and the model replicas go over Serve's direct gRPC channel rather
# than Ray actor calls (a fifth more again, and a lower TTFT; the ingress also asks for it
# on its handles), and request-path log lines are written in batches (errors at once):
# the settings of Ray Serve's own throughput-optimized profile, less its experimental
# proxy-less ingress.
SERVE_PROCESS_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


def apply_serve_process_env() -> None:
    """Set SERVE_PROCESS_ENV in this process (for a local Ray it starts), keeping what the
    user set; and run Ray's workers (the replicas) at normal priority rather than niceness
    15: here they are the service."""
    for key, value in {**SERVE_PROCESS_ENV, "RAY_worker_niceness": "0"}.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class ServeSettings:
    """One application: the model, the engine knobs, the replica count and the API."""

    name: str
    """ModelDeployment name; a label on every metric."""
    namespace: str = "default"
    served_name: str = ""
    """The name in /v1/models; defaults to `name`."""
    model: str = "builtin://tiny-llama"
    revision: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256
    kv_cache_memory_fraction: float = 0.9
    num_kv_blocks: int | None = None
    block_size: int = 16
    max_queue_depth: int = 128
    """Waiting requests per ready replica (none ready counts as one) that the deployment holds
    before the ingress answers 429."""
    replicas: int = 1
    device: str = "auto"
    """auto | cpu | cuda: `auto` uses GPUs when Ray has them."""
    require_api_key: bool = False
    """When set, the ingress refuses to start without a key and answers 401 without it."""
    api_key: str | None = field(default=None, repr=False)
    """The key itself (local use); otherwise read from `api_key_env` in the ingress."""
    api_key_env: str = API_KEY_ENV
    cold_start_timeout_s: float = 600.0
    """While no replica is ready, how long the ingress holds a request before answering 503."""
    stream_chunks_per_s: float = 100.0
    """Under load a replica's streams gather tokens between two chunks, so that together they
    send about this many chunks per second through Serve (each chunk crosses two processes,
    so chunks, not tokens, are what serving costs). The first token, and every token of a
    lone stream, goes at once."""
    stream_hold_max_s: float = 0.25
    """The longest a stream gathers tokens before it sends them."""
    engine_process: bool = True
    """With tensor_parallel_size 1, the engine steps in a child process of the replica rather
    than on a thread of it (no GIL shared with the replica's event loop)."""
    emulated_step_s: float = 0.0
    """Benchmarks on a CPU-only machine: every engine step lasts at least this long, asleep
    for the rest, like a device whose step time is fixed (see EngineConfig)."""
    health_check_period_s: float = 2.0
    enable_fault_injection: bool = False
    """Adds a handle method that breaks the engine; for recovery tests only."""

    def __post_init__(self) -> None:
        if not self.served_name:
            object.__setattr__(self, "served_name", self.name)
        for attr in ("tensor_parallel_size", "max_num_seqs", "max_queue_depth", "block_size"):
            if getattr(self, attr) < 1:
                raise ValueError(f"{attr} must be >= 1, got {getattr(self, attr)}")
        if self.replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {self.replicas}")
        if self.stream_chunks_per_s <= 0:
            raise ValueError(f"stream_chunks_per_s must be > 0, got {self.stream_chunks_per_s}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def replica_waiting_limit(self) -> int:
        """Requests a replica takes beyond its `max_num_seqs` sequence slots: enough that a slot
        freed mid-batch is refilled at the next step, few enough that a backlog stays with
        Serve's router, where whichever replica frees a slot first (one that just started
        included) takes the oldest request. A quarter of the slots, at least one, at most
        `max_queue_depth`."""
        return max(1, min(self.max_queue_depth, -(-self.max_num_seqs // 4)))

    @property
    def replica_capacity(self) -> int:
        """The most requests Serve routes to one replica (its `max_ongoing_requests`)."""
        return self.max_num_seqs + self.replica_waiting_limit

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown serving settings: {', '.join(unknown)}")
        return cls(**data)

    def resolve_api_key(self) -> str | None:
        """The key requests must carry, or None when the API is open."""
        key = self.api_key or os.environ.get(self.api_key_env) or None
        if self.require_api_key and not key:
            raise RuntimeError(
                f"the deployment requires an API key but none was given "
                f"(set {self.api_key_env} or pass the key file)"
            )
        return key.strip() if key else None


def settings_from_deployment(md: Any, **overrides: Any) -> ServeSettings:
    """Flatten a `modelfleet.api.ModelDeployment` into ServeSettings; `overrides` win."""
    spec = md.spec
    model, engine = spec.model, spec.engine
    service = getattr(spec, "service", None)
    values: dict[str, Any] = {
        "name": md.metadata.name,
        "namespace": md.metadata.namespace or "default",
        "served_name": getattr(md, "served_name", None) or model.served_name or md.metadata.name,
        "model": model.uri,
        "revision": getattr(model, "revision", None),
        "dtype": getattr(model, "dtype", "auto") or "auto",
        "max_model_len": getattr(model, "max_model_len", None),
        "tensor_parallel_size": engine.tensor_parallel_size,
        "max_num_seqs": engine.max_num_seqs,
        "kv_cache_memory_fraction": engine.kv_cache_memory_fraction,
        "block_size": getattr(engine, "block_size", 16),
        "max_queue_depth": getattr(engine, "max_queue_depth", 128),
        "replicas": spec.replicas,
        "cold_start_timeout_s": float(getattr(spec.autoscaling, "cold_start_timeout_seconds", 600)),
        "require_api_key": bool(service is not None and service.api_key_secret_ref is not None),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ServeSettings(**values)
