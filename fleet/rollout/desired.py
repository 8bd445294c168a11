"""Desired state: the one way the fleet tells a device what to run (a ``DesiredState`` stored on the
device row, published retained after the commit) and the signed ``RollbackAuthorization`` that lets a
device go below its highest committed version. The rollout engine and offline packages both use it."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from manifests import SignedDocument, SigningKey
from manifests import mqtt as contract
from manifests.adapter import UNLOADED_VERSION

from .. import adapters, registry
from ..db import BundleRecord, Device

UNLOADED = UNLOADED_VERSION  # an adapter rollback to no earlier version: the board unloads it (manifests/adapter.py)


@dataclass
class RolloutContext:
    signing_key: SigningKey
    base_url: Callable[[str, int], str]
    now: Callable[[], dt.datetime]
    rollback_validity_s: float = 7 * 24 * 3600


class DesiredStates:
    def __init__(self, ctx: RolloutContext) -> None:
        self.ctx = ctx

    def set(
        self,
        session: Session,
        device: Device,
        command_id: str,
        name: str,
        version: int,
        rollback: SignedDocument | None,
        now: dt.datetime,
        *,
        manifest_sha256: str | None = None,
        record: BundleRecord | None = None,
    ) -> None:
        """Tell ``device`` to run ``name@version`` under ``command_id`` (NotFoundError: no such bundle).
        A caller starting many devices on one bundle passes its registry ``record`` (looked up once); an
        adapter's record makes it an adapter desired state, the device's model left as it is.

        ``version`` ``UNLOADED`` (a rollback of an adapter the device held no earlier version of): ``record``
        is the adapter version rolled back; the desired state names adapter ``name`` at version 0, bound to
        that version's base, with no manifest (nothing is fetched: the agent unloads the adapter)."""
        unload = version == UNLOADED
        if unload and (record is None or record.name != name or not adapters.is_adapter(record.summary)):
            raise ValueError(f"a rollback of {name} to version {UNLOADED} needs the record of the adapter rolled back")
        rec = record or registry.get_bundle(session, name, version)
        sha = None if unload else manifest_sha256 or rec.manifest_sha256
        url = self.ctx.base_url(name, rec.version if unload else version)
        is_adapter = adapters.is_adapter(rec.summary)
        bundle = contract.BundleRef(name=name, version=version, manifest_sha256=sha, base_url=url)
        desired = contract.DesiredState(
            device_id=device.id,
            deployment_id=command_id,
            bundle=None if is_adapter else bundle,
            adapter=_adapter_ref(rec, name, version, sha, url) if is_adapter else None,
            rollback=rollback,
            issued_at=now,
        )
        device.desired = json.loads(desired.to_bytes())
        device.desired_at = now

    def sign_rollback(
        self, command_id: str, name: str, version: int, device_id: str, now: dt.datetime
    ) -> SignedDocument:
        """A fleet-signed authorisation for ``device_id`` to install ``name@version`` under
        ``command_id``, even below its highest committed version (anti-rollback), until it expires."""
        auth = contract.RollbackAuthorization(
            deployment_id=command_id,
            name=name,
            version=version,
            device_ids=[device_id],
            expires_at=now + dt.timedelta(seconds=self.ctx.rollback_validity_s),
        )
        return SignedDocument.sign(auth, self.ctx.signing_key)


def _adapter_ref(rec: BundleRecord, name: str, version: int, sha: str | None, url: str) -> contract.AdapterRef:
    """The desired state's adapter; at version ``UNLOADED`` it carries no manifest sha256 (there is none)."""
    ref = adapters.adapter_ref(rec.summary, name, version, sha or rec.manifest_sha256, url)
    return ref if sha is not None else ref.model_copy(update={"manifest_sha256": None})
