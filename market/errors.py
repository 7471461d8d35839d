"""Typed API errors and the ONE place that turns them into OpenAI's error JSON.

Body: ``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` with the
matching HTTP status, so the ``openai`` SDK raises its usual exception classes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("market.errors")


class APIError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class BadRequest(APIError):
    status_code = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidBody(APIError):
    """A field of the body has a value it cannot take: 400, as OpenAI answers."""

    status_code = 400
    type = "invalid_request_error"
    code = "invalid_value"


class AuthenticationFailed(APIError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(APIError):
    status_code = 403
    type = "invalid_request_error"
    code = "forbidden"


class InsufficientBalance(APIError):
    status_code = 402
    type = "insufficient_quota"
    code = "insufficient_balance"


class NotFound(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(APIError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(APIError):
    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"


class NoHealthyNode(APIError):
    status_code = 503
    type = "service_unavailable"
    code = "no_healthy_node"


class UpstreamFailed(APIError):
    """Every node tried failed; the request may be retried."""

    status_code = 503
    type = "service_unavailable"
    code = "upstream_failed"


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# pydantic error types that name a parameter the market does not take (raised by
# market.api.parameters, or by a body that forbids extra fields)
_PARAMETER_ERRORS = {"unknown_parameter", "unsupported_parameter", "unsupported_content",
                     "extra_forbidden"}


def validation_error(errors: Sequence[Any]) -> APIError:
    """OpenAI's 400 for a body that failed validation: ``param`` names the first field
    at fault and ``code`` says how (``missing_required_parameter``, ``invalid_value``,
    ``unknown_parameter``, ``unsupported_parameter``)."""
    first = errors[0] if errors else {}
    kind = first.get("type")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        return BadRequest(f"request body is not valid JSON: {first.get('msg')}")
    if kind in _PARAMETER_ERRORS:
        param = (first.get("ctx") or {}).get("param") or ".".join(loc) or None
        if kind == "extra_forbidden":
            return BadRequest(f"Unrecognized request argument supplied: {param}",
                              param=param, code="unknown_parameter")
        return BadRequest(str(first.get("msg")), param=param, code=kind)
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
        f"{e.get('msg')}"
        for e in errors[:5]
    )
    code = "missing_required_parameter" if kind == "missing" else "invalid_value"
    return InvalidBody(message or "invalid request body", param=".".join(loc) or None,
                       code=code)


def _count(request: Request, status: int) -> None:
    """Count an error response in the app's request metrics (when the app has them)."""
    from market.metrics import endpoint_label

    state = getattr(request.app.state, "market", None)
    if state is not None and request.scope.get("type") == "http":
        state.metrics.requests.labels(endpoint_label(request.scope), str(status)).inc()


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _count(request, exc.status_code)
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc.errors())
        _count(request, err.status_code)
        return JSONResponse(err.body(), status_code=err.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        _count(request, exc.status_code)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            error_body(str(exc.detail), type_, None, getattr(exc, "code", None)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        _count(request, 500)
        return JSONResponse(
            error_body("internal server error", "server_error", None, "internal_error"),
            status_code=500,
        )
