"""The fleet dashboard: server-rendered pages (Jinja2 + a little plain JavaScript, every asset packaged
here, nothing from a CDN) for devices, models, rollouts, telemetry and the audit log.

``mount_dashboard(app, svc)`` adds it to the fleet service's FastAPI app at ``/``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from ..service import FleetService

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/ui/static"


def mount_dashboard(app: FastAPI, svc: FleetService) -> None:
    """Serve the dashboard from ``app``: pages at ``/``, assets under ``/ui/static``."""
    from .routes import build_router

    router, handlers = build_router(svc)
    app.include_router(router)
    for exc_type, handler in handlers.items():
        app.add_exception_handler(exc_type, handler)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="dashboard-static")


__all__ = ["mount_dashboard", "STATIC_PREFIX"]
