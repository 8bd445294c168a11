"""The REST API's error bodies: ``{"detail", "reason"}`` (plus ``errors`` naming each invalid field)
for fleet errors, HTTP errors and request validation alike; and the JSON body guard in front of every
route (a size cap, valid Unicode in every string)."""

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import FleetError, InvalidManifestError
from ..schemas import ErrorBody

HTTP_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}
# JSON request bodies (enrolment, tags, deployment manifests) are small; a bundle upload is multipart and an
# offline telemetry file is octet-stream, each capped by its own route.
MAX_JSON_BODY = 1024 * 1024


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


def _bad_strings(doc: Any) -> str | None:
    """The path of the first string (or key) that is not valid Unicode or holds NUL; walked without
    recursion. Python's JSON decoder turns an escaped unpaired surrogate ("\\ud800") into a str that no
    encoder can write back: stored, it made every later list, audit or detail answer 500."""
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return f"{path or '<root>'}: holds a NUL character"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return f"{path or '<root>'}: holds an unpaired UTF-16 surrogate (not valid Unicode)"
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((f"{path}.{k}" if path else str(k), k))
                stack.append((f"{path}.{k}" if path else str(k), v))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value))
    return None


def _error(status: int, detail: str, reason: str, errors: list[dict[str, str]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail, "reason": reason}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status)


class JsonBodyGuard:
    """In front of every route: a JSON body over ``MAX_JSON_BODY`` answers 413 before it is read whole; one
    with a string that is not valid Unicode answers 422 naming the field. Other bodies pass untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._is_json(scope):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_JSON_BODY:
            await _error(413, f"the JSON body is over {MAX_JSON_BODY} bytes", "too_large")(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_JSON_BODY:
                await _error(413, f"the JSON body is over {MAX_JSON_BODY} bytes", "too_large")(scope, receive, send)
                return
        problem = self._unicode_problem(bytes(body))
        if problem is not None:
            err = {"path": problem.split(":", 1)[0], "in": "body", "msg": problem.split(": ", 1)[1]}
            await _error(422, f"invalid request: {problem}", "validation", [err])(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _is_json(scope: dict[str, Any]) -> bool:
        if scope.get("method") not in ("POST", "PUT", "PATCH", "DELETE"):
            return False
        ctype = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
        return ctype == b"application/json" or ctype.endswith(b"+json")

    @staticmethod
    def _unicode_problem(body: bytes) -> str | None:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            return None  # not JSON: the route's own validation answers it
        return _bad_strings(doc)


# Answers every route may give besides its own (documented in the OpenAPI schema for each operation).
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The body could not be parsed (e.g. a malformed multipart form)"},
    405: {
        "model": ErrorBody,
        "description": "Method not allowed on this path",
        "headers": {"Allow": {"description": "the methods this path takes", "schema": {"type": "string"}}},
    },
    413: {"model": ErrorBody, "description": f"A JSON body over {MAX_JSON_BODY} bytes"},
}


def install(app: FastAPI) -> None:
    app.add_exception_handler(FleetError, fleet_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(JsonBodyGuard)
    # Before the routers are included: FastAPI merges the app router's responses into every route.
    app.router.responses.update(COMMON_RESPONSES)
