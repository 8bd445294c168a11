"""Model (bundle) commands. An upload has two halves: ``stage_upload`` checks the signature and streams
the files into the content-addressed blob store in the caller's thread (large files must not hold up
the worker, and a blob without a record is invisible), then the ``upload_model`` command records it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from sqlalchemy.orm import Session

from manifests import TrustStore

from .. import registry
from .. import schemas as S
from ..audit import audit
from ..blobs import BlobStore
from ..views import model_out
from .base import CommandContext, CommandResult


@dataclass(frozen=True)
class UploadedModel:
    model: S.ModelOut
    created: bool  # False: this very bundle was registered already (the upload changed nothing)


def stage_upload(
    session: Session, blobs: BlobStore, trust: TrustStore, parts: dict[str, BinaryIO]
) -> registry.VerifiedBundle:
    """Verify an upload and put its files in the blob store (``session`` is only read). Refuses a
    bundle that conflicts with a registered one before reading its files."""
    bundle = registry.verify_upload(trust, parts)
    if registry.registered(session, bundle) is None:
        registry.store_files(blobs, bundle, parts)
    return bundle


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
