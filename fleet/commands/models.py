"""Model (bundle) commands. An upload has two halves: ``stage_upload`` checks the signature and streams
the files into the content-addressed blob store in the caller's thread (large files must not hold up
the worker, and a blob without a record is invisible), then the ``upload_model`` command records it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from manifests import TrustStore

from .. import registry
from .. import schemas as S
from ..audit import audit
from ..blobs import BlobStore
from ..db import BundleFileRecord
from ..views import model_out
from .base import CommandContext, CommandResult


@dataclass(frozen=True)
class UploadedModel:
    model: S.ModelOut
    created: bool  # False: this very bundle was registered already (the upload changed nothing)


def stage_upload(
    session: Session,
    blobs: BlobStore,
    trust: TrustStore,
    parts: dict[str, BinaryIO],
    new_blobs: set[str] | None = None,
) -> registry.VerifiedBundle:
    """Verify an upload and put its files in the blob store (``session`` is only read). Refuses a
    bundle that conflicts with a registered one, or holds a part its manifest does not list, before
    reading its files. Blobs it adds go into ``new_blobs``: if the upload is refused after all, the caller
    runs ``discard_blobs`` with them."""
    bundle = registry.verify_upload(trust, parts)
    registry.check_parts(bundle, parts)
    if registry.registered(session, bundle) is None:
        registry.store_files(blobs, bundle, parts, new_blobs)
    return bundle


def discard_blobs(ctx: CommandContext, shas: set[str]) -> CommandResult[None]:
    """Remove the blobs a refused upload stored, except those a registered bundle lists. Deleted here and
    not after the commit: on the writer, before any later command of the batch can record a bundle that
    needs one (such an upload then finds its file gone and is told to retry)."""
    used = set(ctx.session.scalars(select(BundleFileRecord.sha256).where(BundleFileRecord.sha256.in_(shas))))
    for sha in shas - used:
        ctx.env.blobs.delete(sha)
    return CommandResult(None)


def upload_model(
    ctx: CommandContext, bundle: registry.VerifiedBundle, *, actor: str
) -> CommandResult[UploadedModel]:
    rec, created = registry.register(ctx.session, ctx.env.blobs, bundle)
    if created:
        audit(ctx.session, actor, "model_uploaded", bundle=f"{rec.name}@{rec.version}", size=rec.total_size)
    return CommandResult(UploadedModel(model_out(ctx.env.public_url, ctx.session, rec), created))


def delete_model(ctx: CommandContext, name: str, version: int, *, actor: str) -> CommandResult[None]:
    """Refused while a device runs it or is told to, or an active deployment uses it."""
    unused = registry.delete_bundle(ctx.session, name, version)
    audit(ctx.session, actor, "model_deleted", bundle=f"{name}@{version}")
    blobs = ctx.env.blobs

    def remove_files() -> None:
        for sha in unused:
            blobs.delete(sha)

    return CommandResult(None, after_commit=(remove_files,))
