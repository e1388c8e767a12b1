"""Reading the queue depth and running requests of one ModelDeployment from Prometheus' HTTP API.

With no model replica there is no replica queue series at all: the ingress' held requests
(`modelfleet_ingress_waiting_requests`) are then the only signal, and the one that scales
from zero."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

# Every proxy pod serves the application's merged /metrics page, so a series can be scraped
# more than once: take one value per replica, then sum.
QUEUE_QUERY = 'sum(max by (replica) (modelfleet_queue_depth{{namespace="{ns}",model_deployment="{name}"}}))'
RUNNING_QUERY = (
    'sum(max by (replica) (modelfleet_running_requests{{namespace="{ns}",model_deployment="{name}"}}))'
)

HELD_QUERY = (
    "sum(max by (replica) "
    '(modelfleet_ingress_waiting_requests{{namespace="{ns}",model_deployment="{name}"}}))'
)


class MetricsUnavailable(Exception):
    """Prometheus did not answer, answered an error, or had no sample."""


@dataclass(frozen=True)
class Load:
    queue: float  # waiting in model replicas
    running: float
    held: float = 0.0  # at the ingress with no first byte yet (all of them while no replica is ready)


def queries(namespace: str, name: str, queue_query: str | None = None) -> tuple[str, str]:
    queue = queue_query or QUEUE_QUERY.format(ns=namespace, name=name)
    return queue, RUNNING_QUERY.format(ns=namespace, name=name)


def instant(client: httpx.Client, base_url: str, query: str) -> float | None:
    """The value of an instant query; None when it returns no sample."""
    try:
        resp = client.get(f"{base_url.rstrip('/')}/api/v1/query", params={"query": query})
    except httpx.HTTPError as err:
        raise MetricsUnavailable(
            f"Prometheus at {base_url} did not answer: {type(err).__name__}: {err}"
        ) from None
    if resp.status_code != 200:
        raise MetricsUnavailable(f"Prometheus answered {resp.status_code}: {resp.text[:200]}")
    body = resp.json()
    if body.get("status") != "success":
        raise MetricsUnavailable(f"Prometheus query failed: {body.get('error', body)}")
    result = body["data"]["result"]
    if not result:
        return None
    return float(result[0]["value"][1])


def read_load(
    client: httpx.Client, base_url: str, namespace: str, name: str, queue_query: str | None = None
) -> Load:
    queue_q, running_q = queries(namespace, name, queue_query)
    held_q = HELD_QUERY.format(ns=namespace, name=name)
    queue = instant(client, base_url, queue_q)
    # A replica reporting its queue is serving, and then its queue is the signal: the held
    # requests are asked for only when no replica reports (scaled to zero, or all loading).
    held = instant(client, base_url, held_q) if queue is None else None
    if queue is None and held is None:
        raise MetricsUnavailable(
            f"no sample for {queue_q} nor {held_q}: is Prometheus scraping the serving pods?"
        )
    running = instant(client, base_url, running_q) if queue is not None else None
    return Load(queue=queue or 0.0, running=running or 0.0, held=held or 0.0)
