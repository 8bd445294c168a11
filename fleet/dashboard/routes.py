"""The dashboard's pages, live fragments and actions (one APIRouter, server-rendered with Jinja2).

Each page has a live region whose HTML comes from a ``/ui/fragments/...`` endpoint; ``app.js`` polls it
and swaps it in place, so numbers and progress bars move without a full reload.
"""

import datetime as dt
import hmac
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from .. import commands
from ..db import aware
from ..errors import FleetError, InvalidManifestError
from ..registry import users_of
from ..rollout import ControlAction
from ..service import FleetService
from . import actions, charts, queries
from .auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    DashboardSession,
    LoginThrottle,
    SessionSigner,
    safe_next,
)

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


def _ago(value: dt.datetime | None, now: dt.datetime) -> str:
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


def _ts(value: dt.datetime | None) -> str:
    if value is None:
        return "–"
    return aware(value).strftime("%Y-%m-%d %H:%M:%S UTC")  # type: ignore[union-attr]


def build_router(svc: FleetService) -> tuple[APIRouter, dict[type[Exception], Any]]:
    signer = SessionSigner(svc.admin_token)
    throttle = LoginThrottle()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters["ago"] = lambda v: _ago(v, svc.now())
    env.filters["ts"] = _ts
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

    router = APIRouter(include_in_schema=False)

    # --- helpers ---------------------------------------------------------------------------------
    def render(
        request: Request,
        template: str,
        ctx: dict[str, Any],
        session: DashboardSession | None = None,
        status_code: int = 200,
    ) -> HTMLResponse:
        base = {"request": request, "session": session, "csrf_field": CSRF_FIELD, "now": svc.now()}
        resp = templates.TemplateResponse(request, template, {**base, **ctx}, status_code=status_code)
        resp.headers.update(SECURITY_HEADERS)
        return resp

    def _https(request: Request) -> bool:
        # Behind a TLS-terminating proxy the request arrives as http; the public URL says how users come.
        return request.url.scheme == "https" or svc.public_url.startswith("https://")

    def _path_with_query(request: Request) -> str:
        q = request.url.query
        return request.url.path + (f"?{q}" if q else "")

    def page_session(request: Request) -> DashboardSession:
        s = signer.check(request.cookies.get(SESSION_COOKIE))
        if s is None:
            raise LoginRequired(_path_with_query(request), fragment=False)
        return s

    def fragment_session(request: Request) -> DashboardSession:
        s = signer.check(request.cookies.get(SESSION_COOKIE))
        if s is None:
            raise LoginRequired(request.headers.get("x-page", "/"), fragment=True)
        return s

    def action_session(
        request: Request,
        csrf_token: Annotated[str | None, Form()] = None,
    ) -> DashboardSession:
        s = signer.check(request.cookies.get(SESSION_COOKIE))
        if s is None:
            raise LoginRequired("/", fragment=False)
        candidate = csrf_token or request.headers.get(CSRF_HEADER)
        if not signer.csrf_ok(s, candidate):
            raise CsrfRejected()
        return s

    def db_session() -> Iterator[Session]:
        # Pages render inside the session: templates may follow relationships (lazy loads).
        with svc.sessions() as session:
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

    # --- sign in / out ---------------------------------------------------------------------------
    @router.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/") -> Response:
        if signer.check(request.cookies.get(SESSION_COOKIE)) is not None:
            return RedirectResponse(safe_next(next), status_code=303)
        login_csrf = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
        resp = render(request, "login.html", {"next": safe_next(next), "login_csrf": login_csrf, "error": ""})
        resp.set_cookie(
            LOGIN_CSRF_COOKIE,
            login_csrf,
            httponly=True,
            samesite="strict",
            secure=_https(request),
            path="/login",
        )
        return resp

    @router.post("/login")
    def login(
        request: Request,
        token: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/",
        csrf_token: Annotated[str, Form()] = "",
    ) -> Response:
        client = request.client.host if request.client else "?"
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not cookie or not csrf_token or not hmac.compare_digest(cookie, csrf_token):
            raise CsrfRejected()
        if throttle.blocked(client):
            return render(
                request,
                "login.html",
                {
                    "next": safe_next(next),
                    "login_csrf": cookie,
                    "error": "Too many failed attempts; wait a few minutes.",
                },
                status_code=429,
            )
        if not token or not signer.token_ok(token):
            throttle.failed(client)
            return render(
                request,
                "login.html",
                {"next": safe_next(next), "login_csrf": cookie, "error": "That is not the admin token."},
                status_code=401,
            )
        throttle.succeeded(client)
        value, _ = signer.issue()
        resp = RedirectResponse(safe_next(next), status_code=303)
        resp.set_cookie(
            SESSION_COOKIE,
            value,
            max_age=signer.ttl_s,
            httponly=True,
            samesite="strict",
            secure=_https(request),
            path="/",
        )
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return resp

    @router.post("/logout")
    def logout(s: ActS) -> Response:
        signer.revoke(s)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    # --- fleet overview --------------------------------------------------------------------------
    def _filters(
        q: str = "",
        tag: str = "",
        group: str = "",
        hardware_class: str = "",
        model: str = "",
        status: str = "",
    ) -> queries.DeviceFilters:
        return queries.DeviceFilters(q, tag, group, hardware_class, model, status)

    Filters = Annotated[queries.DeviceFilters, Depends(_filters)]

    def _overview_ctx(session: Session, f: queries.DeviceFilters) -> dict[str, Any]:
        ov = queries.overview(session, f)
        return {"ov": ov, "filters": f, "query": urlencode({k: v for k, v in vars(f).items() if v})}

    @router.get("/", response_class=HTMLResponse)
    def overview_page(request: Request, s: PageS, f: Filters, db: Db) -> Response:
        return render(request, "overview.html", {"nav": "overview", **_overview_ctx(db, f)}, s)

    @router.get("/ui/fragments/overview", response_class=HTMLResponse)
    def overview_fragment(request: Request, s: FragS, f: Filters, db: Db) -> Response:
        return render(request, "fragments/overview.html", _overview_ctx(db, f), s)

    # --- device ----------------------------------------------------------------------------------
    def _device_ctx(session: Session, device_id: str) -> dict[str, Any] | None:
        detail = queries.device_detail(session, device_id)
        return None if detail is None else {"d": detail, "device": detail.device}

    @router.get("/devices/{device_id}", response_class=HTMLResponse)
    def device_page(request: Request, device_id: str, s: PageS, db: Db) -> Response:
        ctx = _device_ctx(db, device_id)
        if ctx is None:
            return render(request, "notfound.html", {"what": f"device {device_id}"}, s, 404)
        return render(request, "device.html", {"nav": "overview", **ctx}, s)

    @router.get("/ui/fragments/device/{device_id}", response_class=HTMLResponse)
    def device_fragment(request: Request, device_id: str, s: FragS, db: Db) -> Response:
        ctx = _device_ctx(db, device_id)
        if ctx is None:
            return HTMLResponse("<p>This device no longer exists.</p>", status_code=404)
        return render(request, "fragments/device.html", ctx, s)

    # --- models ----------------------------------------------------------------------------------
    @router.get("/models", response_class=HTMLResponse)
    def models_page(request: Request, s: PageS, db: Db) -> Response:
        views = queries.models(db, svc.trust)
        for v in views:
            v.users = users_of(db, v.record.name, v.record.version)
        return render(request, "models.html", {"nav": "models", "models": views}, s)

    # --- deployments -----------------------------------------------------------------------------
    def _deployments_ctx(session: Session) -> dict[str, Any]:
        return {"deps": queries.deployments(session), "bundles": queries.bundle_choices(session)}

    def _deployments_page(
        db: Session,
        request: Request,
        s: DashboardSession,
        status_code: int = 200,
        error: str | None = None,
        errors: list[dict[str, str]] | None = None,
        form: dict[str, str] | None = None,
        manifest_text: str = "",
    ) -> Response:
        ctx = _deployments_ctx(db)
        return render(
            request,
            "deployments.html",
            {
                "nav": "deployments",
                **ctx,
                "error": error,
                "errors": errors or [],
                "form": form or {},
                "manifest_text": manifest_text,
            },
            s,
            status_code,
        )

    @router.get("/deployments", response_class=HTMLResponse)
    def deployments_page(request: Request, s: PageS, db: Db, edit: str = "") -> Response:
        # ?edit=<name>: the paste form starts with that deployment's manifest, to change and re-apply.
        text = ""
        if edit:
            view = queries.get_deployment_view(db, edit)
            text = actions.manifest_yaml(view.dep.manifest) if view else ""
        return _deployments_page(db, request, s, manifest_text=text)

    @router.get("/ui/fragments/deployments", response_class=HTMLResponse)
    def deployments_fragment(request: Request, s: FragS, db: Db) -> Response:
        return render(request, "fragments/deployments.html", _deployments_ctx(db), s)

    def _refused_page(request: Request, s: DashboardSession, *args: Any) -> Response:
        with svc.sessions() as session:
            return _deployments_page(session, request, s, *args)

    @router.post("/deployments")
    async def start_deployment(request: Request) -> Response:
        form_data = await request.form()
        form = {k: str(v) for k, v in form_data.items()}
        s = action_session(request, form.get(CSRF_FIELD))
        mode = form.get("mode", "compose")
        manifest_text = form.get("manifest", "") if mode == "manifest" else ""
        try:
            if mode == "manifest":
                manifest = actions.parse_manifest_text(manifest_text)
            else:
                try:
                    doc = actions.compose_manifest(form)
                except ValueError as exc:
                    raise actions.ManifestInputError(f"a number field is not a number: {exc}") from exc
                manifest = actions.validate_manifest(doc)
        except InvalidManifestError as exc:
            return await run_in_threadpool(
                _refused_page, request, s, 422, exc.message, exc.errors, form, manifest_text
            )
        try:
            applied = await run_in_threadpool(
                svc.execute, commands.apply_deployment, manifest, actor=actions.ACTOR
            )
            result, name = applied.value.result, applied.value.deployment.name
        except InvalidManifestError as exc:
            return await run_in_threadpool(
                _refused_page, request, s, 422, exc.message, exc.errors, form, manifest_text
            )
        except FleetError as exc:
            return await run_in_threadpool(
                _refused_page, request, s, exc.status_code, exc.message, None, form, manifest_text
            )
        return RedirectResponse(
            f"/deployments/{quote(name)}?" + urlencode({"applied": result}), status_code=303
        )

    def _deployment_ctx(session: Session, name: str) -> dict[str, Any] | None:
        view = queries.get_deployment_view(session, name)
        if view is None:
            return None
        ba = queries.before_after(session, view.dep)
        audit = queries.audit_entries(session, deployment=name, limit=50)
        return {
            "v": view,
            "dep": view.dep,
            "tok_chart": charts.before_after_chart(
                "Decode speed before and after the update", ba.tok_s, "tok/s"
            ),
            "err_chart": charts.before_after_chart(
                "Error rate before and after the update", ba.error_rate, "%"
            ),
            "ba": ba,
            "audit": audit,
        }

    @router.get("/deployments/{name}", response_class=HTMLResponse)
    def deployment_page(
        request: Request, name: str, s: PageS, db: Db, applied: str = "", done: str = ""
    ) -> Response:
        ctx = _deployment_ctx(db, name)
        if ctx is None:
            return render(request, "notfound.html", {"what": f"deployment {name}"}, s, 404)
        return render(
            request, "deployment.html", {"nav": "deployments", "applied": applied, "done": done, **ctx}, s
        )

    @router.get("/ui/fragments/deployment/{name}", response_class=HTMLResponse)
    def deployment_fragment(request: Request, name: str, s: FragS, db: Db) -> Response:
        ctx = _deployment_ctx(db, name)
        if ctx is None:
            return HTMLResponse("<p>This deployment no longer exists.</p>", status_code=404)
        return render(request, "fragments/deployment.html", ctx, s)

    @router.post("/deployments/{name}/{action}")
    def control_deployment(
        request: Request, name: str, action: str, s: ActS, db: Db, confirmed: Annotated[str, Form()] = ""
    ) -> Response:
        if action not in actions.CONTROL_ACTIONS:
            return render(request, "notfound.html", {"what": f"action {action}"}, s, 404)
        if confirmed != "yes":
            # No script (or a hand-made request): ask on a page of its own.
            return render(request, "confirm.html", {"nav": "deployments", "name": name, "action": action}, s)
        try:
            status = svc.execute(
                commands.control_deployment, name, ControlAction(action), actor=actions.ACTOR
            ).value.status
        except FleetError as exc:
            ctx = _deployment_ctx(db, name)
            if ctx is None:
                return render(request, "notfound.html", {"what": f"deployment {name}"}, s, 404)
            return render(
                request,
                "deployment.html",
                {"nav": "deployments", "applied": "", "done": "", "error": exc.message, **ctx},
                s,
                exc.status_code,
            )
        return RedirectResponse(
            f"/deployments/{quote(name)}?" + urlencode({"done": f"{action} → {status}"}), status_code=303
        )

    # --- audit -----------------------------------------------------------------------------------
    def _audit_ctx(session: Session, deployment: str, device: str, action: str, limit: int) -> dict[str, Any]:
        chosen = {"deployment": deployment, "device": device, "action": action}
        return {
            "entries": queries.audit_entries(
                session, deployment=deployment, device=device, action=action, limit=limit
            ),
            "actions": queries.audit_actions(session),
            "af": {**chosen, "limit": limit},
            "query": urlencode({k: v for k, v in chosen.items() if v}),
        }

    Limit = Annotated[int, Query(ge=1, le=5000)]

    @router.get("/audit", response_class=HTMLResponse)
    def audit_page(
        request: Request,
        s: PageS,
        db: Db,
        deployment: str = "",
        device: str = "",
        action: str = "",
        limit: Limit = 200,
    ) -> Response:
        return render(
            request, "audit.html", {"nav": "audit", **_audit_ctx(db, deployment, device, action, limit)}, s
        )

    @router.get("/ui/fragments/audit", response_class=HTMLResponse)
    def audit_fragment(
        request: Request,
        s: FragS,
        db: Db,
        deployment: str = "",
        device: str = "",
        action: str = "",
        limit: Limit = 200,
    ) -> Response:
        return render(request, "fragments/audit.html", _audit_ctx(db, deployment, device, action, limit), s)

    handlers: dict[type[Exception], Any] = {LoginRequired: on_login_required, CsrfRejected: on_csrf}
    return router, handlers
