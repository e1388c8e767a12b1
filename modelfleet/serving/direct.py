"""The model replica that serves the OpenAI API itself (`ServeSettings.ingress == "replica"`,
the default of `modelfleet serve`): HTTP reaches the replica that runs the engine, with no
ingress deployment and no call through Serve between the two.

What that saves: a request's trip from the ingress to a replica and the ingress' own CPU per
request and per chunk, which on a machine where the engine shares the CPU with the serving
path is most of the serving overhead (benchmarks/RESULTS.md, "Serving").

What it gives up, which is why the operator keeps the separate ingress: nothing holds a request
while no replica is ready (so no scaling from zero), and a replica's backlog stays with it
rather than going to whichever replica frees a slot first. Each replica bounds its own queue:
it takes a request while its waiting requests fit in its free sequence slots plus
`max_queue_depth`, and answers 429 beyond that. With more than one replica, HTTP is spread
over them by Serve's proxy (HAProxy's `leastconn`, or Serve's router).
"""

from __future__ import annotations

import time
from typing import Any

from ray import serve

from modelfleet.serving.api import APIServer, Stream
from modelfleet.serving.replica import ModelReplica
from modelfleet.serving.settings import ServeSettings


@serve.ingress()
class DirectModelReplica(ModelReplica, APIServer):
    async def __init__(self, settings: dict[str, Any], hub: Any):
        # A missing key fails the replica before it spends minutes loading the model.
        self.api_key = ServeSettings.from_dict(settings).resolve_api_key()
        self.created = int(time.time())
        await ModelReplica.__init__(self, settings, hub)
        self.metrics.count_requests()

    def queue_limit(self) -> int:
        return self.settings.max_queue_depth

    async def run_request(self, kind: str, req: Any) -> dict[str, Any]:
        return await self.complete(kind, req)

    async def open_stream(self, kind: str, req: Any) -> Stream:
        gen = self.stream(kind, req)
        try:
            first = await anext(gen)  # admission: its errors keep their status code
        except BaseException:
            await gen.aclose()
            raise
        return Stream(first, gen, gen.aclose)

    def count(self, status: int) -> None:
        self.metrics.count(status)

    async def ready_replicas(self) -> int:
        return await self._hub.ready_replicas.remote()

    async def metrics_text(self) -> str:
        return await self._hub.render.remote()
