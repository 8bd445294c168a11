"""Typed views of database rows: the REST API's response bodies (``schemas``) built from rows. Commands
build their results with them inside their transaction; the read routes use them too."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session, object_session

from manifests import Release, load_public_key
from manifests import mqtt as contract
from manifests.signing import key_id_of, public_pem

from . import schemas as S
from .db import (
    AuditEntry,
    BundleRecord,
    Deployment,
    DeploymentTarget,
    Device,
    DeviceEvent,
    ReleaseRecord,
    TelemetryRollup,
    TelemetrySample,
    aware,
)
from .env import FleetEnv
from .registry import users_of


def device_out(d: Device) -> S.DeviceOut:
    rep = d.reported or {}
    return S.DeviceOut(
        id=d.id,
        hardware_class=d.hardware_class,
        cpu_arch=d.cpu_arch,
        ram_bytes=d.ram_bytes,
        tags=d.tags or {},
        groups=d.groups or [],
        enrolled_at=aware(d.enrolled_at),  # type: ignore[arg-type]
        last_seen=aware(d.last_seen),
        online=d.online,
        agent_version=d.agent_version,
        model=f"{d.current_name}@{d.current_version}" if d.current_name else None,
        update_state=rep.get("state"),
        reported=d.reported,
        telemetry=d.telemetry,
        desired=d.desired,
    )


def model_out(public_url: str, session: Session, b: BundleRecord) -> S.ModelOut:
    return S.ModelOut(
        name=b.name,
        version=b.version,
        manifest_sha256=b.manifest_sha256,
        key_id=b.key_id,
        total_size=b.total_size,
        created_at=aware(b.created_at),
        summary=b.summary or {},  # type: ignore[arg-type]
        files=[S.BundleFileOut(path=f.path, size=f.size, sha256=f.sha256, role=f.role) for f in b.files],
        base_url=f"{public_url}/bundles/{b.name}/{b.version}",
        in_use_by=users_of(session, b.name, b.version),
    )


def _target_bundle(t: DeploymentTarget) -> str | None:
    """What the device is sent: its variant's bundle, else (a plain deployment, once started) the deployment's."""
    if t.bundle_name is not None:
        return f"{t.bundle_name}@{t.bundle_version}"
    if t.assigned_at is None or t.deployment.release_name is not None:
        return None
    return f"{t.deployment.bundle_name}@{t.deployment.bundle_version}"


def target_out(t: DeploymentTarget) -> S.TargetOut:
    return S.TargetOut(
        device_id=t.device_id,
        wave=t.wave,
        state=t.state,
        variant=t.variant,
        bundle=_target_bundle(t),
        previous=f"{t.previous_name}@{t.previous_version}" if t.previous_name else None,
        assigned_at=aware(t.assigned_at),
        finished_at=aware(t.finished_at),
        error=t.error,
        baseline=t.baseline,
        health=t.health,
    )


def release_out(rec: ReleaseRecord) -> S.ReleaseOut:
    release = Release.from_obj(rec.document)
    return S.ReleaseOut(
        name=rec.name,
        version=rec.version,
        description=release.metadata.description,
        created_at=aware(rec.created_at),  # type: ignore[arg-type]
        variants=[
            S.VariantOut(
                name=v.name,
                bundle=f"{v.bundle.name}@{v.bundle.version}",
                rules=v.rules.model_dump(mode="json", by_alias=True, exclude_defaults=True),
                description=v.description,
            )
            for v in release.spec.variants
        ],
        document=rec.document,
    )


def _target_counts(dep: Deployment, load: bool) -> dict[str, int]:
    """Targets per state. Without the targets themselves (``load`` false, not loaded yet) the database
    counts them: a list of deployments at 10,000 devices each must not load every target row."""
    counts: dict[str, int] = {}
    session = object_session(dep)
    if load or "targets" in dep.__dict__ or session is None:
        for t in dep.targets:
            counts[t.state] = counts.get(t.state, 0) + 1
    else:
        q = select(DeploymentTarget.state, func.count()).where(DeploymentTarget.deployment_id == dep.id)
        counts = {state: n for state, n in session.execute(q.group_by(DeploymentTarget.state))}
    counts["total"] = sum(counts.values())
    return counts


def deployment_out(dep: Deployment, *, targets: bool = True) -> S.DeploymentOut:
    counts = _target_counts(dep, targets)
    return S.DeploymentOut(
        id=dep.id,
        name=dep.name,
        generation=dep.generation,
        bundle=f"{dep.bundle_name}@{dep.bundle_version}",
        release=f"{dep.release_name}@{dep.release_version}" if dep.release_name else None,
        strategy=(dep.manifest.get("spec", {}).get("strategy", {}) or {}).get("type", "all-at-once"),
        status=dep.status,
        wave=dep.wave,
        waves=dep.waves,
        abort_reason=dep.abort_reason,
        created_at=aware(dep.created_at),
        updated_at=aware(dep.updated_at),  # type: ignore[arg-type]
        finished_at=aware(dep.finished_at),
        counts=counts,
        manifest=dep.manifest,
        targets=[target_out(t) for t in dep.targets] if targets else [],
    )


def audit_out(a: AuditEntry) -> S.AuditOut:
    return S.AuditOut(
        id=a.id,
        ts=aware(a.ts),
        actor=a.actor,
        action=a.action,  # type: ignore[arg-type]
        deployment=a.deployment,
        device_id=a.device_id,
        details=a.details or {},
    )


def event_out(r: DeviceEvent) -> S.EventOut:
    return S.EventOut(
        seq=r.seq,
        ts=aware(r.ts),
        kind=r.kind,
        deployment_id=r.deployment_id,  # type: ignore[arg-type]
        payload=r.payload,
    )


def telemetry_points(session: Session, device_id: str, limit: int, bucket_s: int) -> list[S.TelemetryPoint]:
    """Newest first: raw samples within the retention window, then downsampled rollups."""
    raw = session.scalars(
        select(TelemetrySample)
        .where(TelemetrySample.device_id == device_id)
        .order_by(TelemetrySample.ts.desc())
        .limit(limit)
    ).all()
    out = [
        S.TelemetryPoint(
            ts=aware(r.ts),
            resolution="raw",
            model_version=r.model_version,  # type: ignore[arg-type]
            decode_tok_s=r.decode_tok_s,
            ttft_p95_ms=r.ttft_p95_ms,
            requests=r.requests,
            errors=r.errors,
        )
        for r in raw
    ]
    if len(out) < limit:
        rolls = session.scalars(
            select(TelemetryRollup)
            .where(TelemetryRollup.device_id == device_id)
            .order_by(TelemetryRollup.bucket_start.desc())
            .limit(limit - len(out))
        ).all()
        out += [
            S.TelemetryPoint(
                ts=aware(r.bucket_start),
                resolution=f"{bucket_s}s",  # type: ignore[arg-type]
                model_version=r.model_version,
                decode_tok_s=r.decode_tok_s_avg,
                ttft_p95_ms=r.ttft_p95_ms_max,
                requests=r.requests,
                errors=r.errors,
                samples=r.samples,
            )
            for r in rolls
        ]
    return out


def mqtt_credentials(env: FleetEnv, device_id: str, password: str | None) -> S.MqttCredentials:
    return S.MqttCredentials(
        url=env.mqtt_url,
        protocol="3.1.1" if env.config.broker.embedded else None,
        username=device_id,
        password=password,
        topics={
            "desired": contract.desired_topic(device_id),
            "reported": contract.reported_topic(device_id),
            "telemetry": contract.telemetry_topic(device_id),
            "events": contract.events_topic(device_id),
            "status": contract.status_topic(device_id),
        },
    )


def enroll_response(env: FleetEnv, device_id: str, token: str) -> S.EnrollResponse:
    """What a device gets once, at enrolment or rotation: its token and how to reach the fleet."""
    return S.EnrollResponse(
        device_id=device_id,
        device_token=token,
        mqtt=mqtt_credentials(env, device_id, token),
        fleet_url=env.public_url,
        fleet_public_key=env.signing_key.public_pem().decode(),
        fleet_key_id=env.signing_key.key_id,
    )


def enroll_info(env: FleetEnv) -> S.EnrollInfo:
    """The public half of an enrolment: where the broker and the artifacts are, which keys to trust."""
    keys = []
    for path in env.config.trusted_keys:
        key = load_public_key(path)
        keys.append(S.TrustedKeyOut(key_id=key_id_of(key), pem=public_pem(key).decode()))
    return S.EnrollInfo(
        fleet_url=env.public_url,
        mqtt=S.BrokerInfo(url=env.mqtt_url, protocol="3.1.1" if env.config.broker.embedded else None),
        artifacts_base_url=f"{env.public_url}/bundles/",
        trusted_keys=keys,
        fleet_public_key=env.signing_key.public_pem().decode(),
        fleet_key_id=env.signing_key.key_id,
    )


def credentials_out(env: FleetEnv, device_id: str) -> S.CredentialsOut:
    return S.CredentialsOut(
        device_id=device_id,
        mqtt=mqtt_credentials(env, device_id, None),
        fleet_url=env.public_url,
        fleet_public_key=env.signing_key.public_pem().decode(),
        fleet_key_id=env.signing_key.key_id,
    )
