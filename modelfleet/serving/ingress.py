"""The HTTP ingress: OpenAI routes, API-key check, request validation, errors in OpenAI's
shape, and server-sent-event framing. It holds no model; the replica does the work."""

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from modelfleet.serving import errors
from modelfleet.serving.errors import APIError
from modelfleet.serving.metrics import CONTENT_TYPE, IngressMetrics
from modelfleet.serving.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from modelfleet.serving.responses import error_event
from modelfleet.serving.settings import ServeSettings

log = logging.getLogger("modelfleet.serving")

api = FastAPI(title="modelfleet", docs_url=None, redoc_url=None, openapi_url=None)

PUSH_INTERVAL_S = 1.0
READY_CHECK_S = 0.5


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json") from None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


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


@serve.ingress(api)
class OpenAIIngress:
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

    # -- open routes -------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self) -> Response:
        n = await self.hub.ready_replicas.remote()
        status = 200 if n > 0 else 503
        return JSONResponse({"ready": n > 0, "ready_replicas": n}, status_code=status)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return PlainTextResponse(await self.hub.render.remote(), media_type=CONTENT_TYPE)

    # -- the OpenAI API ------------------------------------------------------------------

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except APIError as err:
            return self._error(err)
        self.metrics.count(200)
        card = {
            "id": self.settings.served_name,
            "object": "model",
            "created": self.created,
            "owned_by": "modelfleet",
            "root": self.settings.model,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "completion", CompletionRequest)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, "chat", ChatCompletionRequest)

    # -- helpers -----------------------------------------------------------------------

    async def _serve(self, request: Request, kind: str, model: type) -> Response:
        try:
            self._authorize(request)
            req = parse_request(model, await _json_body(request))
            if req.model != self.settings.served_name:
                raise errors.model_not_found(req.model)
            self._check_room()
            if req.stream:
                return await self._stream(kind, req)
            response = self.model.complete.remote(kind, req)
            await self._taken(response)
            try:
                body = await response
            except BaseException:
                response.cancel()  # the client went away: free the replica's slot
                raise
        except APIError as err:
            return self._error(err)
        except Exception as exc:
            log.exception("request failed")
            return self._error(errors.engine_fault(_describe(exc)))
        self.metrics.count(200)
        return JSONResponse(body)

    async def _stream(self, kind: str, req: Any) -> Response:
        gen = self.model_stream.stream.remote(kind, req)
        await self._taken(gen)
        try:
            # Admission: errors still get their status code.
            first = await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise
        return StreamingResponse(
            self._events(gen, first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(self, gen: Any, first: str) -> AsyncIterator[str]:
        status = 499  # unless the stream runs to its end
        try:
            if first:
                yield first
            async for chunk in gen:
                yield chunk
            status = 200
        except APIError as err:
            status = err.status
            yield error_event(err.body())
        except Exception as exc:
            if not isinstance(exc, asyncio.CancelledError):
                status = 500
                log.exception("stream failed")
                yield error_event(errors.engine_fault(_describe(exc)).body())
        finally:
            if status == 499:
                gen.cancel()  # the client went away: stop generating, free the KV blocks
            self.metrics.count(status)

    def _check_room(self) -> None:
        """429 once the requests no replica has taken reach `max_queue_depth` per ready replica
        (none ready counts as one): the deployment's queue is bounded, not each replica's."""
        limit = self.settings.max_queue_depth * max(1, self._ready)
        if self.metrics.held >= limit:
            raise errors.queue_full(self.metrics.held)

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

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise errors.unauthorized()

    def _error(self, err: APIError) -> Response:
        self.metrics.count(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

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
