"""Errors in OpenAI's shape. One exception type crosses the Ray boundary from the
replica to the ingress, which turns it into `{"error": {message, type, param, code}}`."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error the client should see, with the HTTP status it maps to."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(status, message, type, param, code, retry_after)
        self.status = status
        self.message = message
        self.type = type or _default_type(status)
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields survive pickling across the Ray object store.
        return (
            _rebuild,
            (self.status, self.message, self.type, self.param, self.code, self.retry_after),
        )

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def _rebuild(
    status: int, message: str, type: str, param: str | None, code: str | None, retry_after: int | None
) -> APIError:
    return APIError(status, message, type=type, param=param, code=code, retry_after=retry_after)


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def queue_full(depth: int, retry_after: int = 1) -> APIError:
    return APIError(
        429,
        f"The server is busy: {depth} requests are already waiting on this replica. Retry later.",
        code="queue_full",
        retry_after=retry_after,
    )


def unauthorized() -> APIError:
    return APIError(
        401,
        "Missing or incorrect API key. Send `Authorization: Bearer <key>`.",
        code="invalid_api_key",
    )


def engine_fault(detail: str) -> APIError:
    return APIError(500, f"The engine failed: {detail}", code="engine_error")


def no_replica(waited_s: float, retry_after: int = 10) -> APIError:
    return APIError(
        503,
        f"No model replica became ready within {waited_s:g}s (scaled to zero, or still loading). "
        "Retry later.",
        code="no_replica_ready",
        retry_after=retry_after,
    )


def not_ready() -> APIError:
    return APIError(503, "The model is still loading.", code="not_ready", retry_after=5)
