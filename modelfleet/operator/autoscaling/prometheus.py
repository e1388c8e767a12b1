"""Reading the queue depth and running requests of one ModelDeployment from Prometheus' HTTP API."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

# Every proxy pod serves the application's merged /metrics page, so a series can be scraped
# more than once: take one value per replica, then sum.
QUEUE_QUERY = 'sum(max by (replica) (modelfleet_queue_depth{{namespace="{ns}",model_deployment="{name}"}}))'
RUNNING_QUERY = (
    'sum(max by (replica) (modelfleet_running_requests{{namespace="{ns}",model_deployment="{name}"}}))'
)


class MetricsUnavailable(Exception):
    """Prometheus did not answer, answered an error, or had no sample."""


@dataclass(frozen=True)
class Load:
    queue: float
    running: float


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
    queue = instant(client, base_url, queue_q)
    if queue is None:
        raise MetricsUnavailable(f"no sample for {queue_q}: is Prometheus scraping the serving pods?")
    running = instant(client, base_url, running_q)
    return Load(queue=queue, running=running or 0.0)
