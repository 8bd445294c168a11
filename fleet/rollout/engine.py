"""The rollout engine: makes each deployment's plan true, wave by wave, and aborts on bad evidence.

It keeps no state of its own: every decision is re-derived from the database on each ``tick``, so a
service restart (or a SIGKILL) loses no rollout. Statuses and states move only through the tables in
``states``. One tick of an ``in_progress`` deployment runs these phases, each its own method:

1. ``_collect_results``: results reported by devices in flight (and the convergence timeout);
2. ``_check_rules``: the deployment-wide abort rules (``rules.ABORT_RULES``);
3. ``_adopt_new_devices``: devices enrolled since the apply that match the selector join the last wave;
4. ``_start_wave``: start devices of the current wave, at most ``max_in_flight`` at once;
5. ``_finish_wave``: wave converged? soak, then the next wave (or completed).

A ``rolling_back`` deployment is watched by ``_watch_rollback``. A re-apply with a new spec replaces the
deployment with its next generation (``planning.apply_manifest``; the audit log keeps the old history).
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from manifests import DeploymentManifest, SignedDocument

from ..audit import audit
from ..db import Deployment, DeploymentTarget, Device, aware
from ..errors import NotFoundError
from . import reports
from .desired import DesiredStates, RolloutContext
from .health import baseline
from .planning import select_devices
from .rules import ABORT_RULES, Abort, timed_out
from .states import (
    ACTIVE,
    SETTLED,
    TICKED,
    DeploymentEvent,
    DeploymentStatus,
    TargetEvent,
    TargetState,
    can_target,
    move_deployment,
    move_target,
    next_status,
    states_allowing,
)

log = logging.getLogger(__name__)
ROLLOUT = "rollout"  # the actor of every decision the engine makes on its own


class ControlAction(str, enum.Enum):
    """What an operator may do to a deployment (the URL segment of the REST API and the dashboard)."""

    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK = "rollback"

    @property
    def event(self) -> DeploymentEvent:
        return _CONTROL_EVENTS[self]


_CONTROL_EVENTS = {
    ControlAction.PAUSE: DeploymentEvent.PAUSE,
    ControlAction.RESUME: DeploymentEvent.RESUME,
    ControlAction.ABORT: DeploymentEvent.ABORT,
    ControlAction.ROLLBACK: DeploymentEvent.ROLL_BACK,
}


@dataclass
class _Tick:
    """One tick of one deployment: what every phase reads, and the devices whose desired state changed."""

    session: Session
    dep: Deployment
    manifest: DeploymentManifest
    devices: dict[str, Device]
    now: dt.datetime
    changed: set[str] = field(default_factory=set)


def _devices_of(session: Session, dep: Deployment) -> dict[str, Device]:
    ids = [t.device_id for t in dep.targets]
    return {d.id: d for d in session.scalars(select(Device).where(Device.id.in_(ids))).all()}


class RolloutEngine:
    def __init__(self, ctx: RolloutContext) -> None:
        self.ctx = ctx
        self.desired = DesiredStates(ctx)

    # Tick ------------------------------------------------------------------------------------------
    def tick(self, session: Session) -> set[str]:
        """Advance every active deployment; returns ids of devices whose desired state changed."""
        now = self.ctx.now()
        changed: set[str] = set()
        phases: dict[str, Callable[[Session, Deployment, dt.datetime], set[str]]] = {
            DeploymentStatus.IN_PROGRESS.value: self._advance,
            DeploymentStatus.ROLLING_BACK.value: self._watch_rollback,
        }
        deps = session.scalars(select(Deployment).where(Deployment.status.in_([s.value for s in TICKED]))).all()
        for dep in deps:
            # Each deployment in its own savepoint: a bug or bad data in one never stalls the others.
            try:
                with session.begin_nested():
                    changed |= phases[dep.status](session, dep, now)
            except Exception:  # noqa: BLE001 - logged; retried next tick
                log.exception("rollout tick of deployment %s failed", dep.name)
        return changed

    def _advance(self, session: Session, dep: Deployment, now: dt.datetime) -> set[str]:
        manifest = DeploymentManifest.model_validate(dep.manifest)
        run = _Tick(session, dep, manifest, _devices_of(session, dep), now)
        abort = self._collect_results(run) or self._check_rules(run)
        if abort is not None:
            return run.changed | self._abort(session, dep, abort, now)
        self._adopt_new_devices(run)
        self._start_wave(run)
        if self._finish_wave(run):
            # The next wave starts in this same tick.
            run.changed |= self._advance(session, dep, now)
        dep.updated_at = now
        return run.changed

    def _collect_results(self, run: _Tick) -> Abort | None:
        """Phase 1: record each in-flight device's reported result; a device past the convergence
        timeout fails and aborts the deployment at once."""
        rules = run.manifest.spec.abort
        for t in run.dep.targets:
            if t.state != TargetState.IN_FLIGHT:
                continue
            outcome = reports.command_outcome(run.devices.get(t.device_id), t.command_id)
            if outcome is None:
                error = timed_out(t, rules, run.now)
                if error is None:
                    continue
                move_target(t, TargetEvent.TIMED_OUT)
                t.finished_at, t.error = run.now, error
                audit(
                    run.session,
                    ROLLOUT,
                    "device_timeout",
                    deployment=run.dep.name,
                    device_id=t.device_id,
                    ts=run.now,
                )
                return Abort(f"device {t.device_id} {error}")
            kind, error = outcome
            ok = kind is reports.Outcome.OK
            move_target(t, TargetEvent.SUCCEEDED if ok else TargetEvent.FAILED)
            t.finished_at, t.error = run.now, error
            audit(
                run.session,
                ROLLOUT,
                f"device_{t.state}",
                deployment=run.dep.name,
                device_id=t.device_id,
                ts=run.now,
                error=error,
            )
        return None

    def _check_rules(self, run: _Tick) -> Abort | None:
        """Phase 2: the first deployment-wide abort rule that fires, with its evidence in the audit log."""
        rules = run.manifest.spec.abort
        for rule in ABORT_RULES:
            abort = rule(run.session, run.dep, rules)
            if abort is None:
                continue
            if abort.audit_action:
                audit(
                    run.session,
                    ROLLOUT,
                    abort.audit_action,
                    deployment=run.dep.name,
                    device_id=abort.device_id,
                    ts=run.now,
                    **abort.details,
                )
            return abort
        return None

    def _adopt_new_devices(self, run: _Tick) -> None:
        """Phase 3: devices enrolled since the apply that match the selector join the last wave."""
        dep = run.dep
        known = {t.device_id for t in dep.targets}
        fresh = [d for d in select_devices(run.session, run.manifest, aware(dep.created_at)) if d.id not in known]
        if not fresh:
            return
        last_wave = max(dep.waves - 1, dep.wave)
        pos = max((t.position for t in dep.targets), default=-1) + 1
        for i, d in enumerate(fresh):
            dep.targets.append(
                DeploymentTarget(device_id=d.id, position=pos + i, wave=last_wave, state=TargetState.PENDING.value)
            )
            audit(
                run.session,
                ROLLOUT,
                "device_joined",
                deployment=dep.name,
                device_id=d.id,
                ts=run.now,
                wave=last_wave + 1,  # audit details count waves from 1, as the dashboard and CLI show them
            )
        if dep.wave == last_wave:
            dep.wave_converged_at = None  # the wave has work again

    def _start_wave(self, run: _Tick) -> None:
        """Phase 4: start pending devices of the current wave, at most ``max_in_flight`` at once."""
        dep = run.dep
        in_flight = sum(1 for t in dep.targets if t.state == TargetState.IN_FLIGHT)
        cap = run.manifest.spec.strategy.max_in_flight or len(dep.targets)
        for t in dep.targets:
            if t.wave != dep.wave or t.state != TargetState.PENDING or in_flight >= cap:
                continue
            run.changed.add(self.start_target(run.session, dep, t, run.devices.get(t.device_id), run.manifest, run.now))
            in_flight += 1

    def _finish_wave(self, run: _Tick) -> bool:
        """Phase 5: once every device of the wave settled, soak ``wait_seconds``, then complete or move
        to the next wave. True when a next wave started."""
        dep, now = run.dep, run.now
        wave_targets = [t for t in dep.targets if t.wave == dep.wave]
        if not all(t.state in SETTLED for t in wave_targets):
            return False
        if dep.wave_converged_at is None:
            dep.wave_converged_at = now
            audit(
                run.session,
                ROLLOUT,
                "wave_converged",
                deployment=dep.name,
                ts=now,
                wave=dep.wave + 1,
                succeeded=sum(t.state == TargetState.SUCCEEDED for t in wave_targets),
                failed=sum(t.state == TargetState.FAILED for t in wave_targets),
            )
            return False
        soaked = (now - aware(dep.wave_converged_at)).total_seconds()  # type: ignore[operator]
        if soaked < run.manifest.spec.strategy.wait_seconds:
            return False
        if dep.wave + 1 >= dep.waves:
            move_deployment(dep, DeploymentEvent.COMPLETE)
            dep.finished_at = now
            audit(run.session, ROLLOUT, "completed", deployment=dep.name, ts=now)
            return False
        dep.wave += 1
        dep.wave_started_at, dep.wave_converged_at = now, None
        audit(run.session, ROLLOUT, "wave_started", deployment=dep.name, ts=now, wave=dep.wave + 1)
        return True

    # Starting a device (public: offline packages start devices exactly as the rollout does) ----------
    def start_target(
        self,
        session: Session,
        dep: Deployment,
        t: DeploymentTarget,
        device: Device | None,
        manifest: DeploymentManifest,
        now: dt.datetime,
    ) -> str:
        """Give a pending target's device this deployment's bundle; returns its device id."""
        # The newest deployment to reach a device owns it: older active deployments let go of it, so they
        # neither wait for it nor later overwrite its desired state.
        others = session.scalars(
            select(DeploymentTarget)
            .join(Deployment)
            .where(
                DeploymentTarget.device_id == t.device_id,
                DeploymentTarget.deployment_id != dep.id,
                DeploymentTarget.state.in_(states_allowing(TargetEvent.TAKEN_OVER)),
                Deployment.status.in_([s.value for s in ACTIVE]),
            )
        ).all()
        for o in others:
            move_target(o, TargetEvent.TAKEN_OVER)
            o.error, o.finished_at = f"taken over by deployment {dep.name}", now
            audit(
                session,
                ROLLOUT,
                "device_taken_over",
                deployment=o.deployment.name,
                device_id=o.device_id,
                ts=now,
                by=dep.name,
            )
        # A retried device needs a fresh command id: agents deduplicate commands by it.
        t.command_id = dep.id if t.command_id is None else f"{dep.id}.retry-{uuid.uuid4().hex[:6]}"
        t.assigned_at = now
        move_target(t, TargetEvent.START)
        if device is not None:
            t.previous_name, t.previous_version = device.current_name, device.current_version
            t.baseline = baseline(session, device)
            rollback = None
            if manifest.spec.rollback:
                rollback = self.sign_rollback(t.command_id, dep.bundle_name, dep.bundle_version, device.id, now)
            self.desired.set(session, device, t.command_id, dep.bundle_name, dep.bundle_version, rollback, now)
        audit(
            session,
            ROLLOUT,
            "device_started",
            deployment=dep.name,
            device_id=t.device_id,
            ts=now,
            wave=t.wave + 1,
            previous=f"{t.previous_name}@{t.previous_version}" if t.previous_name else None,
        )
        return t.device_id

    def sign_rollback(
        self, command_id: str, name: str, version: int, device_id: str, now: dt.datetime
    ) -> SignedDocument:
        """The fleet-signed authorisation to install ``name@version`` (see ``DesiredStates``)."""
        return self.desired.sign_rollback(command_id, name, version, device_id, now)

    # Abort, rollback, manual control ---------------------------------------------------------------
    def _abort(self, session: Session, dep: Deployment, abort: Abort, now: dt.datetime) -> set[str]:
        manifest = DeploymentManifest.model_validate(dep.manifest)
        dep.abort_reason = abort.reason
        dep.updated_at = now
        audit(
            session,
            ROLLOUT,
            "abort",
            deployment=dep.name,
            ts=now,
            reason=abort.reason,
            on_abort=manifest.spec.abort.on_abort,
        )
        log.warning("deployment %s aborted: %s", dep.name, abort.reason)
        if manifest.spec.abort.on_abort == "rollback":
            return self.rollback(session, dep, ROLLOUT, now)
        move_deployment(dep, DeploymentEvent.PAUSE)
        return set()

    def control(
        self, session: Session, dep: Deployment, action: ControlAction, actor: str, now: dt.datetime
    ) -> set[str]:
        """An operator's pause | resume | abort | rollback; returns the devices whose desired state changed."""
        if action is ControlAction.ROLLBACK:
            return self.rollback(session, dep, actor, now)
        if action is ControlAction.PAUSE:
            self.pause(session, dep, actor, now)
        elif action is ControlAction.RESUME:
            self.resume(session, dep, actor, now)
        else:
            self.abort(session, dep, actor, now)
        return set()

    def rollback(self, session: Session, dep: Deployment, actor: str, now: dt.datetime) -> set[str]:
        """Send every device this deployment touched back to its previous model, with a signed rollback."""
        next_status(dep.status, DeploymentEvent.ROLL_BACK, dep.name)  # refuse before changing anything
        changed: set[str] = set()
        command_id = f"{dep.id}.rollback"
        devices = _devices_of(session, dep)
        for t in dep.targets:
            if can_target(t.state, TargetEvent.CANCEL):
                move_target(t, TargetEvent.CANCEL)
                continue
            if not can_target(t.state, TargetEvent.ROLL_BACK):
                continue
            device = devices.get(t.device_id)
            if device is None or t.previous_name is None or t.previous_version is None:
                move_target(t, TargetEvent.CANNOT_ROLL_BACK)
                t.error = "no previous model to return to"
                continue
            doc = self.sign_rollback(command_id, t.previous_name, t.previous_version, device.id, now)
            try:
                self.desired.set(session, device, command_id, t.previous_name, t.previous_version, doc, now)
            except NotFoundError as exc:
                move_target(t, TargetEvent.CANNOT_ROLL_BACK)
                t.error = exc.message
                continue
            move_target(t, TargetEvent.ROLL_BACK)
            t.command_id, t.assigned_at, t.finished_at = command_id, now, None
            changed.add(device.id)
        move_deployment(dep, DeploymentEvent.ROLL_BACK)
        if not changed:
            move_deployment(dep, DeploymentEvent.ROLLED_BACK)
            dep.finished_at = now
        dep.updated_at = now
        audit(session, actor, "rollback", deployment=dep.name, ts=now, devices=sorted(changed))
        return changed

    def _watch_rollback(self, session: Session, dep: Deployment, now: dt.datetime) -> set[str]:
        manifest = DeploymentManifest.model_validate(dep.manifest)
        timeout = manifest.spec.abort.convergence_timeout_s
        devices = _devices_of(session, dep)
        for t in dep.targets:
            if t.state != TargetState.ROLLING_BACK:
                continue
            device = devices.get(t.device_id)
            outcome = reports.command_outcome(device, t.command_id)
            if outcome is None and reports.back_on(device, t.previous_name, t.previous_version, dep.id):
                # The agent rolled itself back to the previous model already (e.g. a failed golden check).
                outcome = (reports.Outcome.OK, None)
            if outcome is None:
                if timeout and t.assigned_at and (now - aware(t.assigned_at)).total_seconds() > timeout:  # type: ignore[operator]
                    outcome = (reports.Outcome.FAILED, f"rollback did not converge within {timeout:g}s")
                else:
                    continue
            kind, error = outcome
            ok = kind is reports.Outcome.OK
            move_target(t, TargetEvent.ROLLED_BACK if ok else TargetEvent.ROLLBACK_FAILED)
            t.finished_at, t.error = now, error or t.error
            audit(session, ROLLOUT, f"device_{t.state}", deployment=dep.name, device_id=t.device_id, ts=now)
        if not any(t.state == TargetState.ROLLING_BACK for t in dep.targets):
            move_deployment(dep, DeploymentEvent.ROLLED_BACK)
            dep.finished_at, dep.updated_at = now, now
            audit(session, ROLLOUT, "rolled_back", deployment=dep.name, ts=now)
        return set()

    def pause(self, session: Session, dep: Deployment, actor: str, now: dt.datetime) -> None:
        move_deployment(dep, DeploymentEvent.PAUSE)
        dep.updated_at = now
        audit(session, actor, "pause", deployment=dep.name, ts=now)

    def resume(self, session: Session, dep: Deployment, actor: str, now: dt.datetime) -> None:
        """Continue a paused deployment; devices that failed or timed out are tried again."""
        next_status(dep.status, DeploymentEvent.RESUME, dep.name)  # refuse before changing anything
        retried = []
        for t in dep.targets:
            if can_target(t.state, TargetEvent.RETRY):
                move_target(t, TargetEvent.RETRY)
                t.error, t.finished_at, t.assigned_at = None, None, None
                retried.append(t.device_id)
        move_deployment(dep, DeploymentEvent.RESUME)
        dep.abort_reason, dep.updated_at, dep.wave_converged_at = None, now, None
        audit(session, actor, "resume", deployment=dep.name, ts=now, retried=retried)

    def abort(self, session: Session, dep: Deployment, actor: str, now: dt.datetime) -> None:
        """Stop for good: nothing more is started; devices keep what they have."""
        next_status(dep.status, DeploymentEvent.ABORT, dep.name)  # refuse before changing anything
        for t in dep.targets:
            if can_target(t.state, TargetEvent.CANCEL):
                move_target(t, TargetEvent.CANCEL)
        move_deployment(dep, DeploymentEvent.ABORT)
        dep.finished_at, dep.updated_at = now, now
        dep.abort_reason = dep.abort_reason or f"aborted by {actor}"
        audit(session, actor, "abort", deployment=dep.name, ts=now)
