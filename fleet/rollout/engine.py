"""The rollout engine: makes each deployment's plan true, wave by wave, and aborts on bad evidence.

It keeps no state of its own: every decision is re-derived from the database on each ``tick``, so a
service restart (or a SIGKILL) loses no rollout. Per target device::

    pending -> in_flight -> succeeded | failed
    (rollback) rolling_back -> rolled_back | rollback_failed          (skipped: never started)

A deployment is ``in_progress`` -> ``completed``, or stopped by an abort rule or by hand into
``paused`` (resumable), ``aborted`` or ``rolling_back`` -> ``rolled_back``. A re-apply with a new spec
replaces the deployment with its next generation (the audit log keeps the old one's history).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from manifests import DeploymentManifest, SignedDocument, SigningKey
from manifests import mqtt as contract

from .db import AuditEntry, Deployment, DeploymentTarget, Device, TelemetrySample, aware
from .errors import ConflictError, InvalidManifestError, NotFoundError
from .registry import get_bundle

log = logging.getLogger(__name__)

ACTIVE = ("in_progress", "paused", "rolling_back")
TERMINAL_TARGET = ("succeeded", "failed", "skipped", "rolled_back", "rollback_failed")
BASELINE_SAMPLES = 5
MAX_VERSION = 2_147_483_647


@dataclass
class RolloutContext:
    signing_key: SigningKey
    base_url: Callable[[str, int], str]
    now: Callable[[], dt.datetime]
    rollback_validity_s: float = 7 * 24 * 3600


def audit(
    session: Session,
    actor: str,
    action: str,
    *,
    deployment: str | None = None,
    device_id: str | None = None,
    ts: dt.datetime | None = None,
    **details: Any,
) -> None:
    entry = AuditEntry(
        actor=actor, action=action, deployment=deployment, device_id=device_id, details=details
    )
    if ts is not None:
        entry.ts = ts
    session.add(entry)


# --- planning ---------------------------------------------------------------------------------------


def select_devices(
    session: Session, manifest: DeploymentManifest, enrolled_after: dt.datetime | None = None
) -> list[Device]:
    sel = manifest.spec.selector
    out = []
    q = select(Device).order_by(Device.enrolled_at, Device.id)
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


def apply_manifest(
    session: Session, manifest: DeploymentManifest, actor: str, now: dt.datetime
) -> tuple[Deployment, str]:
    """Make the manifest the desired state. Returns (deployment, 'created' | 'configured' | 'unchanged')."""
    spec = manifest.spec
    if spec.bundle.version > MAX_VERSION:
        msg = f"bundle version {spec.bundle.version} is over the maximum {MAX_VERSION}"
        raise InvalidManifestError(msg, [{"path": "spec.bundle.version", "msg": msg}])
    try:
        get_bundle(session, spec.bundle.name, spec.bundle.version)
    except NotFoundError as exc:
        raise InvalidManifestError(exc.message, [{"path": "spec.bundle", "msg": exc.message}]) from exc
    digest = spec_digest(manifest)
    dep = session.scalar(select(Deployment).where(Deployment.name == manifest.metadata.name))
    if dep is not None and dep.spec_sha256 == digest:
        return dep, "unchanged"
    result = "created"
    if dep is not None:
        result = "configured"
        generation = dep.generation + 1
        # The old generation's unfinished targets stop here; its record stays in the audit log.
        for t in dep.targets:
            if t.state in ("pending",):
                t.state = "skipped"
        audit(session, actor, "superseded", deployment=dep.name, generation=dep.generation, ts=now)
        session.delete(dep)
        session.flush()
    else:
        generation = 1
    devices = select_devices(session, manifest)
    sizes = plan_waves(len(devices), manifest)
    dep = Deployment(
        id=f"{manifest.metadata.name}.{generation}.{uuid.uuid4().hex[:8]}",
        name=manifest.metadata.name,
        generation=generation,
        manifest=manifest.model_dump(mode="json"),
        spec_sha256=digest,
        bundle_name=spec.bundle.name,
        bundle_version=spec.bundle.version,
        status="in_progress" if devices else "completed",
        wave=0,
        waves=len(sizes),
        wave_started_at=now,
        created_at=now,
        updated_at=now,
        finished_at=None if devices else now,
    )
    pos = 0
    for wave, size in enumerate(sizes):
        for _ in range(size):
            d = devices[pos]
            dep.targets.append(DeploymentTarget(device_id=d.id, position=pos, wave=wave, state="pending"))
            pos += 1
    session.add(dep)
    audit(
        session,
        actor,
        "applied",
        deployment=dep.name,
        ts=now,
        result=result,
        generation=generation,
        bundle=f"{spec.bundle.name}@{spec.bundle.version}",
        devices=len(devices),
        waves=sizes,
        strategy=spec.strategy.type,
    )
    session.flush()
    return dep, result


def get_deployment(session: Session, name: str) -> Deployment:
    dep = session.scalar(select(Deployment).where(Deployment.name == name))
    if dep is None:
        raise NotFoundError(f"no deployment named {name!r}")
    return dep


# --- the engine -------------------------------------------------------------------------------------


class RolloutEngine:
    def __init__(self, ctx: RolloutContext) -> None:
        self.ctx = ctx

    # Desired state ---------------------------------------------------------------------------------
    def _set_desired(
        self,
        session: Session,
        device: Device,
        command_id: str,
        name: str,
        version: int,
        rollback: SignedDocument | None,
        now: dt.datetime,
    ) -> None:
        bundle = get_bundle(session, name, version)
        desired = contract.DesiredState(
            device_id=device.id,
            deployment_id=command_id,
            bundle=contract.BundleRef(
                name=name,
                version=version,
                manifest_sha256=bundle.manifest_sha256,
                base_url=self.ctx.base_url(name, version),
            ),
            rollback=rollback,
            issued_at=now,
        )
        device.desired = json.loads(desired.to_bytes())
        device.desired_at = now

    def _rollback_doc(
        self, command_id: str, name: str, version: int, device_id: str, now: dt.datetime
    ) -> SignedDocument:
        auth = contract.RollbackAuthorization(
            deployment_id=command_id,
            name=name,
            version=version,
            device_ids=[device_id],
            expires_at=now + dt.timedelta(seconds=self.ctx.rollback_validity_s),
        )
        return SignedDocument.sign(auth, self.ctx.signing_key)

    # Tick ------------------------------------------------------------------------------------------
    def tick(self, session: Session) -> set[str]:
        """Advance every active deployment; returns ids of devices whose desired state changed."""
        now = self.ctx.now()
        changed: set[str] = set()
        deps = session.scalars(
            select(Deployment).where(Deployment.status.in_(("in_progress", "rolling_back")))
        ).all()
        for dep in deps:
            # Each deployment in its own savepoint: a bug or bad data in one never stalls the others.
            try:
                with session.begin_nested():
                    if dep.status == "in_progress":
                        changed |= self._advance(session, dep, now)
                    elif dep.status == "rolling_back":
                        self._watch_rollback(session, dep, now)
            except Exception:  # noqa: BLE001 - logged; retried next tick
                log.exception("rollout tick of deployment %s failed", dep.name)
        return changed

    def _outcome(self, device: Device | None, command_id: str | None) -> tuple[str, str | None] | None:
        """('ok'|'failed', error) once the device reported a result for ``command_id``."""
        if device is None or device.reported is None or command_id is None:
            return None
        rep = device.reported
        if rep.get("deployment_id") != command_id:
            return None
        result = rep.get("last_result")
        if result == "committed" or (result is None and rep.get("state") == "committed"):
            return "ok", None
        if result in ("failed", "rolled_back", "refused"):
            return "failed", f"{result}: {rep.get('error') or 'no detail'}"
        return None

    def _advance(self, session: Session, dep: Deployment, now: dt.datetime) -> set[str]:
        manifest = DeploymentManifest.model_validate(dep.manifest)
        rules = manifest.spec.abort
        strategy = manifest.spec.strategy
        changed: set[str] = set()
        devices = {
            d.id: d
            for d in session.scalars(
                select(Device).where(Device.id.in_([t.device_id for t in dep.targets]))
            ).all()
        }

        # 1. Results reported by devices in flight.
        for t in dep.targets:
            if t.state != "in_flight":
                continue
            outcome = self._outcome(devices.get(t.device_id), t.command_id)
            if outcome is None:
                if (
                    rules.convergence_timeout_s
                    and t.assigned_at
                    and (now - aware(t.assigned_at)).total_seconds() > rules.convergence_timeout_s
                ):  # type: ignore[operator]
                    t.state, t.finished_at = "failed", now
                    t.error = f"did not converge within {rules.convergence_timeout_s:g}s"
                    audit(
                        session,
                        "rollout",
                        "device_timeout",
                        deployment=dep.name,
                        device_id=t.device_id,
                        ts=now,
                    )
                    return changed | self._abort(session, dep, f"device {t.device_id} {t.error}", now)
                continue
            kind, error = outcome
            t.state, t.finished_at, t.error = ("succeeded" if kind == "ok" else "failed"), now, error
            audit(
                session,
                "rollout",
                f"device_{t.state}",
                deployment=dep.name,
                device_id=t.device_id,
                ts=now,
                error=error,
            )

        # 2. Failure rate.
        done = [t for t in dep.targets if t.state in ("succeeded", "failed")]
        failed = [t for t in done if t.state == "failed"]
        if rules.failure_rate_pct is not None and len(done) >= rules.min_devices and failed:
            rate = 100.0 * len(failed) / len(done)
            if rate >= rules.failure_rate_pct:
                return changed | self._abort(
                    session,
                    dep,
                    f"failure rate {rate:.0f}% ({len(failed)}/{len(done)}) >= {rules.failure_rate_pct:g}%",
                    now,
                )

        # 3. Health of the devices already on the new model, against their previous model.
        for t in dep.targets:
            if t.state != "succeeded":
                continue
            problem = self._health(session, dep, t, rules)
            if problem:
                audit(
                    session,
                    "rollout",
                    "health_regression",
                    deployment=dep.name,
                    device_id=t.device_id,
                    ts=now,
                    problem=problem,
                )
                return changed | self._abort(session, dep, f"device {t.device_id}: {problem}", now)

        # 4. Devices enrolled since the apply that match the selector join the last wave.
        self._adopt_new_devices(session, dep, manifest, now)

        # 5. Start devices of the current wave, at most max_in_flight at once.
        wave_targets = [t for t in dep.targets if t.wave == dep.wave]
        in_flight = sum(1 for t in dep.targets if t.state == "in_flight")
        cap = strategy.max_in_flight or len(dep.targets)
        for t in wave_targets:
            if t.state != "pending" or in_flight >= cap:
                continue
            changed.add(self._start_target(session, dep, t, devices.get(t.device_id), manifest, now))
            in_flight += 1

        # 6. Wave converged? Soak, then the next wave (or done).
        if all(t.state in TERMINAL_TARGET for t in wave_targets):
            if dep.wave_converged_at is None:
                dep.wave_converged_at = now
                audit(
                    session,
                    "rollout",
                    "wave_converged",
                    deployment=dep.name,
                    ts=now,
                    wave=dep.wave,
                    succeeded=sum(t.state == "succeeded" for t in wave_targets),
                    failed=sum(t.state == "failed" for t in wave_targets),
                )
            elif (now - aware(dep.wave_converged_at)).total_seconds() >= strategy.wait_seconds:  # type: ignore[operator]
                if dep.wave + 1 >= dep.waves:
                    dep.status, dep.finished_at = "completed", now
                    audit(session, "rollout", "completed", deployment=dep.name, ts=now)
                else:
                    dep.wave += 1
                    dep.wave_started_at, dep.wave_converged_at = now, None
                    audit(session, "rollout", "wave_started", deployment=dep.name, ts=now, wave=dep.wave)
                    changed |= self._advance(session, dep, now)
        dep.updated_at = now
        return changed

    def _adopt_new_devices(
        self, session: Session, dep: Deployment, manifest: DeploymentManifest, now: dt.datetime
    ) -> None:
        known = {t.device_id for t in dep.targets}
        fresh = [d for d in select_devices(session, manifest, aware(dep.created_at)) if d.id not in known]
        if not fresh:
            return
        last_wave = max(dep.waves - 1, dep.wave)
        pos = max((t.position for t in dep.targets), default=-1) + 1
        for i, d in enumerate(fresh):
            dep.targets.append(
                DeploymentTarget(device_id=d.id, position=pos + i, wave=last_wave, state="pending")
            )
            audit(
                session,
                "rollout",
                "device_joined",
                deployment=dep.name,
                device_id=d.id,
                ts=now,
                wave=last_wave,
            )
        if dep.wave == last_wave:
            dep.wave_converged_at = None  # the wave has work again

    def _start_target(
        self,
        session: Session,
        dep: Deployment,
        t: DeploymentTarget,
        device: Device | None,
        manifest: DeploymentManifest,
        now: dt.datetime,
    ) -> str:
        # The newest deployment to reach a device owns it: older active deployments let go of it, so they
        # neither wait for it nor later overwrite its desired state.
        others = session.scalars(
            select(DeploymentTarget)
            .join(Deployment)
            .where(
                DeploymentTarget.device_id == t.device_id,
                DeploymentTarget.deployment_id != dep.id,
                DeploymentTarget.state.in_(("pending", "in_flight")),
                Deployment.status.in_(ACTIVE),
            )
        ).all()
        for o in others:
            o.state, o.error, o.finished_at = "skipped", f"taken over by deployment {dep.name}", now
            audit(
                session,
                "rollout",
                "device_taken_over",
                deployment=o.deployment.name,
                device_id=o.device_id,
                ts=now,
                by=dep.name,
            )
        # A retried device needs a fresh command id: agents deduplicate commands by it.
        t.command_id = dep.id if t.command_id is None else f"{dep.id}.retry-{uuid.uuid4().hex[:6]}"
        t.assigned_at = now
        t.state = "in_flight"
        if device is not None:
            t.previous_name, t.previous_version = device.current_name, device.current_version
            t.baseline = self._baseline(session, device)
            rollback = None
            if manifest.spec.rollback:
                rollback = self._rollback_doc(
                    t.command_id, dep.bundle_name, dep.bundle_version, device.id, now
                )
            self._set_desired(
                session, device, t.command_id, dep.bundle_name, dep.bundle_version, rollback, now
            )
        audit(
            session,
            "rollout",
            "device_started",
            deployment=dep.name,
            device_id=t.device_id,
            ts=now,
            wave=t.wave,
            previous=f"{t.previous_name}@{t.previous_version}" if t.previous_name else None,
        )
        return t.device_id

    def _baseline(self, session: Session, device: Device) -> dict[str, Any] | None:
        if device.current_version is None:
            return None
        rows = session.scalars(
            select(TelemetrySample)
            .where(
                TelemetrySample.device_id == device.id,
                TelemetrySample.model_version == device.current_version,
                TelemetrySample.model_name == device.current_name,
            )
            .order_by(TelemetrySample.ts.desc())
            .limit(BASELINE_SAMPLES)
        ).all()
        decode = [r.decode_tok_s for r in rows if r.decode_tok_s]
        ttft = [r.ttft_p95_ms for r in rows if r.ttft_p95_ms]
        if not decode and not ttft:
            return None
        return {
            "decode_tok_s": sum(decode) / len(decode) if decode else None,
            "ttft_p95_ms": sum(ttft) / len(ttft) if ttft else None,
            "samples": len(rows),
        }

    def _health(self, session: Session, dep: Deployment, t: DeploymentTarget, rules: Any) -> str | None:
        if not (rules.max_decode_drop_pct or rules.max_error_rate is not None or rules.ttft_p95_budget_ms):
            return None
        q = select(TelemetrySample).where(
            TelemetrySample.device_id == t.device_id,
            TelemetrySample.model_name == dep.bundle_name,
            TelemetrySample.model_version == dep.bundle_version,
        )
        if t.finished_at is not None:
            q = q.where(TelemetrySample.ts >= aware(t.finished_at) - dt.timedelta(seconds=5))  # type: ignore[operator]
        latest = session.scalars(q.order_by(TelemetrySample.ts.desc()).limit(BASELINE_SAMPLES)).all()
        if not latest:
            return None
        newest = latest[0]
        health: dict[str, Any] = {"samples": len(latest)}
        problem = None
        decode = [r.decode_tok_s for r in latest if r.decode_tok_s]
        if rules.max_decode_drop_pct and decode and t.baseline and t.baseline.get("decode_tok_s"):
            base = t.baseline["decode_tok_s"]
            now_tps = sum(decode) / len(decode)
            drop = 100.0 * (base - now_tps) / base
            health["decode_drop_pct"] = round(drop, 2)
            if drop > rules.max_decode_drop_pct:
                problem = (
                    f"decode {now_tps:.1f} tok/s is {drop:.0f}% below {base:.1f} tok/s on its previous "
                    f"model (limit {rules.max_decode_drop_pct:g}%)"
                )
        if problem is None and rules.max_error_rate is not None:
            rate = self._error_rate(session, t, list(reversed(latest)))
            if rate is not None:
                health["error_rate"] = round(rate, 4)
                if rate > rules.max_error_rate:
                    problem = f"error rate {rate:.2%} on the new model, over {rules.max_error_rate:.2%}"
        if problem is None and rules.ttft_p95_budget_ms and newest.ttft_p95_ms is not None:
            health["ttft_p95_ms"] = newest.ttft_p95_ms
            if newest.ttft_p95_ms > rules.ttft_p95_budget_ms:
                problem = (
                    f"TTFT p95 {newest.ttft_p95_ms:.0f} ms over the {rules.ttft_p95_budget_ms:g} ms budget"
                )
        t.health = health
        return problem

    def _error_rate(self, session: Session, t: DeploymentTarget, new: list[TelemetrySample]) -> float | None:
        """Errors per request on the new model. Agents send counters cumulative since they started; a
        counter that went down (agent restart, or a per-interval sender) falls back to summing samples."""
        anchor = None
        if t.finished_at is not None:
            anchor = session.scalars(
                select(TelemetrySample)
                .where(TelemetrySample.device_id == t.device_id, TelemetrySample.ts < new[0].ts)
                .order_by(TelemetrySample.ts.desc())
                .limit(1)
            ).first()
        series = ([anchor] if anchor is not None else []) + new
        cumulative = all(
            b.requests >= a.requests and b.errors >= a.errors
            for a, b in zip(series, series[1:], strict=False)
        )
        if cumulative and anchor is not None:
            requests, errors = new[-1].requests - anchor.requests, new[-1].errors - anchor.errors
        elif cumulative:
            requests, errors = new[-1].requests, new[-1].errors
        else:
            requests, errors = sum(x.requests for x in new), sum(x.errors for x in new)
        return errors / requests if requests > 0 else None

    # Abort, rollback, manual control ---------------------------------------------------------------
    def _abort(self, session: Session, dep: Deployment, reason: str, now: dt.datetime) -> set[str]:
        manifest = DeploymentManifest.model_validate(dep.manifest)
        dep.abort_reason = reason
        dep.updated_at = now
        audit(
            session,
            "rollout",
            "abort",
            deployment=dep.name,
            ts=now,
            reason=reason,
            on_abort=manifest.spec.abort.on_abort,
        )
        log.warning("deployment %s aborted: %s", dep.name, reason)
        if manifest.spec.abort.on_abort == "rollback":
            return self.rollback(session, dep, "rollout", now)
        dep.status = "paused"
        return set()

    def rollback(self, session: Session, dep: Deployment, actor: str, now: dt.datetime) -> set[str]:
        """Send every device this deployment touched back to its previous model, with a signed rollback."""
        if dep.status in ("rolled_back", "rolling_back", "superseded"):
            raise ConflictError(f"deployment {dep.name} is already {dep.status}")
        changed: set[str] = set()
        command_id = f"{dep.id}.rollback"
        devices = {
            d.id: d
            for d in session.scalars(
                select(Device).where(Device.id.in_([t.device_id for t in dep.targets]))
            ).all()
        }
        for t in dep.targets:
            if t.state == "pending":
                t.state = "skipped"
                continue
            if t.state not in ("in_flight", "succeeded", "failed"):
                continue
            device = devices.get(t.device_id)
            if device is None or t.previous_name is None or t.previous_version is None:
                t.state, t.error = "rollback_failed", "no previous model to return to"
                continue
            doc = self._rollback_doc(command_id, t.previous_name, t.previous_version, device.id, now)
            try:
                self._set_desired(session, device, command_id, t.previous_name, t.previous_version, doc, now)
            except NotFoundError as exc:
                t.state, t.error = "rollback_failed", exc.message
                continue
            t.state, t.command_id, t.assigned_at, t.finished_at = "rolling_back", command_id, now, None
            changed.add(device.id)
        dep.status = "rolling_back" if changed else "rolled_back"
        if not changed:
            dep.finished_at = now
        dep.updated_at = now
        audit(session, actor, "rollback", deployment=dep.name, ts=now, devices=sorted(changed))
        return changed

    def _watch_rollback(self, session: Session, dep: Deployment, now: dt.datetime) -> None:
        manifest = DeploymentManifest.model_validate(dep.manifest)
        timeout = manifest.spec.abort.convergence_timeout_s
        devices = {
            d.id: d
            for d in session.scalars(
                select(Device).where(Device.id.in_([t.device_id for t in dep.targets]))
            ).all()
        }
        for t in dep.targets:
            if t.state != "rolling_back":
                continue
            device = devices.get(t.device_id)
            outcome = self._outcome(device, t.command_id)
            if (
                outcome is None
                and device is not None
                and device.current_name == t.previous_name
                and device.current_version == t.previous_version
                and device.reported
                and device.reported.get("state") in ("idle", "committed")
                and device.reported.get("deployment_id") != dep.id
            ):
                # The agent rolled itself back to the previous model already (e.g. a failed golden check).
                outcome = ("ok", None)
            if outcome is None:
                if timeout and t.assigned_at and (now - aware(t.assigned_at)).total_seconds() > timeout:  # type: ignore[operator]
                    outcome = ("failed", f"rollback did not converge within {timeout:g}s")
                else:
                    continue
            kind, error = outcome
            t.state = "rolled_back" if kind == "ok" else "rollback_failed"
            t.finished_at, t.error = now, error or t.error
            audit(session, "rollout", f"device_{t.state}", deployment=dep.name, device_id=t.device_id, ts=now)
        if not any(t.state == "rolling_back" for t in dep.targets):
            dep.status, dep.finished_at, dep.updated_at = "rolled_back", now, now
            audit(session, "rollout", "rolled_back", deployment=dep.name, ts=now)

    def pause(self, session: Session, dep: Deployment, actor: str, now: dt.datetime) -> None:
        if dep.status != "in_progress":
            raise ConflictError(f"deployment {dep.name} is {dep.status}, not in_progress")
        dep.status, dep.updated_at = "paused", now
        audit(session, actor, "pause", deployment=dep.name, ts=now)

    def resume(self, session: Session, dep: Deployment, actor: str, now: dt.datetime) -> None:
        """Continue a paused deployment; devices that failed or timed out are tried again."""
        if dep.status != "paused":
            raise ConflictError(f"deployment {dep.name} is {dep.status}, not paused")
        retried = []
        for t in dep.targets:
            if t.state == "failed":
                t.state, t.error, t.finished_at, t.assigned_at = "pending", None, None, None
                retried.append(t.device_id)
        dep.status, dep.abort_reason, dep.updated_at, dep.wave_converged_at = "in_progress", None, now, None
        audit(session, actor, "resume", deployment=dep.name, ts=now, retried=retried)

    def abort(self, session: Session, dep: Deployment, actor: str, now: dt.datetime) -> None:
        """Stop for good: nothing more is started; devices keep what they have."""
        if dep.status not in ("in_progress", "paused"):
            raise ConflictError(
                f"deployment {dep.name} is {dep.status}; only in_progress or paused can abort"
            )
        for t in dep.targets:
            if t.state == "pending":
                t.state = "skipped"
        dep.status, dep.finished_at, dep.updated_at = "aborted", now, now
        dep.abort_reason = dep.abort_reason or f"aborted by {actor}"
        audit(session, actor, "abort", deployment=dep.name, ts=now)
