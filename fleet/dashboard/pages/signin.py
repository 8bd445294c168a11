"""Signing in with the admin token (CSRF-protected form, throttled) and out."""

import hmac
import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ..auth import LOGIN_CSRF_COOKIE, SESSION_COOKIE, safe_next
from ..web import ActS, CsrfRejected, Ui

router = APIRouter(include_in_schema=False)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, ui: Ui, next: str = "/") -> Response:
    if ui.signer.check(request.cookies.get(SESSION_COOKIE)) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    login_csrf = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
    resp = ui.render(request, "login.html", {"next": safe_next(next), "login_csrf": login_csrf, "error": ""})
    resp.set_cookie(
        LOGIN_CSRF_COOKIE, login_csrf, httponly=True, samesite="strict", secure=ui.https(request), path="/login"
    )
    return resp


@router.post("/login")
def login(
    request: Request,
    ui: Ui,
    token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    client = request.client.host if request.client else "?"
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not csrf_token or not hmac.compare_digest(cookie, csrf_token):
        raise CsrfRejected()
    if ui.throttle.blocked(client):
        error = "Too many failed attempts; wait a few minutes."
        ctx = {"next": safe_next(next), "login_csrf": cookie, "error": error}
        return ui.render(request, "login.html", ctx, status_code=429)
    if not token or not ui.signer.token_ok(token):
        ui.throttle.failed(client)
        ctx = {"next": safe_next(next), "login_csrf": cookie, "error": "That is not the admin token."}
        return ui.render(request, "login.html", ctx, status_code=401)
    ui.throttle.succeeded(client)
    value, _ = ui.signer.issue()
    resp = RedirectResponse(safe_next(next), status_code=303)
    resp.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=ui.signer.ttl_s,
        httponly=True,
        samesite="strict",
        secure=ui.https(request),
        path="/",
    )
    resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return resp


@router.post("/logout")
def logout(s: ActS, ui: Ui) -> Response:
    ui.signer.revoke(s)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp
