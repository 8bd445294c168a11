"""ed25519 keys and detached signatures (via ``cryptography``).

A signature is stored beside the signed bytes as a small JSON document::

    {"alg": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}

``key_id`` is the first 16 hex digits of sha256 over the raw 32-byte public key, so a verifier holding
several trusted keys (key rotation) picks the right one without trying them all.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import BadSignatureError, KeyExistsError, KeyFormatError, UnknownKeyError

PRIVATE_KEY_NAME = "nanofleet.key"
PUBLIC_KEY_NAME = "nanofleet.pub"


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signature:
    key_id: str
    signature: bytes
    alg: str = "ed25519"

    def to_json(self) -> str:
        return json.dumps(
            {"alg": self.alg, "key_id": self.key_id, "signature": base64.b64encode(self.signature).decode()},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Signature:
        try:
            doc = json.loads(text)
            if doc.get("alg") != "ed25519":
                raise BadSignatureError(f"unsupported signature algorithm {doc.get('alg')!r}")
            return cls(key_id=str(doc["key_id"]), signature=base64.b64decode(doc["signature"], validate=True))
        except BadSignatureError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise BadSignatureError(f"signature document is malformed: {exc}") from exc


class SigningKey:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> SigningKey:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise KeyFormatError(f"private key file not found: {path}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFormatError(
                f"{path} is not a PEM ed25519 private key (make one with `nanofleet keygen`): {exc}"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFormatError(f"{path} holds a {type(key).__name__}, not an ed25519 private key")
        return cls(key)

    def sign(self, data: bytes) -> Signature:
        return Signature(key_id=self.key_id, signature=self._key.sign(data))

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_pem(self) -> bytes:
        return public_pem(self.public_key)


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(source: str | Path | bytes) -> Ed25519PublicKey:
    """Load a PEM public key from a path or from PEM bytes."""
    if isinstance(source, bytes):
        data, where = source, "<bytes>"
    else:
        path = Path(source)
        try:
            data, where = path.read_bytes(), str(path)
        except FileNotFoundError as exc:
            raise KeyFormatError(f"public key file not found: {path}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFormatError(f"{where} is not a PEM ed25519 public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFormatError(f"{where} holds a {type(key).__name__}, not an ed25519 public key")
    return key


class TrustStore:
    """The set of public keys a verifier trusts, by key id (several at once, so keys can be rotated)."""

    def __init__(self, keys: list[Ed25519PublicKey] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for key in keys or []:
            self.add(key)

    @classmethod
    def from_paths(cls, paths: list[str | Path]) -> TrustStore:
        return cls([load_public_key(p) for p in paths])

    def add(self, key: Ed25519PublicKey) -> str:
        kid = key_id_of(key)
        self._keys[kid] = key
        return kid

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def verify(self, data: bytes, signature: Signature) -> str:
        """Check ``signature`` over ``data``; returns the key id that signed it."""
        key = self._keys.get(signature.key_id)
        if key is None:
            raise UnknownKeyError(
                f"signed by unknown key {signature.key_id}; trusted keys: {', '.join(self.key_ids) or 'none'}"
            )
        try:
            key.verify(signature.signature, data)
        except InvalidSignature as exc:
            raise BadSignatureError(f"signature by key {signature.key_id} does not match the content") from exc
        return signature.key_id


def write_keypair(out_dir: str | Path, key: SigningKey | None = None) -> tuple[Path, Path]:
    """Write ``nanofleet.key`` (mode 0600) and ``nanofleet.pub``; refuse to overwrite either."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv, pub = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    for p in (priv, pub):
        if p.exists():
            raise KeyExistsError(f"{p} already exists; refusing to overwrite a key")
    key = key or SigningKey.generate()
    # O_EXCL + 0600 at creation: the private key is never world-readable, not even for an instant.
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_pem())
        fh.flush()
        os.fsync(fh.fileno())
    pub.write_bytes(key.public_pem())
    return priv, pub
