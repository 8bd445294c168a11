"""The app factory: mounts one router per resource, the error handlers and the status-counting middleware.

The request path lives in ``service.py``; the shared JSON/SSE response path in ``streaming.py``; each
endpoint in ``routes/``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from device.engine import EngineError, InvalidParamsError

from .errors import ApiError, BadRequestError, QueueFullError, UnavailableError
from .holder import ModelHolder
from .metrics import StatusMiddleware
from .routes import chat_router, completions_router, health_router, models_router
from .service import Service
from .settings import ApiSettings


def create_app(holder: ModelHolder, settings: ApiSettings | None = None) -> FastAPI:
    """The FastAPI app serving whatever engine ``holder`` holds now."""
    svc = Service(holder, settings or ApiSettings())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        svc.shutdown()

    app = FastAPI(title="nanofleet device API", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = svc
    app.state.holder = holder
    app.add_middleware(StatusMiddleware, metrics=svc.metrics)
    for router in (health_router, models_router, chat_router, completions_router):
        app.include_router(router)
    _add_error_handlers(app, svc)
    return app


def _add_error_handlers(app: FastAPI, svc: Service) -> None:
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        svc.metrics.errors.labels(kind=exc.code or exc.type).inc()
        if isinstance(exc, (QueueFullError, UnavailableError)) and exc.code == "queue_full":
            svc.holder.stats.record_rejected()
            return exc.response({"Retry-After": "1"})
        svc.holder.stats.record_error()
        return exc.response()

    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        if isinstance(exc, InvalidParamsError):
            return await api_error(request, BadRequestError(str(exc), code=exc.code))
        return await api_error(request, ApiError(str(exc), code=exc.code))

    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(EngineError, engine_error)  # type: ignore[arg-type]
