"""Artifacts: bundle files for devices, with Range, an ETag (the sha256) and X-Checksum-Sha256. No auth:
bundles are signed, so devices trust the signature, not the transport."""

import hashlib
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse
from starlette.responses import MalformedRangeHeader

from manifests import MANIFEST_NAME, SIGNATURE_NAME

from .. import schemas as S
from ..chunks import chunk_map_of
from ..errors import NotFoundError
from ..registry import get_bundle
from .deps import Db, Svc, Version

router = APIRouter(tags=["artifacts"])
IMMUTABLE = "public, max-age=31536000, immutable"  # a name@version never changes (versions are immutable)


def _headers(sha: str) -> dict[str, str]:
    return {"etag": f'"{sha}"', "x-checksum-sha256": sha, "cache-control": IMMUTABLE}


def _not_modified(if_none_match: str | None, sha: str) -> bool:
    """RFC 9110 13.1.2: ``*`` matches any current representation; otherwise a comma-separated list of
    entity tags compared weakly (``W/"x"`` matches ``"x"``)."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == f'"{sha}"':
            return True
    return False


class _BundleFileResponse(FileResponse):
    """A bundle file. A ``Range`` header that is malformed or names a unit other than bytes is ignored
    (RFC 9110 14.2: the whole file, 200), where Starlette answers 400; an unsatisfiable one is still 416."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []  # Starlette sends the whole file for no range


@router.head("/bundles/{name}/{version}/{path:path}", include_in_schema=False)
@router.get(
    "/bundles/{name}/{version}/{path:path}",
    responses={
        200: {"content": {"application/octet-stream": {}, "application/json": {}}},
        304: {},
        206: {},
        404: {"model": S.ErrorBody},
        416: {},
    },
)
def bundle_file(
    name: str,
    version: Version,
    path: str,
    session: Db,
    svc: Svc,
    if_none_match: Annotated[str | None, Header()] = None,
    chunks: Annotated[bool, Query(description="the file's chunk map (manifests/chunks.py) instead of it")] = False,
) -> Response:
    """A bundle file, with Range, an ETag (its sha256) and X-Checksum-Sha256. No auth: bundles are
    signed, so devices trust the signature, not the transport. With ``chunks``: the sha256 of each fixed-size
    chunk of the file, so a board downloads only the chunks it does not hold (device/agent/reuse.py)."""
    b = get_bundle(session, name, version)
    if path in (MANIFEST_NAME, SIGNATURE_NAME):
        data = (b.manifest_yaml if path == MANIFEST_NAME else b.signature).encode("utf-8")
        sha = hashlib.sha256(data).hexdigest()
        if _not_modified(if_none_match, sha):
            return Response(status_code=304, headers=_headers(sha))
        media_type = "application/yaml" if path == MANIFEST_NAME else "application/json"
        return Response(data, media_type=media_type, headers=_headers(sha))
    entry = next((f for f in b.files if f.path == path), None)
    if entry is None:
        raise NotFoundError(f"{name}@{version} has no file {path!r}")
    if _not_modified(if_none_match, entry.sha256):
        return Response(status_code=304, headers=_headers(entry.sha256))
    blob = svc.blobs.path(entry.sha256)
    if not blob.is_file():
        raise NotFoundError(f"{path} of {name}@{version} is missing from the blob store")
    if chunks:
        return Response(chunk_map_of(blob, entry.sha256).model_dump_json(), media_type="application/json",
                        headers={"cache-control": IMMUTABLE})  # fmt: skip
    return _BundleFileResponse(blob, headers=_headers(entry.sha256), media_type="application/octet-stream")
