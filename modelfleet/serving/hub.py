"""The MetricsHub deployment: one small actor per application that holds every replica's
and ingress's latest metrics, so any ingress can serve the whole application's page.

Its methods are coroutines, so Serve runs them one at a time on the actor's event loop:
a synchronous method would run on a thread pool, where a render iterating the sources
races a push adding one ("dictionary changed size during iteration": a failed scrape)."""

from __future__ import annotations

from modelfleet.serving.metrics import MetricsStore


class MetricsHub:
    def __init__(self, name: str, namespace: str):
        self.store = MetricsStore(name, namespace)

    async def push(self, source: str, kind: str, text: str) -> None:
        self.store.push(source, kind, text)

    async def drop(self, source: str) -> None:
        self.store.drop(source)

    async def render(self) -> str:
        return self.store.render()

    async def ready_replicas(self) -> int:
        return self.store.ready_replicas()
