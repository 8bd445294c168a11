"""The REST API's error bodies: ``{"detail", "reason"}`` (plus ``errors`` naming each invalid field)
for fleet errors, HTTP errors and request validation alike."""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import FleetError, InvalidManifestError

HTTP_REASONS = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}


async def fleet_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FleetError)
    body: dict[str, Any] = {"detail": exc.message, "reason": exc.reason}
    if isinstance(exc, InvalidManifestError):
        body["errors"] = exc.errors
    return JSONResponse(body, status_code=exc.status_code)


async def http_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    reason = HTTP_REASONS.get(exc.status_code, f"http_{exc.status_code}")
    return JSONResponse(
        {"detail": str(exc.detail), "reason": reason},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def validation_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            where, loc = loc[0], loc[1:]
        else:
            where = "body"
        errors.append({"path": ".".join(loc) or "<root>", "in": where, "msg": str(err.get("msg", ""))})
    detail = "invalid request: " + "; ".join(f"{e['path']}: {e['msg']}" for e in errors)
    return JSONResponse({"detail": detail, "reason": "validation", "errors": errors}, status_code=422)


def install(app: FastAPI) -> None:
    app.add_exception_handler(FleetError, fleet_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
