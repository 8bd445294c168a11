"""Planning a deployment: the apply that records it (idempotent, like ``kubectl apply``: the same spec
again changes nothing, a new spec is the next generation), and the plan the engine's first tick makes of
it: which devices the manifest selects, in which waves."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import uuid

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, load_only

from manifests import DeploymentManifest

from .. import registry
from ..audit import audit
from ..db import Deployment, DeploymentTarget, Device
from ..errors import InvalidManifestError, NotFoundError
from .states import (
    DeploymentEvent,
    DeploymentStatus,
    TargetEvent,
    TargetState,
    can_target,
    move_deployment,
    move_target,
)
from .variants import get_release

MAX_VERSION = 2_147_483_647  # bundle versions are positive 32-bit integers everywhere (database columns)


def select_devices(
    session: Session, manifest: DeploymentManifest, enrolled_after: dt.datetime | None = None
) -> list[Device]:
    sel = manifest.spec.selector
    out = []
    # Only what the selector reads: whole rows (reported, telemetry, desired documents) of 10,000 devices
    # cost the apply call more than a second.
    cols = load_only(Device.id, Device.enrolled_at, Device.tags, Device.groups, Device.hardware_class)
    q = select(Device).options(cols).order_by(Device.enrolled_at, Device.id)
    if enrolled_after is not None:
        q = q.where(Device.enrolled_at > enrolled_after)
    for d in session.scalars(q).all():
        if sel.device_ids and d.id not in sel.device_ids:
            continue
        if any((d.tags or {}).get(k) != v for k, v in sel.tags.items()):
            continue
        if sel.groups and not set(sel.groups) & set(d.groups or []):
            continue
        if sel.hardware_class and d.hardware_class not in sel.hardware_class:
            continue
        out.append(d)
    return out


def plan_waves(n: int, manifest: DeploymentManifest) -> list[int]:
    """Wave sizes for ``n`` devices (they sum to n; empty when n == 0)."""
    if n == 0:
        return []
    st = manifest.spec.strategy
    if st.type == "all-at-once":
        return [n]
    if st.type == "canary":
        c = st.canary
        assert c is not None
        first = c.devices if c.devices is not None else math.ceil(n * (c.percent or 0) / 100)
        first = max(1, min(n, first))
        return [first] + ([n - first] if n > first else [])
    w = st.waves
    assert w is not None
    sizes: list[int] = []
    if w.sizes is not None:
        left = n
        for s in w.sizes:
            if left <= 0:
                break
            take = min(s, left)
            sizes.append(take)
            left -= take
        if left > 0:
            sizes.append(left)
    else:
        done = 0
        for pct in w.percent_steps or []:
            upto = min(n, max(done + 1, math.ceil(n * pct / 100)))
            if upto > done:
                sizes.append(upto - done)
                done = upto
        if done < n:
            sizes.append(n - done)
    return sizes


def spec_digest(manifest: DeploymentManifest) -> str:
    return hashlib.sha256(json.dumps(manifest.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def get_deployment(session: Session, name: str) -> Deployment:
    dep = session.scalar(select(Deployment).where(Deployment.name == name))
    if dep is None:
        raise NotFoundError(f"no deployment named {name!r}")
    return dep


def _check_bundle(session: Session, manifest: DeploymentManifest) -> tuple[str, int]:
    """The bundle the deployment sends (for a release: its first variant's; each target gets its own)."""
    spec = manifest.spec
    if spec.release is not None:
        return _check_release(session, manifest)
    assert spec.bundle is not None  # the contract: exactly one of bundle or release
    if spec.bundle.version > MAX_VERSION:
        msg = f"bundle version {spec.bundle.version} is over the maximum {MAX_VERSION}"
        raise InvalidManifestError(msg, [{"path": "spec.bundle.version", "msg": msg}])
    try:
        registry.get_bundle(session, spec.bundle.name, spec.bundle.version)
    except NotFoundError as exc:
        raise InvalidManifestError(exc.message, [{"path": "spec.bundle", "msg": exc.message}]) from exc
    return spec.bundle.name, spec.bundle.version


def _check_release(session: Session, manifest: DeploymentManifest) -> tuple[str, int]:
    sel = manifest.spec.release
    assert sel is not None
    if sel.version > MAX_VERSION:
        msg = f"release version {sel.version} is over the maximum {MAX_VERSION}"
        raise InvalidManifestError(msg, [{"path": "spec.release.version", "msg": msg}])
    try:
        first = get_release(session, sel.name, sel.version).spec.variants[0].bundle
    except NotFoundError as exc:
        raise InvalidManifestError(exc.message, [{"path": "spec.release", "msg": exc.message}]) from exc
    return first.name, first.version


def _supersede(session: Session, dep: Deployment, actor: str, now: dt.datetime) -> int:
    """Replace ``dep`` by its next generation; returns that generation's number."""
    generation = dep.generation + 1
    # The old generation's unfinished targets stop here; its record stays in the audit log.
    for t in dep.targets:
        if can_target(t.state, TargetEvent.CANCEL):
            move_target(t, TargetEvent.CANCEL)
    audit(session, actor, "superseded", deployment=dep.name, generation=dep.generation, ts=now)
    session.delete(dep)
    session.flush()
    return generation


def apply_manifest(
    session: Session, manifest: DeploymentManifest, actor: str, now: dt.datetime, *, plan_up_to: int = 0
) -> tuple[Deployment, str]:
    """Make the manifest the desired state. Returns (deployment, 'created' | 'configured' | 'unchanged').

    Records the deployment as ``planning`` and returns: selecting and recording its targets is the rollout
    engine's first tick (``plan_deployment``), so the apply costs the same at 10 devices and at 10,000.
    Where the fleet has at most ``plan_up_to`` devices (the engine passes its ``start_batch``, the work one
    tick does anyway) the plan is made here at once, and the answer already counts the targets."""
    bundle_name, bundle_version = _check_bundle(session, manifest)
    spec = manifest.spec
    digest = spec_digest(manifest)
    old = session.scalar(select(Deployment).where(Deployment.name == manifest.metadata.name))
    if old is not None and old.spec_sha256 == digest:
        return old, "unchanged"
    result = "configured" if old is not None else "created"
    generation = _supersede(session, old, actor, now) if old is not None else 1
    dep = Deployment(
        id=f"{manifest.metadata.name}.{generation}.{uuid.uuid4().hex[:8]}",
        name=manifest.metadata.name,
        generation=generation,
        manifest=manifest.model_dump(mode="json"),
        spec_sha256=digest,
        bundle_name=bundle_name,
        bundle_version=bundle_version,
        release_name=spec.release.name if spec.release else None,
        release_version=spec.release.version if spec.release else None,
        status=DeploymentStatus.PLANNING.value,
        wave=0,
        waves=0,
        wave_started_at=now,
        created_at=now,
        updated_at=now,
        finished_at=None,
    )
    session.add(dep)
    session.flush()
    planned = None
    if plan_up_to > 0 and (session.scalar(select(func.count()).select_from(Device)) or 0) <= plan_up_to:
        planned = plan_deployment(session, dep, actor, now)
    audit(
        session,
        actor,
        "applied",
        deployment=dep.name,
        ts=now,
        result=result,
        generation=generation,
        bundle=None if spec.release else f"{bundle_name}@{bundle_version}",
        release=f"{spec.release.name}@{spec.release.version}" if spec.release else None,
        devices=None if planned is None else planned[0],
        waves=None if planned is None else planned[1],
        strategy=spec.strategy.type,
    )
    session.flush()
    return dep, result


def plan_deployment(session: Session, dep: Deployment, actor: str, now: dt.datetime) -> tuple[int, list[int]] | None:
    """Select a ``planning`` deployment's devices, split them in waves and record its targets (one
    multi-row INSERT), then move it to ``in_progress`` (or ``completed``: nothing selected). Returns
    (devices, wave sizes), or None where there was nothing to plan.

    A fixed number of statements, whatever the fleet's size, all in the caller's transaction: a server
    that dies mid-plan leaves nothing of it, and the next lease holder plans it from the start. The
    deployment's row is locked and read again first (``SELECT ... FOR UPDATE``; SQLite has one writer
    anyway), so a plan that another server committed meanwhile (a control command on a server without
    the lease, a former lease holder) is never made twice; the unique (deployment, device) key would
    refuse a second copy of a target in any case."""
    session.refresh(dep, with_for_update=True)
    if dep.status != DeploymentStatus.PLANNING.value:
        return None
    manifest = DeploymentManifest.model_validate(dep.manifest)
    devices = select_devices(session, manifest)
    sizes = plan_waves(len(devices), manifest)
    # One multi-row INSERT: 10,000 ORM objects through the unit of work take seconds.
    waves = [w for w, size in enumerate(sizes) for _ in range(size)]
    rows = [
        {"deployment_id": dep.id, "device_id": d.id, "position": pos, "wave": w, "state": TargetState.PENDING.value}
        for pos, (d, w) in enumerate(zip(devices, waves, strict=True))
    ]
    if rows:
        session.execute(insert(DeploymentTarget), rows)
    session.expire(dep, ["targets"])
    move_deployment(dep, DeploymentEvent.PLANNED if devices else DeploymentEvent.NOTHING_SELECTED)
    dep.waves, dep.wave, dep.wave_started_at, dep.updated_at = len(sizes), 0, now, now
    if not devices:
        dep.finished_at = now
    audit(session, actor, "planned", deployment=dep.name, ts=now, devices=len(devices), waves=sizes)
    session.flush()
    return len(devices), sizes


def ensure_planned(session: Session, dep: Deployment, actor: str, now: dt.datetime) -> Deployment:
    """Plan ``dep`` now if it is still ``planning`` (a control action or an offline package needs its
    targets before the engine's first tick came)."""
    if dep.status == DeploymentStatus.PLANNING.value:
        plan_deployment(session, dep, actor, now)
    return dep
