"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """Ready when the model is loaded and feedback can be taken: broker reachable, or spooling with room."""
    rt = getattr(request.app.state, "runtime", None)
    if rt is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    checks = {
        "model": rt.engine.alive,
        "broker": rt.publisher.broker_up,
        "spool_depth": rt.publisher.depth(),
        "spool_has_room": rt.publisher.depth() < rt.settings.spool_max_events,
        "adapter_version": rt.adapters.live,
    }
    ready = checks["model"] and (checks["broker"] or checks["spool_has_room"])
    return JSONResponse(
        {"status": "ready" if ready else "not ready", **checks}, status_code=200 if ready else 503
    )


@router.get("/metrics")
def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
