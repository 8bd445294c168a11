"""The rollout engine: makes each deployment's plan true, wave by wave, and aborts on bad evidence.

It keeps no state of its own: every decision is re-derived from the database on each ``tick``, so a
service restart (or a SIGKILL) loses no rollout. Statuses and states move only through the tables in
``states``. A ``planning`` deployment (recorded by the apply, nothing selected yet) is planned by its
first tick (``planning.plan_deployment``: its targets, in waves; the next tick starts them). One tick of an
``in_progress`` deployment runs these phases, each its own method:

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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from manifests import DeploymentManifest, SignedDocument

from .. import adapters, registry
from ..audit import audit
from ..db import BundleRecord, Deployment, DeploymentTarget, Device, aware
from ..errors import NotFoundError
from . import queries as Q
from . import reports
from .desired import UNLOADED, DesiredStates, RolloutContext
from .health import baselines, has_health_rules
from .planning import ensure_planned, plan_deployment, select_devices
from .rules import ABORT_RULES, Abort, timed_out
from .states import (
    SETTLED,
    TICKED,
    DeploymentEvent,
    DeploymentStatus,
    TargetEvent,
    TargetState,
    can_target,
    move_deployment,
    move_target,
    next_state,
    next_status,
    states_allowing,
)
from .variants import start_variants

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
    now: dt.datetime
    changed: set[str] = field(default_factory=set)


class RolloutEngine:
    def __init__(
        self, ctx: RolloutContext, *, start_batch: int = 1000, resend_s: float = 15.0, health_evidence_s: float = 120.0
    ) -> None:
        self.ctx = ctx
        self.desired = DesiredStates(ctx)
        # Devices one tick starts at most: a rollout to 10,000 devices is started in bounded steps, each
        # its own transaction, so no tick holds the writer (or a lock) for long.
        self.start_batch = start_batch
        # An online device that has not reported its command this long after it was given it gets its
        # desired state again (retained QoS 1 is not delivery: a clustered broker can lose it while it
        # fails over). In memory only: after a restart every such device is resent once, harmlessly
        # (agents deduplicate commands by id).
        self.resend_s = resend_s
        # With a health rule, a converged wave waits this long at most for a sample from each of its
        # succeeded devices on its new model: without it a rollout could finish before any was judged.
        self.health_evidence_s = health_evidence_s
        self._resent: dict[str, float] = {}

    # Tick ------------------------------------------------------------------------------------------
    def tick(self, session: Session) -> set[str]:
        """Advance every active deployment; returns ids of devices whose desired state changed."""
        now = self.ctx.now()
        changed: set[str] = set()
        phases: dict[str, Callable[[Session, Deployment, dt.datetime], set[str]]] = {
            DeploymentStatus.PLANNING.value: self._plan,
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

    def _plan(self, session: Session, dep: Deployment, now: dt.datetime) -> set[str]:
        """Phase 0: select and record the targets of a deployment the apply only recorded. Starting them
        is the next tick's: one tick plans 10,000 targets or starts ``start_batch``, never both."""
        plan_deployment(session, dep, ROLLOUT, now)
        return set()

    def _advance(self, session: Session, dep: Deployment, now: dt.datetime) -> set[str]:
        manifest = DeploymentManifest.model_validate(dep.manifest)
        run = _Tick(session, dep, manifest, now)
        abort = self._collect_results(run) or self._check_rules(run)
        if abort is not None:
            return run.changed | self._abort(session, dep, abort, now)
        self._resend_lost(run)
        self._adopt_new_devices(run)
        self._start_wave(run)
        if self._finish_wave(run):
            # The next wave starts in this same tick.
            run.changed |= self._advance(session, dep, now)
        dep.updated_at = now
        return run.changed

    def _collect_results(self, run: _Tick) -> Abort | None:
        """Phase 1: record the result of each in-flight device that reported one; a device past the
        convergence timeout fails and aborts the deployment at once. Only those rows are read."""
        rules = run.manifest.spec.abort
        for t, device in Q.with_results(run.session, run.dep.id, TargetState.IN_FLIGHT):
            outcome = reports.command_outcome(device, t.command_id)
            if outcome is None:
                continue
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
        if rules.convergence_timeout_s:
            cutoff = run.now - dt.timedelta(seconds=rules.convergence_timeout_s)
            for t in Q.assigned_before(run.session, run.dep.id, TargetState.IN_FLIGHT, cutoff):
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
        run.session.flush()
        return None

    def _resend_lost(self, run: _Tick) -> None:
        """Phase 1b: online devices that never started their command get their desired state again."""
        cutoff = run.now - dt.timedelta(seconds=self.resend_s)
        mono = time.monotonic()
        for device_id in Q.not_yet_started(run.session, run.dep.id, cutoff, self.start_batch):
            if mono - self._resent.get(device_id, 0.0) >= self.resend_s:
                self._resent[device_id] = mono
                run.changed.add(device_id)
        if len(self._resent) > 100_000:
            self._resent = {k: v for k, v in self._resent.items() if mono - v < self.resend_s}

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
        candidates = select_devices(run.session, run.manifest, aware(dep.created_at))
        if not candidates:
            return
        known = Q.known_devices(run.session, dep.id, [d.id for d in candidates])
        fresh = [d for d in candidates if d.id not in known]
        if not fresh:
            return
        last_wave = max(dep.waves - 1, dep.wave)
        pos = Q.last_position(run.session, dep.id) + 1
        for i, d in enumerate(fresh):
            run.session.add(
                DeploymentTarget(
                    deployment_id=dep.id,
                    device_id=d.id,
                    position=pos + i,
                    wave=last_wave,
                    state=TargetState.PENDING.value,
                )
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
        run.session.flush()

    def _start_wave(self, run: _Tick) -> None:
        """Phase 4: start pending devices of the current wave, at most ``max_in_flight`` at once and at most
        ``start_batch`` per tick."""
        dep = run.dep
        in_flight = Q.state_counts(run.session, dep.id)[TargetState.IN_FLIGHT.value]
        cap = run.manifest.spec.strategy.max_in_flight
        room = self.start_batch if cap is None else min(self.start_batch, cap - in_flight)
        if room <= 0:
            return
        targets = Q.next_pending(run.session, dep.id, dep.wave, room)
        run.changed |= self.start_targets(run.session, dep, targets, run.manifest, run.now)

    def _finish_wave(self, run: _Tick) -> bool:
        """Phase 5: once every device of the wave settled, soak ``wait_seconds``, then complete or move
        to the next wave. True when a next wave started."""
        dep, now = run.dep, run.now
        counts = Q.state_counts(run.session, dep.id, dep.wave)
        if any(n and TargetState(state) not in SETTLED for state, n in counts.items()):
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
                succeeded=counts[TargetState.SUCCEEDED.value],
                failed=counts[TargetState.FAILED.value],
            )
            return False
        soaked = (now - aware(dep.wave_converged_at)).total_seconds()  # type: ignore[operator]
        if soaked < run.manifest.spec.strategy.wait_seconds or not self._health_judged(run, soaked):
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

    def _health_judged(self, run: _Tick, waited: float) -> bool:
        """With a health rule, whether every succeeded device of the wave has been judged on telemetry from
        its new model, or ``health_evidence_s`` passed without it (audited: such boards were not judged)."""
        dep = run.dep
        if not has_health_rules(run.manifest.spec.abort):
            return True
        unjudged = Q.unjudged(run.session, dep.id, dep.wave)
        if not unjudged:
            return True
        if waited < self.health_evidence_s:
            return False
        audit(
            run.session,
            ROLLOUT,
            "health_unjudged",
            deployment=dep.name,
            ts=run.now,
            wave=dep.wave + 1,
            devices=unjudged,
            waited_s=round(waited, 1),
        )
        return True

    # Starting devices (public: offline packages start devices exactly as the rollout does) ----------
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
        known = {} if device is None else {device.id: device}
        self.start_targets(session, dep, [t], manifest, now, devices=known)
        return t.device_id

    def start_targets(
        self,
        session: Session,
        dep: Deployment,
        targets: list[DeploymentTarget],
        manifest: DeploymentManifest,
        now: dt.datetime,
        *,
        devices: dict[str, Device] | None = None,
        bundle: tuple[str, int] | None = None,
    ) -> set[str]:
        """Start these pending targets with a fixed number of queries whatever their count; returns the
        devices whose desired state changed. ``bundle``: the one to send (default: the deployment's); a
        release deployment first resolves each device's variant (variants.py), then comes back here per bundle."""
        if not targets:
            return set()
        if bundle is None and dep.release_name is not None:
            return start_variants(self, session, dep, targets, manifest, now, devices)
        name, version = bundle or (dep.bundle_name, dep.bundle_version)
        ids = [t.device_id for t in targets]
        if devices is None:
            devices = Q.devices_by_id(session, ids)
        # The newest deployment to reach a device owns it: older active deployments let go of it, so they
        # neither wait for it nor later overwrite its desired state.
        for o in Q.held_elsewhere(session, dep.id, ids, states_allowing(TargetEvent.TAKEN_OVER)):
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
        found = [devices[i] for i in ids if i in devices]
        base = baselines(session, found)
        record = registry.get_bundle(session, name, version) if found else None
        is_adapter = record is not None and adapters.is_adapter(record.summary)
        changed: set[str] = set()
        for t in targets:
            # A retried device needs a fresh command id: agents deduplicate commands by it.
            t.command_id = dep.id if t.command_id is None else f"{dep.id}.retry-{uuid.uuid4().hex[:6]}"
            t.assigned_at = now
            move_target(t, TargetEvent.START)
            device = devices.get(t.device_id)
            if device is not None:
                t.previous_name, t.previous_version = device.current_name, device.current_version
                if is_adapter:  # an adapter's "previous" is the version of it the device held (UNLOADED: none)
                    prev = adapters.reported_version(device.reported, name)
                    t.previous_name, t.previous_version = name, prev or UNLOADED
                t.baseline = base.get(device.id)
                rollback = None
                if manifest.spec.rollback:
                    rollback = self.sign_rollback(t.command_id, name, version, device.id, now)
                self.desired.set(
                    session,
                    device,
                    t.command_id,
                    name,
                    version,
                    rollback,
                    now,
                    record=record,
                )
                changed.add(device.id)
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
        session.flush()
        return changed

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
        """An operator's pause | resume | abort | rollback; returns the devices whose desired state changed.
        A deployment still ``planning`` is planned first: every action acts on its targets."""
        ensure_planned(session, dep, ROLLOUT, now)
        if action is ControlAction.ROLLBACK:
            # Marked here, sent by the lease holder's ticks: the operator's call returns at once at any fleet
            # size (sending 1,000 signed rollbacks took 2 s inside the call at 10,000 devices).
            return self.rollback(session, dep, actor, now, send_now=False)
        if action is ControlAction.PAUSE:
            self.pause(session, dep, actor, now)
        elif action is ControlAction.RESUME:
            self.resume(session, dep, actor, now)
        else:
            self.abort(session, dep, actor, now)
        return set()

    def rollback(
        self, session: Session, dep: Deployment, actor: str, now: dt.datetime, *, send_now: bool = True
    ) -> set[str]:
        """Send every device this deployment touched back to its previous model, with a signed rollback.

        Bounded like a rollout: every target is marked here (set-based); with ``send_now`` (an abort rule,
        inside a tick) the first ``start_batch`` get their rollback desired state at once, and the rest (all
        of them, for an operator's rollback) on the next ticks (``_watch_rollback``)."""
        next_status(dep.status, DeploymentEvent.ROLL_BACK, dep.name)  # refuse before changing anything
        command_id = f"{dep.id}.rollback"
        table = DeploymentTarget.__table__
        cancel_from = states_allowing(TargetEvent.CANCEL)
        back_from = states_allowing(TargetEvent.ROLL_BACK)
        session.flush()
        # The transitions as the table has them, applied to every row in one statement each.
        for state in cancel_from:
            session.execute(
                table.update()
                .where(table.c.deployment_id == dep.id, table.c.state == state)
                .values(state=next_state(state, TargetEvent.CANCEL).value)
            )
        for state in back_from:
            session.execute(
                table.update()
                .where(table.c.deployment_id == dep.id, table.c.state == state, table.c.previous_name.is_(None))
                .values(
                    state=next_state(state, TargetEvent.CANNOT_ROLL_BACK).value,
                    error="no previous model to return to",
                )
            )
            session.execute(
                table.update()
                .where(table.c.deployment_id == dep.id, table.c.state == state, table.c.previous_name.is_not(None))
                .values(
                    state=next_state(state, TargetEvent.ROLL_BACK).value,
                    command_id=command_id,
                    assigned_at=None,  # not sent yet: _send_rollbacks sends it, in steps
                    finished_at=None,
                )
            )
        session.expire(dep, ["targets"])
        move_deployment(dep, DeploymentEvent.ROLL_BACK)
        dep.updated_at = now
        rolling = Q.state_counts(session, dep.id)[TargetState.ROLLING_BACK.value]
        audit(session, actor, "rollback", deployment=dep.name, ts=now, devices=rolling)
        changed = self._send_rollbacks(session, dep, now) if send_now else set()
        if not Q.state_counts(session, dep.id)[TargetState.ROLLING_BACK.value]:
            move_deployment(dep, DeploymentEvent.ROLLED_BACK)
            dep.finished_at = now
        return changed

    def _send_rollbacks(self, session: Session, dep: Deployment, now: dt.datetime) -> set[str]:
        """The next step of rollback desired states (at most ``start_batch``)."""
        targets = Q.unsent_rollbacks(session, dep.id, self.start_batch)
        devices = Q.devices_by_id(session, [t.device_id for t in targets])
        changed: set[str] = set()
        # Bundle records looked up once per step, not once per device (a query each was half a step's time).
        records: dict[tuple[str, int], BundleRecord | NotFoundError] = {}
        for t in targets:
            device = devices.get(t.device_id)
            if device is None:
                move_target(t, TargetEvent.ROLLBACK_FAILED)
                t.error, t.finished_at = "the device no longer exists", now
                continue
            assert t.previous_name is not None and t.previous_version is not None and t.command_id is not None
            doc = self.sign_rollback(t.command_id, t.previous_name, t.previous_version, device.id, now)
            try:
                # UNLOADED (no earlier version): the record is the adapter version sent, which the agent unloads.
                key = (
                    (t.bundle_name or dep.bundle_name, t.bundle_version or dep.bundle_version)
                    if t.previous_version == UNLOADED
                    else (t.previous_name, t.previous_version)
                )
                record = _lookup_once(records, session, *key)
                self.desired.set(session, device, t.command_id, t.previous_name, t.previous_version, doc, now,
                                 record=record)  # fmt: skip
            except NotFoundError as exc:
                move_target(t, TargetEvent.ROLLBACK_FAILED)
                t.error, t.finished_at = exc.message, now
                continue
            t.assigned_at = now
            changed.add(device.id)
        session.flush()
        return changed

    def _watch_rollback(self, session: Session, dep: Deployment, now: dt.datetime) -> set[str]:
        manifest = DeploymentManifest.model_validate(dep.manifest)
        timeout = manifest.spec.abort.convergence_timeout_s
        changed = self._send_rollbacks(session, dep, now)
        settled: dict[int, tuple[DeploymentTarget, tuple[reports.Outcome, str | None]]] = {}
        for t, device in Q.with_results(session, dep.id, TargetState.ROLLING_BACK):
            outcome = reports.command_outcome(device, t.command_id)
            if outcome is not None and t.assigned_at is not None:
                if (
                    outcome[0] is reports.Outcome.OK
                    and t.previous_version == UNLOADED
                    and t.previous_name
                    and (adapters.reported_version(device.reported, t.previous_name) is not None)
                ):
                    continue  # unloaded only once the device no longer reports the adapter
                settled[t.id] = (t, outcome)
        for t, device in Q.back_on_previous(session, dep.id):
            # The agent rolled itself back to the previous model already (e.g. a failed golden check).
            if t.id not in settled and reports.back_on(device, t.previous_name, t.previous_version, dep.id):
                settled[t.id] = (t, (reports.Outcome.OK, None))
        if timeout:
            cutoff = now - dt.timedelta(seconds=timeout)
            for t in Q.assigned_before(session, dep.id, TargetState.ROLLING_BACK, cutoff):
                late = (reports.Outcome.FAILED, f"rollback did not converge within {timeout:g}s")
                settled.setdefault(t.id, (t, late))
        for t, (kind, error) in settled.values():
            ok = kind is reports.Outcome.OK
            move_target(t, TargetEvent.ROLLED_BACK if ok else TargetEvent.ROLLBACK_FAILED)
            t.finished_at, t.error = now, error or t.error
            audit(session, ROLLOUT, f"device_{t.state}", deployment=dep.name, device_id=t.device_id, ts=now)
        session.flush()
        if not Q.state_counts(session, dep.id)[TargetState.ROLLING_BACK.value]:
            move_deployment(dep, DeploymentEvent.ROLLED_BACK)
            dep.finished_at, dep.updated_at = now, now
            audit(session, ROLLOUT, "rolled_back", deployment=dep.name, ts=now)
        return changed

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


def _lookup_once(
    cache: dict[tuple[str, int], BundleRecord | NotFoundError], session: Session, name: str, version: int
) -> BundleRecord:
    """``registry.get_bundle`` through ``cache``: a missing bundle is remembered and raised again."""
    key = (name, version)
    if key not in cache:
        try:
            cache[key] = registry.get_bundle(session, name, version)
        except NotFoundError as exc:
            cache[key] = exc
    found = cache[key]
    if isinstance(found, NotFoundError):
        raise found
    return found
