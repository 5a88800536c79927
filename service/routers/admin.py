"""Operator routes under /admin (need THUMBTUNE_ADMIN_TOKEN; refused when it is unset).

GET  /admin/adapters           versions (store, loaded, live, pinned, refused with reasons, approval so far)
POST /admin/adapters/pin       {"version": "v7"}: make v7 live and stay on it
POST /admin/adapters/unpin     follow the newest good version again
POST /admin/adapters/rollback  back to the newest good version below the live one, pinned

Each POST answers with the same body as GET. Unknown versions are 404; a refused version, or
nothing to roll back to, is 409.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from service.adapter_manager import AdapterManager, EngineUnavailable, UnknownVersion, VersionConflict
from service.auth import require_admin
from service.errors import APIError

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=2, max_length=32, description="An adapter version, e.g. 'v7'.")


def _manager(request: Request) -> AdapterManager:
    manager = request.app.state.runtime.adapter_manager
    if manager is None:
        raise APIError(503, "this server has no adapter manager", code="adapters_unavailable")
    return manager


def _describe(request: Request) -> dict:
    rt = request.app.state.runtime
    body = _manager(request).describe()
    body |= {
        "base_model": rt.model_id,
        "base_fingerprint": rt.fingerprint,
        "follower": rt.follower.state() if rt.follower is not None else None,
    }
    return body


def _act(request: Request, action: Callable[[AdapterManager], object]) -> dict:
    try:
        action(_manager(request))
    except UnknownVersion as exc:
        raise APIError(404, str(exc), param="version", code="version_not_found") from exc
    except VersionConflict as exc:
        raise APIError(409, str(exc), code="version_refused") from exc
    except (EngineUnavailable, TimeoutError) as exc:
        raise APIError(
            503, f"the engine could not load the version now: {exc}; try again", code="unavailable"
        ) from exc
    return _describe(request)


@router.get("/adapters")
def adapters(request: Request) -> dict:
    return _describe(request)


@router.post("/adapters/pin")
def pin(body: PinRequest, request: Request) -> dict:
    return _act(request, lambda m: m.pin(body.version))


@router.post("/adapters/unpin")
def unpin(request: Request) -> dict:
    return _act(request, lambda m: m.unpin())


@router.post("/adapters/rollback")
def rollback(request: Request) -> dict:
    return _act(request, lambda m: m.rollback())
