"""The MetricsHub deployment: one small actor per application that holds every replica's
and ingress's latest metrics, so any ingress can serve the whole application's page."""

from __future__ import annotations

from modelfleet.serving.metrics import MetricsStore


class MetricsHub:
    def __init__(self, name: str, namespace: str):
        self.store = MetricsStore(name, namespace)

    def push(self, source: str, kind: str, text: str) -> None:
        self.store.push(source, kind, text)

    def drop(self, source: str) -> None:
        self.store.drop(source)

    def render(self) -> str:
        return self.store.render()

    def ready_replicas(self) -> int:
        return self.store.ready_replicas()
