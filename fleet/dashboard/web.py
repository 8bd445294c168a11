"""What every dashboard page shares: the templates, rendering with the security headers, the signed
session cookie checks (page, live fragment, action with CSRF), a read session, and the two refusals.

Pages (``pages/``) reach it through the ``Ui`` dependency (the ``Dashboard`` on ``app.state``). (No
``from __future__ import annotations`` here: FastAPI reads the real annotations.)
"""

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from ..db import aware
from ..rollout import ControlAction, can_deployment
from ..service import FleetService
from . import actions, charts, queries
from .auth import CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE, DashboardSession, LoginThrottle, SessionSigner, safe_next

HERE = Path(__file__).parent
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


class LoginRequired(Exception):
    def __init__(self, next_url: str, fragment: bool) -> None:
        super().__init__(next_url)
        self.next_url = next_url
        self.fragment = fragment


class CsrfRejected(Exception):
    pass


def ago(value: dt.datetime | None, now: dt.datetime) -> str:
    if value is None:
        return "never"
    s = (now - aware(value)).total_seconds()  # type: ignore[operator]
    if s < 0:
        s = 0
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 48 * 3600:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} d ago"


def ts(value: dt.datetime | None) -> str:
    if value is None:
        return "–"
    return aware(value).strftime("%Y-%m-%d %H:%M:%S UTC")  # type: ignore[union-attr]


def control_allowed(status: str, action: str) -> bool:
    """Whether the deployment's transition table lets an operator do ``action`` now (button state)."""
    return can_deployment(status, ControlAction(action).event)


class Dashboard:
    def __init__(self, svc: FleetService) -> None:
        self.svc = svc
        self.signer = SessionSigner(svc.admin_token)
        self.throttle = LoginThrottle()
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        env = self.templates.env
        env.filters["ago"] = lambda v: ago(v, svc.now())
        env.filters["ts"] = ts
        env.filters["num"] = charts.fmt_num
        env.filters["bytes"] = lambda v: charts.fmt_num(v, "B")
        env.globals["state_colours"] = charts.STATE_COLOURS
        env.globals["stacked_bar"] = charts.stacked_bar
        env.globals["line_chart"] = charts.line_chart
        env.globals["manifest_yaml"] = actions.manifest_yaml
        env.globals["in_sync"] = queries.in_sync
        env.globals["model_of"] = queries.model_of
        env.globals["update_state"] = queries.update_state
        env.globals["control_actions"] = actions.CONTROL_ACTIONS
        env.globals["control_allowed"] = control_allowed

    def render(
        self,
        request: Request,
        template: str,
        ctx: dict[str, Any],
        session: DashboardSession | None = None,
        status_code: int = 200,
    ) -> HTMLResponse:
        base = {"request": request, "session": session, "csrf_field": CSRF_FIELD, "now": self.svc.now()}
        resp = self.templates.TemplateResponse(request, template, {**base, **ctx}, status_code=status_code)
        resp.headers.update(SECURITY_HEADERS)
        return resp

    def https(self, request: Request) -> bool:
        # Behind a TLS-terminating proxy the request arrives as http; the public URL says how users come.
        return request.url.scheme == "https" or self.svc.public_url.startswith("https://")


def ui(request: Request) -> Dashboard:
    return request.app.state.dashboard


Ui = Annotated[Dashboard, Depends(ui)]


def _path_with_query(request: Request) -> str:
    q = request.url.query
    return request.url.path + (f"?{q}" if q else "")


def page_session(request: Request, ui: Ui) -> DashboardSession:
    s = ui.signer.check(request.cookies.get(SESSION_COOKIE))
    if s is None:
        raise LoginRequired(_path_with_query(request), fragment=False)
    return s


def fragment_session(request: Request, ui: Ui) -> DashboardSession:
    s = ui.signer.check(request.cookies.get(SESSION_COOKIE))
    if s is None:
        raise LoginRequired(request.headers.get("x-page", "/"), fragment=True)
    return s


def action_session(request: Request, ui: Ui, csrf_token: Annotated[str | None, Form()] = None) -> DashboardSession:
    s = ui.signer.check(request.cookies.get(SESSION_COOKIE))
    if s is None:
        raise LoginRequired("/", fragment=False)
    candidate = csrf_token or request.headers.get(CSRF_HEADER)
    if not ui.signer.csrf_ok(s, candidate):
        raise CsrfRejected()
    return s


def db_session(ui: Ui) -> Iterator[Session]:
    # Pages render inside the session: templates may follow relationships (lazy loads).
    with ui.svc.sessions() as session:
        yield session


Db = Annotated[Session, Depends(db_session)]
PageS = Annotated[DashboardSession, Depends(page_session)]
FragS = Annotated[DashboardSession, Depends(fragment_session)]
ActS = Annotated[DashboardSession, Depends(action_session)]


async def on_login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    target = "/login?" + urlencode({"next": safe_next(exc.next_url)})
    if exc.fragment:
        return JSONResponse({"detail": "sign in first", "login": target}, status_code=401)
    return RedirectResponse(target, status_code=303)


async def on_csrf(request: Request, exc: Exception) -> Response:
    resp = HTMLResponse(
        "<!doctype html><title>Refused</title><h1>Refused: missing or invalid CSRF token</h1>"
        "<p>Reload the page and try again.</p>",
        status_code=403,
    )
    resp.headers.update(SECURITY_HEADERS)
    return resp


HANDLERS: dict[type[Exception], Any] = {LoginRequired: on_login_required, CsrfRejected: on_csrf}
