"""Models: signed bundles in the registry (upload, list, inspect, delete)."""

from typing import Annotated, Any, BinaryIO

import yaml
from fastapi import APIRouter, File, HTTPException, Response, UploadFile
from sqlalchemy import select

from .. import commands
from .. import schemas as S
from ..db import BundleRecord
from ..errors import InvalidBundleError
from ..registry import get_bundle
from ..views import model_out
from .deps import Admin, Db, Svc, Version

router = APIRouter(tags=["models"])


@router.post(
    "/api/v1/models",
    response_model=S.ModelOut,
    status_code=201,
    responses={200: {"model": S.ModelOut}, 409: {"model": S.ErrorBody}},
)
def upload_model(
    files: Annotated[list[UploadFile], File(description="every bundle file; filename = path")],
    session: Db,
    svc: Svc,
    p: Admin,
    response: Response,
) -> S.ModelOut:
    """Upload a signed bundle: manifest.yaml, manifest.sig and every file it lists (filename = its path).
    The signature is checked against the trusted keys before anything is stored."""
    parts: dict[str, BinaryIO] = {}
    for f in files:
        if not f.filename:
            raise HTTPException(422, "every uploaded part needs a filename (the file's path in the bundle)")
        if f.filename in parts:
            raise InvalidBundleError(f"{f.filename} uploaded twice")
        parts[f.filename] = f.file
    # The files stream into the blob store here, in the request's thread; the record is a command. A
    # refused upload takes the blobs it added away again (no orphan files).
    new_blobs: set[str] = set()
    try:
        staged = commands.stage_upload(session, svc.blobs, svc.trust, parts, new_blobs)
        uploaded = svc.execute(commands.upload_model, staged, actor=p.name).value
    except BaseException:
        if new_blobs:
            svc.execute(commands.discard_blobs, new_blobs)
        raise
    response.status_code = 201 if uploaded.created else 200
    return uploaded.model


@router.get("/api/v1/models", response_model=list[S.ModelOut])
def list_models(session: Db, svc: Svc, p: Admin) -> list[S.ModelOut]:
    recs = session.scalars(select(BundleRecord).order_by(BundleRecord.name, BundleRecord.version)).all()
    return [model_out(svc.public_url, session, b) for b in recs]


@router.get("/api/v1/models/{name}/{version}", responses={404: {"model": S.ErrorBody}})
def inspect_model(name: str, version: Version, session: Db, svc: Svc, p: Admin) -> dict[str, Any]:
    b = get_bundle(session, name, version)
    return {
        **model_out(svc.public_url, session, b).model_dump(mode="json"),
        "manifest": yaml.safe_load(b.manifest_yaml),
    }


@router.delete(
    "/api/v1/models/{name}/{version}",
    status_code=204,
    responses={404: {"model": S.ErrorBody}, 409: {"model": S.ErrorBody}},
)
def remove_model(name: str, version: Version, svc: Svc, p: Admin) -> Response:
    """Delete a bundle; refused while a device runs it or is told to, or an active deployment uses it."""
    svc.execute(commands.delete_model, name, version, actor=p.name)
    return Response(status_code=204)
