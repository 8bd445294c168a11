"""Signed JSON documents: a payload plus a detached ed25519 signature, for things other than bundles.

Used for rollback authorisations (anti-rollback lets an older version in only when a signed rollback
asks for it), for deployment manifests carried on removable media, and for telemetry exports.
The signature covers the canonical JSON of the payload (sorted keys, no spaces).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from .signing import Signature, SigningKey, TrustStore


def canonical_json(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class SignedDocument(BaseModel):
    payload: dict[str, Any]
    key_id: str
    signature: str  # base64

    @classmethod
    def sign(cls, payload: dict[str, Any] | BaseModel, key: SigningKey) -> SignedDocument:
        data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
        sig = key.sign(canonical_json(data))
        doc = json.loads(sig.to_json())
        return cls(payload=data, key_id=sig.key_id, signature=doc["signature"])

    def verify(self, trust: TrustStore) -> dict[str, Any]:
        sig = Signature.from_json(json.dumps({"alg": "ed25519", "key_id": self.key_id, "signature": self.signature}))
        trust.verify(canonical_json(self.payload), sig)
        return self.payload
