"""The fleet overview: device counts and the filterable device table."""

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from .. import queries
from ..web import Db, FragS, PageS, Ui

router = APIRouter(include_in_schema=False)


def _filters(
    q: str = "", tag: str = "", group: str = "", hardware_class: str = "", model: str = "", status: str = ""
) -> queries.DeviceFilters:
    return queries.DeviceFilters(q, tag, group, hardware_class, model, status)


Filters = Annotated[queries.DeviceFilters, Depends(_filters)]


def _overview_ctx(session: Session, f: queries.DeviceFilters) -> dict[str, Any]:
    ov = queries.overview(session, f)
    return {"ov": ov, "filters": f, "query": urlencode({k: v for k, v in vars(f).items() if v})}


@router.get("/", response_class=HTMLResponse)
def overview_page(request: Request, s: PageS, f: Filters, db: Db, ui: Ui) -> Response:
    return ui.render(request, "overview.html", {"nav": "overview", **_overview_ctx(db, f)}, s)


@router.get("/ui/fragments/overview", response_class=HTMLResponse)
def overview_fragment(request: Request, s: FragS, f: Filters, db: Db, ui: Ui) -> Response:
    return ui.render(request, "fragments/overview.html", _overview_ctx(db, f), s)
