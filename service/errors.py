"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}. Never a bare 500."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.protocol import ErrorResponse

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


STATUSES = {
    400: "Invalid request: a field outside its declared limits, or a limit of this server's settings "
    "(code says which).",
    401: "Missing or wrong bearer token.",
    403: "Forbidden: the admin routes are disabled on this server.",
    404: "Unknown model, answer or version.",
    409: "Conflicts with what is already decided (an answer already rated, a refused version).",
    413: "Request body over THUMBTUNE_MAX_BODY_BYTES, or a rating too large for the feedback topic.",
    429: "Over this client's rate limit: retry after Retry-After seconds.",
    503: "Not available now (starting, stopping, feedback backlog, control log unreachable): retry later.",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that answers these errors, all in `ErrorResponse`'s shape; and
    ``default`` for any other (a 500), which also keeps FastAPI from documenting a 422 it never sends."""
    return {
        **{s: {"model": ErrorResponse, "description": STATUSES[s]} for s in statuses},
        "default": {"model": ErrorResponse, "description": "Any other error, in the same shape."},
    }


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    # the field's path only: no "body", and none of pydantic's tags for the branch of a union that failed
    # ('function-after[...]', 'list[...]', 'constrained-str'), which are not field names
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and (isinstance(p, int) or p.isidentifier())]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    return (f"{param}: {msg}" if param else msg), param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(
            500, "internal server error; the server log has the details", code="internal_error"
        )
