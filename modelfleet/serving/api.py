"""The OpenAI-compatible HTTP API, in either place an application serves it from: the separate
ingress deployment (`ingress.py`, which hands each request to a model replica through Serve)
or each model replica itself (`direct.py`, which runs it on its own engine). Routes, the
API-key check, request validation, errors in OpenAI's shape and server-sent-event framing are
the same in both; only how a checked request reaches an engine differs (`APIServer`).

The routes are built per server object (`build_api`) and handed to Serve as the deployment's
ASGI app when its replica starts (`__serve_build_asgi_app__`). The two generation routes, which
carry nearly every request, are plain ASGI (`OpenAIApp`): a web framework's layers (routing,
middleware, a response class that runs each stream in a task group) cost every request and
every streamed chunk a little, and all of it runs on the loop that also feeds the engine. The
other routes are FastAPI's.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from modelfleet.serving import errors
from modelfleet.serving.errors import APIError
from modelfleet.serving.metrics import CONTENT_TYPE
from modelfleet.serving.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from modelfleet.serving.responses import DONE, error_event
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

    def __serve_build_asgi_app__(self) -> OpenAIApp:
        return build_api(self)


def _decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json") from None


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def authorize(api_key: str | None, header: str) -> None:
    """`header`: the request's Authorization header ("" when it has none)."""
    if api_key is None:
        return
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise errors.unauthorized()


def build_api(server: APIServer) -> OpenAIApp:
    """The API's routes, bound to `server`."""
    api = FastAPI(title="modelfleet", docs_url=None, redoc_url=None, openapi_url=None)
    settings = server.settings

    def error_response(err: APIError) -> Response:
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
            authorize(server.api_key, request.headers.get("authorization", ""))
        except APIError as err:
            return error_response(err)
        server.count(200)
        card = {
            "id": settings.served_name,
            "object": "model",
            "created": server.created,
            "owned_by": "modelfleet",
            "root": settings.model,
        }
        return JSONResponse({"object": "list", "data": [card]})

    return OpenAIApp(server, api, error_response)


GENERATION_ROUTES = {
    "/v1/completions": ("completion", CompletionRequest),
    "/v1/chat/completions": ("chat", ChatCompletionRequest),
}
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _json(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class OpenAIApp:
    """The API as one ASGI app: POSTs to the generation routes are served here, everything else
    by `rest` (FastAPI)."""

    def __init__(self, server: APIServer, rest: FastAPI, error_response: Callable[[APIError], Response]):
        self.server = server
        self.rest = rest
        self.error_response = error_response
        # What Serve reads to name each request's route in its access log and metrics.
        self.routes = [*rest.routes, *(Route(path, self, methods=["POST"]) for path in GENERATION_ROUTES)]
        self.router = rest.router

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        route = GENERATION_ROUTES.get(_route_path(scope)) if scope["type"] == "http" else None
        if route is None:
            await self.rest(scope, receive, send)
            return
        if scope["method"] != "POST":
            err = errors.APIError(405, f"Use POST for {_route_path(scope)}.", code="method_not_allowed")
            await self.error_response(err)(scope, receive, send)
            return
        server = self.server
        try:
            authorize(server.api_key, _header(scope, b"authorization"))
            body = await _read_body(receive)
            if body is None:  # the client left before its request was whole
                return
            req = parse_request(route[1], _decode_json(body))
            if req.model != server.settings.served_name:
                raise errors.model_not_found(req.model)
            server.check_room()
            if req.stream:
                stream = await server.open_stream(route[0], req)
            else:
                result = await server.run_request(route[0], req)
        except APIError as err:
            await self.error_response(err)(scope, receive, send)
            return
        except Exception as exc:
            log.exception("request failed")
            await self.error_response(errors.engine_fault(describe(exc)))(scope, receive, send)
            return
        if not req.stream:
            server.count(200)
            payload = _json(result)
            length = str(len(payload)).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", length)]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        await self._stream(stream, receive, send)

    async def _stream(self, stream: Stream, receive: Callable, send: Callable) -> None:
        """Send the stream's events as they come. A client that goes away stops it: its
        generation ends and its KV blocks are freed, whenever it leaves (the cleanup is here,
        so it runs even if the writing never started)."""
        server = self.server
        status = 499  # unless the stream runs to its end

        ended = False  # the body's end went out with the stream's last event

        async def put(chunk: str) -> None:
            # The event that ends the stream ([DONE]) also ends the body: one send, one write.
            nonlocal ended
            last = chunk.endswith(DONE)
            await send(_event(chunk, more=not last))
            ended = last

        async def write() -> None:
            nonlocal status
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            try:
                if stream.first:
                    await put(stream.first)
                async for chunk in stream.rest:
                    await put(chunk)
                status = 200
            except APIError as err:
                status = err.status
                if not ended:
                    await put(error_event(err.body()))
            except Exception as exc:
                status = 500
                log.exception("stream failed")
                if not ended:
                    await put(error_event(errors.engine_fault(describe(exc)).body()))
            if not ended:
                await send({"type": "http.response.body", "body": b""})

        async def left() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        writing = asyncio.ensure_future(write())
        watching = asyncio.ensure_future(left())
        try:
            await asyncio.wait((writing, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            writing.cancel()  # a no-op once it is done
            (failed,) = await asyncio.gather(writing, return_exceptions=True)
            if isinstance(failed, Exception):  # sending to the client failed: it is gone
                log.warning("stream to the client failed: %s", describe(failed))
            if status == 499:
                await stream.cancel()
            server.count(status)


def _event(chunk: str, more: bool = True) -> dict:
    return {"type": "http.response.body", "body": chunk.encode(), "more_body": more}


def _route_path(scope: dict) -> str:
    """The path below the application's mount point (Serve's route prefix is the root path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


async def _read_body(receive: Callable) -> bytes | None:
    parts = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        parts.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(parts)
