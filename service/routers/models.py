"""GET /v1/models: the live adapter, every loaded version, and the base."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from service.auth import api_key_id
from service.engine.adapters import BASE
from service.protocol import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
def list_models(request: Request, _: str | None = Depends(api_key_id)) -> ModelList:
    rt = request.app.state.runtime
    now = int(time.time())
    cards = [ModelCard(id="thumbtune", created=now, root=rt.model_id, adapter_version=rt.adapters.live)]
    cards += [
        ModelCard(id=f"thumbtune@{v}", created=now, root=rt.model_id, adapter_version=v)
        for v in rt.adapters.versions()
    ]
    cards.append(ModelCard(id=BASE, created=now, root=rt.model_id, adapter_version=None))
    return ModelList(data=cards)
