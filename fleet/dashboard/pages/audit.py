"""The audit log, filtered by deployment, device and action."""

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from .. import queries
from ..web import Db, FragS, PageS, Ui

router = APIRouter(include_in_schema=False)
Limit = Annotated[int, Query(ge=1, le=5000)]


def _audit_ctx(session: Session, deployment: str, device: str, action: str, limit: int) -> dict[str, Any]:
    chosen = {"deployment": deployment, "device": device, "action": action}
    return {
        "entries": queries.audit_entries(session, deployment=deployment, device=device, action=action, limit=limit),
        "actions": queries.audit_actions(session),
        "af": {**chosen, "limit": limit},
        "query": urlencode({k: v for k, v in chosen.items() if v}),
    }


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    s: PageS,
    db: Db,
    ui: Ui,
    deployment: str = "",
    device: str = "",
    action: str = "",
    limit: Limit = 200,
) -> Response:
    ctx = {"nav": "audit", **_audit_ctx(db, deployment, device, action, limit)}
    return ui.render(request, "audit.html", ctx, s)


@router.get("/ui/fragments/audit", response_class=HTMLResponse)
def audit_fragment(
    request: Request,
    s: FragS,
    db: Db,
    ui: Ui,
    deployment: str = "",
    device: str = "",
    action: str = "",
    limit: Limit = 200,
) -> Response:
    return ui.render(request, "fragments/audit.html", _audit_ctx(db, deployment, device, action, limit), s)
