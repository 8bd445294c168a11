"""The REST API: ``create_app(svc)`` and one router per resource (``enrolment``, ``devices``, ``models``,
``artifacts``, ``deployments``, ``status``, ``offline``). To add a route: put it in its resource's module
(reads with ``Db``, writes only through ``svc.execute(commands.…)``); a new resource gets a module of
its own, listed in ``app.ROUTERS``."""

from .app import create_app

__all__ = ["create_app"]
