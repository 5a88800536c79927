"""Operator routes under /admin (need THUMBTUNE_ADMIN_TOKEN; refused when it is unset)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.auth import require_admin

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


@router.get("/adapters")
def adapters(request: Request) -> dict:
    rt = request.app.state.runtime
    return {"live": rt.adapters.live, "loaded": rt.adapters.versions(), "base_model": rt.model_id,
            "base_fingerprint": rt.fingerprint}
