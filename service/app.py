"""The FastAPI application: wires settings, runtime and routers. No logic of its own."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from service import errors
from service.limits import GuardMiddleware
from service.ratelimit import RateLimiter
from service.routers import admin, chat, feedback, health, models, page
from service.runtime import build_runtime
from thumbtune.core.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, on_started: Callable[[], None] | None = None) -> FastAPI:
    """Build the app; its lifespan loads the model and starts everything (`service.runtime.build_runtime`),
    then calls ``on_started`` (the serving process: `thumbtune.core.malloc.freeze_startup_heap`)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = await anyio.to_thread.run_sync(build_runtime, settings)
        app.state.runtime = rt  # what service.dependencies.get_runtime hands the routes
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(rt.close)
            app.state.limiter.close()

    app = FastAPI(
        title="thumbtune",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible chat that learns from its users' ratings.",
    )
    app.state.settings = settings
    app.state.limiter = RateLimiter.from_settings(settings)
    errors.install(app)
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes)
    for module in (chat, feedback, models, health, admin, page):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=page.STATIC_DIR), name="static")
    return app
