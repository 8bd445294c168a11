"""The fleet service's FastAPI app: it only mounts the routers (one per resource) and the error
handlers. Routes read through a session of their own and change state only through commands."""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import metrics
from .. import schemas as S
from ..dashboard import mount_dashboard
from ..service import FleetService
from . import artifacts, deployments, devices, enrolment, errors, models, offline, releases, status

# In the order they were always mounted (routing tries them in this order; the OpenAPI lists them so).
ROUTERS = (
    status.health,
    enrolment.router,
    devices.router,
    models.router,
    artifacts.router,
    deployments.router,
    releases.router,
    status.router,
    offline.router,
)


def create_app(
    svc: FleetService, *, manage_lifecycle: bool = True, on_started: Callable[[], None] | None = None
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            svc.start()
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            if manage_lifecycle:
                svc.stop()

    app = FastAPI(
        title="nanofleet fleet service",
        version="1",
        description="Device registry, signed model bundles, staged rollouts with automatic abort, telemetry.",
        lifespan=lifespan,
        responses={401: {"model": S.ErrorBody}, 422: {"model": S.ErrorBody}},
    )
    app.state.service = svc
    errors.install(app)
    metrics.install(app)  # GET /metrics and the API latency timer
    for router in ROUTERS:
        app.include_router(router)
    mount_dashboard(app, svc)  # the web UI at / (fleet/dashboard/)
    return app
