"""The dashboard's pages, one router per page (and its live fragment and actions), in mounting order."""

from . import audit, deployments, devices, models, overview, signin

ROUTERS = (signin.router, overview.router, devices.router, models.router, deployments.router, audit.router)

__all__ = ["ROUTERS"]
