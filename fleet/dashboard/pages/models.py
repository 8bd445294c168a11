"""The registry's bundles: signer, quality, size, and who uses each."""

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from ...registry import users_of
from .. import queries
from ..web import Db, PageS, Ui

router = APIRouter(include_in_schema=False)


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, s: PageS, db: Db, ui: Ui) -> Response:
    views = queries.models(db, ui.svc.trust)
    for v in views:
        v.users = users_of(db, v.record.name, v.record.version)
    return ui.render(request, "models.html", {"nav": "models", "models": views}, s)
