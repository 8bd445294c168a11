"""Enrolment: tokens made by an admin, exchanged once by a device for its own credentials."""

from fastapi import APIRouter

from .. import commands
from .. import schemas as S
from ..views import enroll_info
from .deps import Admin, Svc

router = APIRouter(tags=["devices"])


@router.post("/api/v1/enrollment-tokens", response_model=S.EnrollmentTokenOut, status_code=201)
def create_enrollment_token(body: S.EnrollmentTokenRequest, svc: Svc, p: Admin) -> S.EnrollmentTokenOut:
    return svc.execute(commands.create_enrollment_token, body, actor=p.name).value


@router.post(
    "/api/v1/enroll", response_model=S.EnrollResponse, status_code=201, responses={409: {"model": S.ErrorBody}}
)
def enroll(body: S.EnrollRequest, svc: Svc) -> S.EnrollResponse:
    """Exchange a one-time enrolment token for this device's own credentials (no other auth)."""
    return svc.execute(commands.enroll, body).value


@router.get("/api/v1/enroll", response_model=S.EnrollInfo)
def enrollment_info(svc: Svc) -> S.EnrollInfo:
    """What a board needs before it enrols: broker URL and protocol, artifact base, trusted keys (public,
    no auth: `nanofleet device enroll` reads it before it spends the one-time token)."""
    return enroll_info(svc)
