"""ASGI middleware: request body cap (413) and per-route request metrics."""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import error_body


class BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Refuses bodies over `max_body_bytes` (by Content-Length or while streaming) and counts requests."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large(send)
            self._observe(scope, 413, start)
            return
        seen = 0

        async def guarded_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except BodyTooLarge:
            status["code"] = 413
            await self._too_large(send)
        self._observe(scope, status["code"], start)

    async def _too_large(self, send: Send) -> None:
        body = json.dumps(
            error_body(413, f"request body exceeds {self.max_body_bytes} bytes", code="request_too_large")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _observe(scope: Scope, status: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        metrics.REQUESTS.labels(path, scope.get("method", ""), str(status)).inc()
        metrics.REQUEST_LATENCY.labels(path).observe(time.perf_counter() - start)
