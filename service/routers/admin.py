"""Operator routes under /admin (need THUMBTUNE_ADMIN_TOKEN; refused when it is unset).

GET  /admin/adapters           versions (store, loaded, live, pinned, refused with reasons, approval so far)
POST /admin/adapters/pin       {"version": "v7"}: make v7 live and stay on it
POST /admin/adapters/unpin     follow the newest good version again
POST /admin/adapters/rollback  back to the newest good version below the live one, pinned

Each POST answers with the same body as GET (`AdaptersView`). Unknown versions are 404; a refused
version, or nothing to roll back to, is 409.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends

from service.adapters.manager import AdapterManager, EngineUnavailable, UnknownVersion, VersionConflict
from service.auth import require_admin
from service.dependencies import get_adapter_manager, get_runtime
from service.errors import APIError
from service.protocol import AdaptersView, PinRequest
from service.runtime import Runtime

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def _view(rt: Runtime, manager: AdapterManager) -> AdaptersView:
    return manager.describe(follower=rt.follower.state() if rt.follower is not None else None)


def _act(rt: Runtime, manager: AdapterManager, action: Callable[[AdapterManager], object]) -> AdaptersView:
    try:
        action(manager)
    except UnknownVersion as exc:
        raise APIError(404, str(exc), param="version", code="version_not_found") from exc
    except VersionConflict as exc:
        raise APIError(409, str(exc), code="version_refused") from exc
    except (EngineUnavailable, TimeoutError) as exc:
        raise APIError(
            503, f"the engine could not load the version now: {exc}; try again", code="unavailable"
        ) from exc
    return _view(rt, manager)


@router.get("/adapters", response_model=AdaptersView)
def adapters(
    rt: Runtime = Depends(get_runtime), manager: AdapterManager = Depends(get_adapter_manager)
) -> AdaptersView:
    return _view(rt, manager)


@router.post("/adapters/pin", response_model=AdaptersView)
def pin(
    body: PinRequest,
    rt: Runtime = Depends(get_runtime),
    manager: AdapterManager = Depends(get_adapter_manager),
) -> AdaptersView:
    return _act(rt, manager, lambda m: m.pin(body.version))


@router.post("/adapters/unpin", response_model=AdaptersView)
def unpin(
    rt: Runtime = Depends(get_runtime), manager: AdapterManager = Depends(get_adapter_manager)
) -> AdaptersView:
    return _act(rt, manager, lambda m: m.unpin())


@router.post("/adapters/rollback", response_model=AdaptersView)
def rollback(
    rt: Runtime = Depends(get_runtime), manager: AdapterManager = Depends(get_adapter_manager)
) -> AdaptersView:
    return _act(rt, manager, lambda m: m.rollback())
