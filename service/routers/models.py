"""GET /v1/models: the live adapter, every loaded version, and the base (service/serving_models.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.auth import api_key_id
from service.dependencies import get_models
from service.errors import documented
from service.protocol import ModelList
from service.serving_models import ServingModels

router = APIRouter()


@router.get(
    "/v1/models", response_model=ModelList, dependencies=[Depends(api_key_id)], responses=documented(401, 413)
)
def list_models(models: ServingModels = Depends(get_models)) -> ModelList:
    return models.list()
