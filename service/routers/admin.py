"""Operator routes under /admin (need THUMBTUNE_ADMIN_TOKEN; refused when it is unset).

GET  /admin/adapters           versions (store, loaded, live, pinned, refused with reasons, approval so far)
POST /admin/adapters/pin       {"version": "v7"}: make v7 live and stay on it
POST /admin/adapters/unpin     follow the newest good version again
POST /admin/adapters/rollback  back to the newest good version below the live one, pinned
POST /admin/adapters/refuse    {"version": "v7", "reason": "..."}: v7 never serves again
POST /admin/adapters/promote   the canary goes live now, whatever the judge says

With a control plane (THUMBTUNE_ADAPTER_FOLLOW, the default) each POST is a decision on
thumbtune.control that every replica applies: it answers once this replica has applied it, with
`decision` saying which other replicas confirmed it (service/adapters/control.py); while the log
is unreachable it answers 503 and nothing is decided. Without one it acts on this replica alone.

Each POST answers with the same body as GET (`AdaptersView`). Unknown versions are 404; a refused
version, or nothing to roll back to, is 409.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from service.adapters import decisions
from service.adapters.admission import EngineUnavailable
from service.adapters.control import ControlUnavailable
from service.adapters.manager import AdapterManager, UnknownVersion, VersionConflict
from service.adapters.view import describe
from service.auth import require_admin
from service.dependencies import get_adapter_manager, get_runtime
from service.errors import APIError, documented
from service.protocol_admin import AdaptersView, DecisionView, PinRequest, RefuseRequest
from service.runtime import Runtime
from thumbtune.core.contract import ControlAction, ControlRecord

router = APIRouter(
    prefix="/admin",
    dependencies=[Depends(require_admin)],
    responses=documented(400, 401, 403, 404, 409, 413, 503),
)


def _view(rt: Runtime, manager: AdapterManager, decision: DecisionView | None = None) -> AdaptersView:
    return describe(
        manager,
        follower=rt.follower.state() if rt.follower is not None else None,
        control=rt.control.state() if rt.control is not None else None,
        decision=decision,
        tallies=rt.tallies,
    )


def _act(
    rt: Runtime,
    manager: AdapterManager,
    action: ControlAction,
    version: str | None = None,
    reason: str | None = None,
) -> AdaptersView:
    decision = None
    try:
        if rt.control is not None:
            decision = rt.control.submit(action, version, reason)
        else:
            local = ControlRecord(
                record_id="local",
                action=action,
                version=decisions.plan(manager, action, version),
                reason=reason,
                actor="admin",
                replica="local",
                issued_at=time.time(),
            )
            decisions.apply(manager, local)
    except UnknownVersion as exc:
        raise APIError(404, str(exc), param="version", code="version_not_found") from exc
    except VersionConflict as exc:
        raise APIError(409, str(exc), code="version_refused") from exc
    except ControlUnavailable as exc:
        raise APIError(503, str(exc), code="control_unavailable") from exc
    except (EngineUnavailable, TimeoutError) as exc:
        raise APIError(
            503, f"the engine could not load the version now: {exc}; try again", code="unavailable"
        ) from exc
    return _view(rt, manager, decision)


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
    return _act(rt, manager, ControlAction.pin, body.version)


@router.post("/adapters/unpin", response_model=AdaptersView)
def unpin(
    rt: Runtime = Depends(get_runtime), manager: AdapterManager = Depends(get_adapter_manager)
) -> AdaptersView:
    return _act(rt, manager, ControlAction.unpin)


@router.post("/adapters/rollback", response_model=AdaptersView)
def rollback(
    rt: Runtime = Depends(get_runtime), manager: AdapterManager = Depends(get_adapter_manager)
) -> AdaptersView:
    return _act(rt, manager, ControlAction.rollback)


@router.post("/adapters/promote", response_model=AdaptersView)
def promote(
    rt: Runtime = Depends(get_runtime), manager: AdapterManager = Depends(get_adapter_manager)
) -> AdaptersView:
    return _act(rt, manager, ControlAction.promote, reason="promoted by an operator")


@router.post("/adapters/refuse", response_model=AdaptersView)
def refuse(
    body: RefuseRequest,
    rt: Runtime = Depends(get_runtime),
    manager: AdapterManager = Depends(get_adapter_manager),
) -> AdaptersView:
    return _act(rt, manager, ControlAction.refuse, body.version, body.reason)
