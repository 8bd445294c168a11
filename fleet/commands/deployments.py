"""Deployment commands: apply a manifest, control a rollout (pause, resume, abort, rollback), delete."""

from __future__ import annotations

from manifests import DeploymentManifest

from .. import schemas as S
from ..audit import audit
from ..errors import ConflictError
from ..rollout import TICKED, ControlAction, apply_manifest, get_deployment
from ..views import deployment_out
from .base import CommandContext, CommandResult


def apply_deployment(
    ctx: CommandContext, manifest: DeploymentManifest, *, actor: str
) -> CommandResult[S.ApplyResult]:
    """Make a deployment manifest true (idempotent, like `kubectl apply`). Returns as soon as the deployment
    and its plan are recorded: the rollout lease holder's next tick (``tick_s``) starts the first devices,
    in bounded steps, on whichever fleet server holds the lease."""
    dep, result = apply_manifest(ctx.session, manifest, actor, ctx.now)
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
