"""The fleet dashboard: server-rendered pages (Jinja2 + a little plain JavaScript, every asset packaged
here, nothing from a CDN) for devices, models, rollouts, telemetry and the audit log.

``mount_dashboard(app, svc)`` adds it to the fleet service's FastAPI app at ``/``: one router per page
(``pages/``), sharing ``web`` (templates, session checks); reads in ``queries``, forms in ``actions``,
and every write is a command (``fleet.commands``) run on the service's worker, as for the REST API.
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
    from .pages import ROUTERS
    from .web import HANDLERS, Dashboard

    app.state.dashboard = Dashboard(svc)
    for router in ROUTERS:
        app.include_router(router)
    for exc_type, handler in HANDLERS.items():
        app.add_exception_handler(exc_type, handler)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="dashboard-static")


__all__ = ["mount_dashboard", "STATIC_PREFIX"]
