"""Deployments: apply a manifest, read rollouts, and control them (pause, resume, abort, rollback)."""

from collections.abc import Callable

from fastapi import APIRouter, Response
from sqlalchemy import select

from manifests import DeploymentManifest

from .. import commands
from .. import schemas as S
from ..db import Deployment
from ..rollout import ControlAction, get_deployment
from ..views import deployment_out
from .deps import Admin, Db, Svc

router = APIRouter(tags=["deployments"])
REFUSED = {404: {"model": S.ErrorBody}, 409: {"model": S.ErrorBody}}
CONTROL_DOCS = {
    ControlAction.PAUSE: "Stop starting devices; those in flight finish.",
    ControlAction.RESUME: "Continue a paused deployment; failed devices are tried again.",
    ControlAction.ABORT: "Stop for good; devices keep what they have.",
    ControlAction.ROLLBACK: "Send every device this deployment touched back to its previous model (signed).",
}


@router.post("/api/v1/deployments", response_model=S.ApplyResult, responses={201: {"model": S.ApplyResult}})
def apply(body: DeploymentManifest, svc: Svc, p: Admin, response: Response) -> S.ApplyResult:
    """Make a deployment manifest true (idempotent, like `kubectl apply`)."""
    out = svc.execute(commands.apply_deployment, body, actor=p.name).value
    response.status_code = 201 if out.result == "created" else 200
    return out


@router.get("/api/v1/deployments", response_model=list[S.DeploymentOut])
def list_deployments(session: Db, p: Admin) -> list[S.DeploymentOut]:
    deps = session.scalars(select(Deployment).order_by(Deployment.created_at)).all()
    return [deployment_out(d, targets=False) for d in deps]


@router.get("/api/v1/deployments/{name}", response_model=S.DeploymentOut, responses={404: {"model": S.ErrorBody}})
def show_deployment(name: str, session: Db, p: Admin) -> S.DeploymentOut:
    return deployment_out(get_deployment(session, name))


def _control_route(action: ControlAction) -> Callable[..., S.DeploymentOut]:
    def control(name: str, svc: Svc, p: Admin) -> S.DeploymentOut:
        return svc.execute(commands.control_deployment, name, action, actor=p.name).value

    # The function's name is the OpenAPI operation id (pause_deployment_api_v1_..._post).
    control.__name__ = f"{action.value}_deployment"
    control.__doc__ = CONTROL_DOCS[action]
    return control


for _action in ControlAction:
    router.post(f"/api/v1/deployments/{{name}}/{_action.value}", response_model=S.DeploymentOut, responses=REFUSED)(
        _control_route(_action)
    )


@router.delete("/api/v1/deployments/{name}", status_code=204, responses=REFUSED)
def delete_deployment(name: str, svc: Svc, p: Admin) -> Response:
    svc.execute(commands.delete_deployment, name, actor=p.name)
    return Response(status_code=204)
