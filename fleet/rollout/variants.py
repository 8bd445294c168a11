"""Per-board variants, the fleet side: releases in the registry, each device's capabilities as the fleet
knows them, and starting a release deployment's targets, each on the variant its board fits.

The choice itself is ``manifests.variants.resolve_variant`` (pure, in the contract); this module only
gathers its inputs and records its answer. It happens when a target starts (not at apply), so a board that
reported its capabilities after the apply is judged on them. A board no variant fits is marked ``unfit``
with the one-line reason and sent nothing; resuming the deployment judges it again.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from manifests import BoardCapabilities, DeploymentManifest, Release, SchemaError, VariantRefusal, resolve_variant

from .. import registry
from ..audit import audit
from ..db import Deployment, DeploymentTarget, Device, ReleaseRecord
from ..errors import NotFoundError
from . import queries as Q
from .states import TargetEvent, move_target

if TYPE_CHECKING:
    from .engine import RolloutEngine

ROLLOUT = "rollout"


def release_record(session: Session, name: str, version: int) -> ReleaseRecord:
    rec = session.scalar(select(ReleaseRecord).where(ReleaseRecord.name == name, ReleaseRecord.version == version))
    if rec is None:
        raise NotFoundError(f"no release {name}@{version}")
    return rec


def get_release(session: Session, name: str, version: int) -> Release:
    return Release.from_obj(release_record(session, name, version).document)


def device_capabilities(device: Device) -> BoardCapabilities | None:
    """What the fleet knows the board can run: its newest reported capabilities, else those it sent at
    enrolment, else (an older agent) the class, arch and RAM of its device row. The fleet's hardware class
    for the device (an operator's label, what selectors match) overrides the board's own."""
    caps: BoardCapabilities | None = None
    for doc in ((device.reported or {}).get("capabilities"), device.capabilities):
        if doc:
            try:
                caps = BoardCapabilities.from_obj(doc)
                break
            except SchemaError:
                continue
    if caps is None:
        if not (device.hardware_class or device.cpu_arch or device.ram_bytes):
            return None
        caps = BoardCapabilities(arch=device.cpu_arch, ram_bytes=device.ram_bytes)
    if device.hardware_class:
        caps = caps.model_copy(update={"hardware_class": device.hardware_class})
    return caps


def _registered(session: Session, name: str, version: int) -> bool:
    try:
        registry.get_bundle(session, name, version)
    except NotFoundError:
        return False
    return True


def _refuse(session: Session, dep: Deployment, t: DeploymentTarget, reason: str, now: dt.datetime) -> None:
    move_target(t, TargetEvent.NO_VARIANT)
    t.error, t.finished_at = reason, now
    t.variant = t.bundle_name = t.bundle_version = None
    audit(session, ROLLOUT, "device_unfit", deployment=dep.name, device_id=t.device_id, ts=now, reason=reason)


def start_variants(
    engine: RolloutEngine,
    session: Session,
    dep: Deployment,
    targets: list[DeploymentTarget],
    manifest: DeploymentManifest,
    now: dt.datetime,
    devices: dict[str, Device] | None,
) -> set[str]:
    """Resolve each target's variant, mark those no variant fits, and start the rest, one call of
    ``engine.start_targets`` per chosen bundle. Returns the devices whose desired state changed."""
    assert dep.release_name is not None and dep.release_version is not None
    release = get_release(session, dep.release_name, dep.release_version)
    if devices is None:
        devices = Q.devices_by_id(session, [t.device_id for t in targets])
    present: dict[tuple[str, int], bool] = {}
    groups: dict[tuple[str, int], list[DeploymentTarget]] = {}
    for t in targets:
        device = devices.get(t.device_id)
        if device is None:  # deleted since planned: start_targets records it without sending anything
            groups.setdefault((dep.bundle_name, dep.bundle_version), []).append(t)
            continue
        choice = resolve_variant(device_capabilities(device), release)
        if isinstance(choice, VariantRefusal):
            _refuse(session, dep, t, choice.reason, now)
            continue
        key = (choice.bundle_name, choice.bundle_version)
        if key not in present:
            present[key] = _registered(session, *key)
        if not present[key]:
            _refuse(session, dep, t, f"variant {choice.variant}'s bundle {key[0]}@{key[1]} is not in the registry", now)
            continue
        t.variant, t.bundle_name, t.bundle_version = choice.variant, choice.bundle_name, choice.bundle_version
        audit(
            session,
            ROLLOUT,
            "variant_chosen",
            deployment=dep.name,
            device_id=t.device_id,
            ts=now,
            variant=choice.variant,
            bundle=f"{choice.bundle_name}@{choice.bundle_version}",
        )
        groups.setdefault(key, []).append(t)
    session.flush()
    changed: set[str] = set()
    for key, group in groups.items():
        changed |= engine.start_targets(session, dep, group, manifest, now, devices=devices, bundle=key)
    return changed
