"""Deployment commands: apply a manifest, control a rollout (pause, resume, abort, rollback), delete."""

from __future__ import annotations

from manifests import DeploymentManifest

from .. import schemas as S
from ..audit import audit
from ..errors import ConflictError
from ..rollout import TICKED, ControlAction, apply_manifest, get_deployment
from ..views import deployment_out
from .base import CommandContext, CommandResult


def apply_deployment(ctx: CommandContext, manifest: DeploymentManifest, *, actor: str) -> CommandResult[S.ApplyResult]:
    """Make a deployment manifest true (idempotent, like `kubectl apply`). Returns as soon as the deployment
    is recorded (status ``planning``, no targets counted yet): the rollout lease holder's next tick
    (``tick_s``, on whichever fleet server holds the lease) selects and records its targets, and the ticks
    after it start them in bounded steps. A fleet of at most ``start_batch`` devices is planned here at once
    (the same bounded work), so the answer already counts its targets."""
    plan_up_to = ctx.env.rollouts.start_batch
    dep, result = apply_manifest(ctx.session, manifest, actor, ctx.now, plan_up_to=plan_up_to)
    # Counts, not the target list (10,000 rows at 10,000 devices): GET /api/v1/deployments/{name} has it.
    return CommandResult(S.ApplyResult(result=result, deployment=deployment_out(dep, targets=False)))


def control_deployment(
    ctx: CommandContext, name: str, action: ControlAction, *, actor: str
) -> CommandResult[S.DeploymentOut]:
    """pause | resume | abort | rollback, as the transition table allows (409 otherwise)."""
    dep = get_deployment(ctx.session, name)
    changed = ctx.env.rollouts.control(ctx.session, dep, action, actor, ctx.now)
    ctx.session.flush()
    return CommandResult(deployment_out(dep), frozenset(changed))


def delete_deployment(ctx: CommandContext, name: str, *, actor: str) -> CommandResult[None]:
    dep = get_deployment(ctx.session, name)
    if dep.status in TICKED:
        raise ConflictError(f"deployment {name} is {dep.status}; pause or abort it first")
    ctx.session.delete(dep)
    audit(ctx.session, actor, "deployment_deleted", deployment=name)
    return CommandResult(None)
