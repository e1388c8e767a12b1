"""The separate HTTP ingress: serves the OpenAI API (`api.py`) and hands each checked request to
a model replica through Serve. It holds no model. It holds the requests no replica has room
for yet: they count in the queue-depth metric (the autoscaler's signal, from zero replicas
too), the deployment's queue is bounded (429), and past the cold-start timeout with no
replica ready a request gets a 503."""

import asyncio
import logging
import time
import uuid
from typing import Any

from ray import serve

from modelfleet.serving import errors
from modelfleet.serving.api import APIServer, Stream
from modelfleet.serving.metrics import IngressMetrics
from modelfleet.serving.settings import ServeSettings

log = logging.getLogger("modelfleet.serving")

PUSH_INTERVAL_S = 1.0
READY_CHECK_S = 0.5


async def _assigned(response: Any) -> None:
    """Until Serve's router has handed `response`'s call to a replica that took it.

    The handle's future for it is not public API. Where a Ray version lacks it, calls show as
    held for no time, so a backlog in the router is invisible to the autoscaler: said once."""
    global _warned_unassigned
    fetch = getattr(response, "_fetch_future_result_async", None)
    if fetch is not None:
        await fetch()
    elif not _warned_unassigned:
        _warned_unassigned = True
        log.warning("this Ray Serve has no assignment future: requests in its router are not counted")


_warned_unassigned = False


@serve.ingress()
class OpenAIIngress(APIServer):
    async def __init__(self, settings: dict[str, Any], model: Any, hub: Any):
        self.settings = ServeSettings.from_dict(settings)
        self.api_key = self.settings.resolve_api_key()
        # Calls to the model replicas go over Serve's gRPC channel, whatever the process that
        # built the application had set (a handle carries its creator's default).
        self.model = model.options(_by_reference=False)
        self.model_stream = model.options(stream=True, _by_reference=False)
        self.hub = hub
        self.created = int(time.time())
        try:
            self.source = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.source = uuid.uuid4().hex[:8]
        self.metrics = IngressMetrics(self.settings.name, self.settings.namespace, self.source)
        self._ready = 0  # model replicas loaded, as the hub last said
        self._pusher = asyncio.create_task(self._push_metrics())

    # -- APIServer -----------------------------------------------------------------------

    async def run_request(self, kind: str, req: Any) -> dict[str, Any]:
        response = self.model.complete.remote(kind, req)
        await self._taken(response)
        try:
            return await response
        except BaseException:
            response.cancel()  # the client went away: free the replica's slot
            raise

    async def open_stream(self, kind: str, req: Any) -> Stream:
        gen = self.model_stream.stream.remote(kind, req)
        await self._taken(gen)
        try:
            # Admission: errors still get their status code.
            first = await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise

        async def cancel() -> None:
            gen.cancel()

        return Stream(first, gen, cancel)

    def count(self, status: int) -> None:
        self.metrics.count(status)

    def check_room(self) -> None:
        """429 once the requests no replica has taken reach `max_queue_depth` per ready replica
        (none ready counts as one): the deployment's queue is bounded, not each replica's."""
        limit = self.settings.max_queue_depth * max(1, self._ready)
        if self.metrics.held >= limit:
            raise errors.queue_full(self.metrics.held)

    async def ready_replicas(self) -> int:
        return await self.hub.ready_replicas.remote()

    async def metrics_text(self) -> str:
        return await self.hub.render.remote()

    # -- holding a request until a replica takes it --------------------------------------

    async def _taken(self, response: Any) -> None:
        """Wait until a model replica has taken the call, counting it as held meanwhile.

        Serve's router keeps a call until some replica has room (none may be ready: scaled to
        zero, or all loading). Held calls are in `modelfleet_queue_depth` (the ingress'
        series) and `modelfleet_ingress_waiting_requests`, the autoscaler's signal, from zero
        too; past the cold-start timeout with no replica ready the call gets a 503.
        """
        self.metrics.hold()
        t0 = time.perf_counter()
        try:
            await self._no_replica_timeout(_assigned(response))
            self.metrics.wait.observe(time.perf_counter() - t0)
        except BaseException:
            response.cancel()
            raise
        finally:
            self.metrics.release()

    async def _no_replica_timeout(self, pending: Any) -> Any:
        """Await `pending`; give up with a 503 once no replica has been ready for the
        cold-start timeout."""
        task = asyncio.ensure_future(pending)
        unready_since: float | None = None
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=READY_CHECK_S)
                if done:
                    return task.result()
                if self._ready > 0:
                    unready_since = None
                    continue
                now = time.monotonic()
                unready_since = now if unready_since is None else unready_since
                if now - unready_since >= self.settings.cold_start_timeout_s:
                    raise errors.no_replica(self.settings.cold_start_timeout_s)
        finally:
            if not task.done():
                task.cancel()

    async def _push_metrics(self) -> None:
        while True:
            try:
                await self.hub.push.remote(self.source, "ingress", self.metrics.text())
                self._ready = await self.hub.ready_replicas.remote()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("metrics push failed", exc_info=True)
            await asyncio.sleep(PUSH_INTERVAL_S)
