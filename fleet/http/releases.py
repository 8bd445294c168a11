"""Releases: several bundles of one model, each with the rules a board must meet (manifests/variants.py).
A deployment that names a release gets each device the variant its reported capabilities fit."""

from typing import Annotated

from fastapi import APIRouter, Response
from pydantic import AfterValidator
from sqlalchemy import select

from manifests import Release

from .. import commands
from .. import schemas as S
from ..db import ReleaseRecord
from ..rollout.variants import release_record
from ..views import release_out
from .deps import Admin, Db, Svc, Version

router = APIRouter(tags=["releases"])
# A release's every string is stored and shown: the same text rules as any other body.
ReleaseBody = Annotated[Release, AfterValidator(S.document_text)]


@router.post(
    "/api/v1/releases",
    response_model=S.CreateReleaseResult,
    responses={201: {"model": S.CreateReleaseResult}, 409: {"model": S.ErrorBody}},
)
def create_release(body: ReleaseBody, svc: Svc, p: Admin, response: Response) -> S.CreateReleaseResult:
    """Record a release (idempotent: the same document again is `unchanged`; other content under a taken
    name@version is refused with 409)."""
    out = svc.execute(commands.create_release, body, actor=p.name).value
    response.status_code = 201 if out.result == "created" else 200
    return out


@router.get("/api/v1/releases", response_model=list[S.ReleaseOut])
def list_releases(session: Db, p: Admin) -> list[S.ReleaseOut]:
    recs = session.scalars(select(ReleaseRecord).order_by(ReleaseRecord.name, ReleaseRecord.version)).all()
    return [release_out(r) for r in recs]


@router.get(
    "/api/v1/releases/{name}/{version}", response_model=S.ReleaseOut, responses={404: {"model": S.ErrorBody}}
)
def show_release(name: str, version: Version, session: Db, p: Admin) -> S.ReleaseOut:
    return release_out(release_record(session, name, version))
