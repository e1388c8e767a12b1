"""The Prometheus metrics of a Serve application, and how they reach one /metrics page.

Each replica and each ingress keeps its own registry and pushes its exposition text to
the application's MetricsHub once a second; the ingress serves the hub's merged page at
`GET /metrics` on the API port. So one scrape through the endpoint Service sees every
replica of the ModelDeployment, each series labelled with its replica. These names are
the autoscaler's contract.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

LABELS = ("model_deployment", "namespace", "replica")

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# What a reader of /metrics can rely on; README lists the same.
METRIC_NAMES = (
    "modelfleet_queue_depth",
    "modelfleet_running_requests",
    "modelfleet_requests_total",
    "modelfleet_prompt_tokens_total",
    "modelfleet_generation_tokens_total",
    "modelfleet_time_to_first_token_seconds",
    "modelfleet_inter_token_latency_seconds",
    "modelfleet_request_duration_seconds",
    "modelfleet_kv_cache_usage_ratio",
    "modelfleet_replicas_ready",
    "modelfleet_engine_steps_total",
)


QUEUE_DEPTH_HELP = (
    "Waiting requests. A model replica's: accepted, no token yet. The ingress': not yet taken "
    "by any replica. Their sum is the deployment's queue."
)


class ReplicaMetrics:
    """The metrics one model replica owns."""

    def __init__(self, name: str, namespace: str, replica: str):
        self.registry = CollectorRegistry(auto_describe=False)
        labels = self._labels = (name, namespace, replica)
        r = self.registry

        def gauge(metric: str, doc: str) -> Gauge:
            return Gauge(metric, doc, LABELS, registry=r).labels(*labels)

        self.queue_depth = gauge("modelfleet_queue_depth", QUEUE_DEPTH_HELP)
        self.running = gauge("modelfleet_running_requests", "Requests producing tokens.")
        self.kv_usage = gauge("modelfleet_kv_cache_usage_ratio", "Share of KV cache blocks in use (0..1).")
        self.max_queue_depth = gauge(
            "modelfleet_max_queue_depth",
            "Waiting requests per ready replica the deployment holds before it answers 429.",
        )
        self.prompt_tokens = Counter(
            "modelfleet_prompt_tokens", "Prompt tokens processed.", LABELS, registry=r
        ).labels(*labels)
        self.generation_tokens = Counter(
            "modelfleet_generation_tokens", "Tokens generated.", LABELS, registry=r
        ).labels(*labels)
        self.engine_steps = Counter(
            "modelfleet_engine_steps",
            "Engine steps run: forward passes, each giving every running sequence a token. "
            "modelfleet_generation_tokens_total over it is the mean batch.",
            LABELS,
            registry=r,
        ).labels(*labels)
        self._steps_seen = 0
        self.ttft = Histogram(
            "modelfleet_time_to_first_token_seconds",
            "From admission at the replica to the first token.",
            LABELS,
            buckets=TTFT_BUCKETS,
            registry=r,
        ).labels(*labels)
        self.itl = Histogram(
            "modelfleet_inter_token_latency_seconds",
            "Between consecutive tokens of one sequence.",
            LABELS,
            buckets=ITL_BUCKETS,
            registry=r,
        ).labels(*labels)
        self.duration = Histogram(
            "modelfleet_request_duration_seconds",
            "From admission at the replica to the last token.",
            LABELS,
            buckets=DURATION_BUCKETS,
            registry=r,
        ).labels(*labels)

    def engine_steps_to(self, total: int) -> None:
        """Bring the steps counter up to the engine's own count (one engine per replica, so it
        only grows)."""
        self.engine_steps.inc(total - self._steps_seen)
        self._steps_seen = total

    def count_requests(self) -> None:
        """Also count API requests by status: for a replica that serves the API itself."""
        self._requests = request_counter(self.registry)

    def count(self, status: int) -> None:
        self._requests.labels(*self._labels, str(status)).inc()

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def request_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        "modelfleet_requests",
        "API requests by HTTP status (499: the client went away mid-stream).",
        (*LABELS, "status"),
        registry=registry,
    )


class IngressMetrics:
    """The metrics the HTTP ingress owns: outcomes as the client saw them."""

    def __init__(self, name: str, namespace: str, replica: str):
        self.registry = CollectorRegistry(auto_describe=False)
        self._labels = (name, namespace, replica)
        self._requests = request_counter(self.registry)

        self.held = 0
        self._held = Gauge(
            "modelfleet_ingress_waiting_requests",
            "Requests at the ingress that no model replica has taken yet: every one while no "
            "replica is ready (the signal to scale from zero), else those beyond the replicas' room.",
            LABELS,
            registry=self.registry,
        ).labels(*self._labels)
        # The same count under the queue's own name, so that any sum of modelfleet_queue_depth
        # over a deployment is its whole queue.
        queue = Gauge("modelfleet_queue_depth", QUEUE_DEPTH_HELP, LABELS, registry=self.registry)
        self._queue = queue.labels(*self._labels)
        # With the replicas' TTFT (admission to first token) it splits the TTFT a client sees:
        # the time to reach a replica, and the time in its engine.
        self.wait = Histogram(
            "modelfleet_ingress_wait_seconds",
            "From the ingress handing a checked request to Serve's router until a model replica took "
            "it: the routing, the trip to the replica and its acceptance (all of it while no replica "
            "is ready).",
            LABELS,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        ).labels(*self._labels)

    def hold(self) -> None:
        self._set_held(self.held + 1)

    def release(self) -> None:
        self._set_held(self.held - 1)

    def _set_held(self, n: int) -> None:
        self.held = n
        self._held.set(n)
        self._queue.set(n)

    def count(self, status: int) -> None:
        self._requests.labels(*self._labels, str(status)).inc()

    def text(self) -> str:
        return generate_latest(self.registry).decode()


@dataclass
class _Source:
    text: str
    kind: str
    seen: float = field(default_factory=time.monotonic)


class MetricsStore:
    """The latest exposition text of every source, merged into one page on request."""

    def __init__(self, name: str, namespace: str, stale_after_s: float = 10.0):
        self.name = name
        self.namespace = namespace
        self.stale_after_s = stale_after_s
        self._sources: dict[str, _Source] = {}

    def push(self, source: str, kind: str, text: str) -> None:
        self._sources[source] = _Source(text, kind)

    def drop(self, source: str) -> None:
        self._sources.pop(source, None)

    def _fresh(self) -> list[_Source]:
        """The sources pushed within `stale_after_s`, as a list: a push may add one meanwhile."""
        now = time.monotonic()
        fresh = []
        for key, src in list(self._sources.items()):
            if now - src.seen > self.stale_after_s:
                self._sources.pop(key, None)
            else:
                fresh.append(src)
        return fresh

    def ready_replicas(self) -> int:
        return sum(1 for s in self._fresh() if s.kind == "replica")

    def render(self) -> str:
        families: dict[str, Metric] = {}
        for src in self._fresh():
            for fam in text_string_to_metric_families(src.text):
                if fam.name.endswith("_created"):
                    continue  # creation timestamps of each series: noise on a merged page
                merged = families.get(fam.name)
                if merged is None:
                    merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                merged.samples.extend(s for s in fam.samples if not s.name.endswith("_created"))
        ready = Metric("modelfleet_replicas_ready", "Model replicas loaded and reporting.", "gauge")
        ready.add_sample(
            "modelfleet_replicas_ready",
            {"model_deployment": self.name, "namespace": self.namespace},
            float(self.ready_replicas()),
        )
        families[ready.name] = ready
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(list(families.values())))
        return generate_latest(registry).decode()


class _Fixed:
    def __init__(self, metrics: list[Metric]):
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics
