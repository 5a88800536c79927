"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.dependencies import get_runtime_or_none
from service.protocol_admin import Health, Readiness
from service.runtime import Runtime

router = APIRouter()


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(rt: Runtime | None = Depends(get_runtime_or_none)) -> JSONResponse:
    """Ready when the model is loaded, the completion store answers (a rating needs the answer it rates),
    and feedback can be taken: the broker reachable, or spooling with room."""
    if rt is None:
        return JSONResponse(Readiness(status="starting").model_dump(exclude_none=True), status_code=503)
    depth = rt.publisher.depth()
    checks = Readiness(
        status="not ready",
        model=rt.engine.alive,
        store=rt.store.ping(),
        broker=rt.publisher.broker_up,
        spool_depth=depth,
        spool_has_room=depth < rt.settings.spool_max_events,
        adapter_version=rt.adapters.live,
    )
    ready = checks.model and checks.store and (checks.broker or checks.spool_has_room)
    if ready:
        checks.status = "ready"
    return JSONResponse(checks.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus' text exposition format."}},
)
def prometheus_metrics() -> Response:
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
