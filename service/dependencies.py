"""What the routes need, as FastAPI dependencies: settings, the runtime, and the services over it.

Routes never reach into ``request.app.state`` themselves; tests swap any of these with
``app.dependency_overrides[get_runtime] = ...`` instead of patching.
"""

from __future__ import annotations

from fastapi import Depends, Request

from service.adapters.manager import AdapterManager
from service.errors import APIError
from service.ratelimit import RateLimiter
from service.runtime import Runtime
from service.serving_chat import ChatService
from service.serving_feedback import FeedbackService
from service.serving_models import ServingModels
from thumbtune.core.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_limiter(request: Request) -> RateLimiter:
    return request.app.state.limiter


def get_runtime_or_none(request: Request) -> Runtime | None:
    """The runtime once start-up has built it (the model loaded), else None."""
    return getattr(request.app.state, "runtime", None)


def get_runtime(runtime: Runtime | None = Depends(get_runtime_or_none)) -> Runtime:
    if runtime is None:
        raise APIError(503, "the server is starting (loading the model); try again shortly", code="starting")
    return runtime


def get_chat(runtime: Runtime = Depends(get_runtime)) -> ChatService:
    return ChatService(runtime)


def get_feedback(runtime: Runtime = Depends(get_runtime)) -> FeedbackService:
    return FeedbackService(runtime)


def get_models(runtime: Runtime = Depends(get_runtime)) -> ServingModels:
    return runtime.models


def get_adapter_manager(runtime: Runtime = Depends(get_runtime)) -> AdapterManager:
    if runtime.adapter_manager is None:
        raise APIError(503, "this server has no adapter manager", code="adapters_unavailable")
    return runtime.adapter_manager
