"""The OpenAI-compatible HTTP API, in either place an application serves it from: the separate
ingress deployment (`ingress.py`, which hands each request to a model replica through Serve)
or each model replica itself (`direct.py`, which runs it on its own engine). Routes, the
API-key check, request validation, errors in OpenAI's shape and server-sent-event framing are
the same in both; only how a checked request reaches an engine differs (`APIServer`).

The routes are built per server object (`build_api`) and handed to Serve as the deployment's
ASGI app when its replica starts (`__serve_build_asgi_app__`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from modelfleet.serving import errors
from modelfleet.serving.errors import APIError
from modelfleet.serving.metrics import CONTENT_TYPE
from modelfleet.serving.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from modelfleet.serving.responses import error_event
from modelfleet.serving.settings import ServeSettings

log = logging.getLogger("modelfleet.serving")


class Stream:
    """An admitted stream: its first chunk, the rest, and how to stop it early (the client
    went away: stop generating and free its KV blocks)."""

    def __init__(self, first: str, rest: AsyncIterator[str], cancel: Callable[[], Awaitable[None]]):
        self.first = first
        self.rest = rest
        self.cancel = cancel


class APIServer:
    """What the routes need of the object serving them. Subclasses set `settings`, `api_key`
    and `created`, and say how a checked request reaches an engine."""

    settings: ServeSettings
    api_key: str | None
    created: int

    async def run_request(self, kind: str, req: Any) -> dict[str, Any]:
        """A whole non-streamed response body."""
        raise NotImplementedError

    async def open_stream(self, kind: str, req: Any) -> Stream:
        """Admit a streamed request; errors before its first chunk are raised, so they keep
        their status code."""
        raise NotImplementedError

    def count(self, status: int) -> None:
        """One API request answered with `status` (499: the client left mid-stream)."""
        raise NotImplementedError

    def check_room(self) -> None:
        """Raise a 429 when the server holds as many waiting requests as it may."""

    async def ready_replicas(self) -> int:
        raise NotImplementedError

    async def metrics_text(self) -> str:
        raise NotImplementedError

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)


async def json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json") from None


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def authorize(api_key: str | None, request: Request) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise errors.unauthorized()


def build_api(server: APIServer) -> FastAPI:
    """The API's routes, bound to `server`."""
    api = FastAPI(title="modelfleet", docs_url=None, redoc_url=None, openapi_url=None)
    settings = server.settings

    def error(err: APIError) -> Response:
        server.count(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

    # -- open routes ---------------------------------------------------------------------

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/ready")
    async def ready() -> Response:
        n = await server.ready_replicas()
        return JSONResponse({"ready": n > 0, "ready_replicas": n}, status_code=200 if n > 0 else 503)

    @api.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(await server.metrics_text(), media_type=CONTENT_TYPE)

    # -- the OpenAI API ------------------------------------------------------------------

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            authorize(server.api_key, request)
        except APIError as err:
            return error(err)
        server.count(200)
        card = {
            "id": settings.served_name,
            "object": "model",
            "created": server.created,
            "owned_by": "modelfleet",
            "root": settings.model,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve_request(request, "completion", CompletionRequest)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve_request(request, "chat", ChatCompletionRequest)

    async def serve_request(request: Request, kind: str, model: type) -> Response:
        try:
            authorize(server.api_key, request)
            req = parse_request(model, await json_body(request))
            if req.model != settings.served_name:
                raise errors.model_not_found(req.model)
            server.check_room()
            if req.stream:
                stream = await server.open_stream(kind, req)
                return StreamingResponse(
                    events(stream),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            body = await server.run_request(kind, req)
        except APIError as err:
            return error(err)
        except Exception as exc:
            log.exception("request failed")
            return error(errors.engine_fault(describe(exc)))
        server.count(200)
        return JSONResponse(body)

    async def events(stream: Stream) -> AsyncIterator[str]:
        status = 499  # unless the stream runs to its end
        try:
            if stream.first:
                yield stream.first
            async for chunk in stream.rest:
                yield chunk
            status = 200
        except APIError as err:
            status = err.status
            yield error_event(err.body())
        except Exception as exc:
            if not isinstance(exc, asyncio.CancelledError):
                status = 500
                log.exception("stream failed")
                yield error_event(errors.engine_fault(describe(exc)).body())
        finally:
            if status == 499:
                await stream.cancel()  # the client went away: stop generating, free the KV blocks
            server.count(status)

    return api
