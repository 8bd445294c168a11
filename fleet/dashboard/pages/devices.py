"""One device: its state, what it runs against what it was told, telemetry charts, recent events."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from .. import queries
from ..web import Db, FragS, PageS, Ui

router = APIRouter(include_in_schema=False)


def _device_ctx(session: Session, device_id: str) -> dict[str, Any] | None:
    detail = queries.device_detail(session, device_id)
    return None if detail is None else {"d": detail, "device": detail.device}


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device_page(request: Request, device_id: str, s: PageS, db: Db, ui: Ui) -> Response:
    ctx = _device_ctx(db, device_id)
    if ctx is None:
        return ui.render(request, "notfound.html", {"what": f"device {device_id}"}, s, 404)
    return ui.render(request, "device.html", {"nav": "overview", **ctx}, s)


@router.get("/ui/fragments/device/{device_id}", response_class=HTMLResponse)
def device_fragment(request: Request, device_id: str, s: FragS, db: Db, ui: Ui) -> Response:
    ctx = _device_ctx(db, device_id)
    if ctx is None:
        return HTMLResponse("<p>This device no longer exists.</p>", status_code=404)
    return ui.render(request, "fragments/device.html", ctx, s)
