"""Content-addressed file storage: every bundle file lives once, under its sha256.

Two stores behind one interface (``BlobStore``):

- ``DirectoryBlobStore``: ``<root>/<sha[:2]>/<sha>``. ``root`` is ``data_dir/blobs`` by default, or a
  directory on a mount every fleet server shares (``blobs.path``).
- ``S3BlobStore``: an S3-compatible bucket (``blobs.s3``: AWS, MinIO, Ceph, ...), keys
  ``<prefix>blobs/<sha[:2]>/<sha>``; the fleet's own artifact route serves from a local read-through cache
  of it (``data_dir/blob-cache``), checked against the sha256 on the way in.

Both can **publish** a bundle for a separate artifact server (``artifacts_base_url``): the bundle's files
and its signed manifest under ``bundles/<name>/<version>/`` of the same store (relative symlinks into the
blobs in a directory; server-side copies in a bucket), the layout devices fetch from. nginx serving the
directory, or the bucket behind a CDN, then serves every rollout; the manifest is signed, so the mirror
need not be trusted.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from manifests import MANIFEST_NAME, SIGNATURE_NAME, fsync_dir

from .errors import ConfigError, InvalidBundleError

if TYPE_CHECKING:
    from .config import FleetConfig, S3Config

CHUNK = 1 << 20
PUBLISHED = "bundles"  # the published tree's top directory (never a two-hex-digit blob directory)


class BlobStore(Protocol):
    def path(self, sha256: str) -> Path:
        """A local file holding the blob (it may not exist: the blob is not stored)."""
        ...

    def has(self, sha256: str) -> bool: ...

    def put_stream(self, src: BinaryIO, *, expected_sha256: str, expected_size: int, name: str) -> None:
        """Copy ``src`` in, checking size and sha256 on the way; a mismatch stores nothing."""
        ...

    def delete(self, sha256: str) -> None: ...

    def publish(
        self, name: str, version: int, files: Sequence[tuple[str, str]], manifest: bytes, signature: bytes
    ) -> None:
        """Lay ``name@version`` out under ``bundles/<name>/<version>/`` for an artifact server:
        ``files`` are (path in the bundle, sha256); the manifest and its signature go beside them."""
        ...


def open_blob_store(config: FleetConfig) -> BlobStore:
    if config.blobs.s3 is not None:
        return S3BlobStore(config.blobs.s3, config.data_dir / "blob-cache")
    return DirectoryBlobStore(config.blobs.path or config.data_dir / "blobs")


def _spool(src: BinaryIO, out: BinaryIO, name: str, expected_sha256: str, expected_size: int) -> None:
    """Copy with the size cap and the sha256 check; raises InvalidBundleError on a mismatch."""
    h, size = hashlib.sha256(), 0
    for chunk in iter(lambda: src.read(CHUNK), b""):
        if size + len(chunk) > expected_size:
            raise InvalidBundleError(f"{name}: over the {expected_size} bytes in the manifest")
        h.update(chunk)
        size += len(chunk)
        out.write(chunk)
    _check(name, h.hexdigest(), size, expected_sha256, expected_size)


def _write_atomic(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=dest.parent)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest)


class DirectoryBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_stream(self, src: BinaryIO, *, expected_sha256: str, expected_size: int, name: str) -> None:
        dest = self.path(expected_sha256)
        if dest.is_file():
            # Already stored (content-addressed): still read the upload to check it is what it claims.
            digest, size = _hash_stream(src)
            _check(name, digest, size, expected_sha256, expected_size)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".upload.", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                _spool(src, out, name, expected_sha256, expected_size)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def delete(self, sha256: str) -> None:
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            pass

    def publish(
        self, name: str, version: int, files: Sequence[tuple[str, str]], manifest: bytes, signature: bytes
    ) -> None:
        base = self.root / PUBLISHED / name / str(version)
        for rel, sha in files:
            link = base / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            # Relative, so the tree stays valid wherever the shared directory is mounted; a deleted blob
            # leaves a dangling link (404), never stale bytes.
            target = os.path.relpath(self.path(sha), link.parent)
            if link.is_symlink() and os.readlink(link) == target:
                continue
            tmp = link.with_name(f".tmp.{link.name}")
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.replace(tmp, link)
        # The manifest last: a mirror that has it has every file it lists.
        _write_atomic(base / SIGNATURE_NAME, signature)
        _write_atomic(base / MANIFEST_NAME, manifest)
        fsync_dir(base)


class S3BlobStore:
    """Blobs in an S3-compatible bucket (boto3, installed with the ``s3`` extra)."""

    def __init__(self, cfg: S3Config, cache_dir: Path) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise ConfigError("blobs.s3 needs boto3: pip install 'nanofleet[s3]'") from exc
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix
        # Devices fetch the published tree anonymously: readable by ACL here, or by the bucket's policy.
        self.acl: dict[str, str] = {"ACL": "public-read"} if cfg.public_read else {}
        self.s3: Any = boto3.client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            region_name=cfg.region,
            aws_access_key_id=cfg.access_key_id,
            aws_secret_access_key=cfg.secret_access_key,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )
        self.cache = cache_dir
        self.cache.mkdir(parents=True, exist_ok=True)

    def key(self, sha256: str) -> str:
        return f"{self.prefix}blobs/{sha256[:2]}/{sha256}"

    def has(self, sha256: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=self.bucket, Key=self.key(sha256))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def put_stream(self, src: BinaryIO, *, expected_sha256: str, expected_size: int, name: str) -> None:
        # Checked before anything reaches the bucket: a tampered upload never becomes an object.
        with tempfile.TemporaryFile(dir=self.cache) as spool:
            _spool(src, spool, name, expected_sha256, expected_size)
            if self.has(expected_sha256):
                return
            spool.seek(0)
            self.s3.upload_fileobj(
                spool, self.bucket, self.key(expected_sha256), ExtraArgs={"ContentType": "application/octet-stream"}
            )

    def delete(self, sha256: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        self.path_cached(sha256).unlink(missing_ok=True)

    def path_cached(self, sha256: str) -> Path:
        return self.cache / sha256[:2] / sha256

    def path(self, sha256: str) -> Path:
        """The blob in the local cache, fetched (and checked) on first use; a path that does not exist
        when the bucket has no such object."""
        from botocore.exceptions import ClientError

        dest = self.path_cached(sha256)
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fetch.", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    self.s3.download_fileobj(self.bucket, self.key(sha256), out)
                except ClientError:
                    return dest  # not stored: the caller answers 404
            with open(tmp, "rb") as f:
                digest, _size = _hash_stream(f)
            if digest != sha256:
                raise InvalidBundleError(f"blob {sha256[:16]}… in the bucket does not match its name")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    def publish(
        self, name: str, version: int, files: Sequence[tuple[str, str]], manifest: bytes, signature: bytes
    ) -> None:
        base = f"{self.prefix}{PUBLISHED}/{name}/{version}"
        for rel, sha in files:
            self.s3.copy_object(
                Bucket=self.bucket,
                Key=f"{base}/{rel}",
                CopySource={"Bucket": self.bucket, "Key": self.key(sha)},
                **self.acl,
            )
        # The manifest last: a mirror that has it has every file it lists.
        self.s3.put_object(Bucket=self.bucket, Key=f"{base}/{SIGNATURE_NAME}", Body=signature, **self.acl)
        self.s3.put_object(
            Bucket=self.bucket,
            Key=f"{base}/{MANIFEST_NAME}",
            Body=manifest,
            ContentType="application/yaml",
            **self.acl,
        )


def _hash_stream(src: BinaryIO) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    for chunk in iter(lambda: src.read(CHUNK), b""):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _check(name: str, digest: str, size: int, expected_sha256: str, expected_size: int) -> None:
    if size != expected_size:
        raise InvalidBundleError(f"{name}: {size} bytes uploaded, the manifest says {expected_size}")
    if digest != expected_sha256:
        raise InvalidBundleError(f"{name}: sha256 {digest[:16]}… does not match the manifest")
