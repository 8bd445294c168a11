"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the matching status."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from manifests.errors import NanofleetError


class ApiError(NanofleetError):
    """Base of every error the local API answers with; ``code`` (OpenAI's field) doubles as ``reason``."""

    status = 500
    type = "server_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, reason=code or self.type)
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class BadRequestError(ApiError):
    status = 400
    type = "invalid_request_error"


class AuthError(ApiError):
    status = 401
    type = "authentication_error"


class ModelNotFoundError(ApiError):
    status = 404
    type = "invalid_request_error"


class BodyTooLargeError(ApiError):
    status = 413
    type = "invalid_request_error"


class QueueFullError(ApiError):
    status = 429
    type = "rate_limit_error"


class UnavailableError(ApiError):
    status = 503
    type = "service_unavailable"
