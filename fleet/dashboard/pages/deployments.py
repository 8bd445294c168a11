"""Deployments: the list with the compose/paste form, one deployment's progress (waves, devices,
before/after charts, audit), and its control buttons. Writes run the same commands as the REST API."""

from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from manifests.adapter import UNLOADED_VERSION

from ... import commands
from ...errors import FleetError, InvalidManifestError
from ...rollout import ControlAction
from .. import actions, charts, queries
from ..auth import CSRF_FIELD, DashboardSession
from ..web import ActS, Dashboard, Db, FragS, PageS, Ui, action_session
from ..web import ui as dashboard_of

router = APIRouter(include_in_schema=False)


def _deployments_page(
    ui: Dashboard,
    db: Session,
    request: Request,
    s: DashboardSession,
    status_code: int = 200,
    error: str | None = None,
    errors: list[dict[str, str]] | None = None,
    form: dict[str, str] | None = None,
    manifest_text: str = "",
) -> Response:
    ctx = {"deps": queries.deployments(db), "bundles": queries.bundle_choices(db)}
    page = {"error": error, "errors": errors or [], "form": form or {}, "manifest_text": manifest_text}
    return ui.render(request, "deployments.html", {"nav": "deployments", **ctx, **page}, s, status_code)


def _refused_page(ui: Dashboard, request: Request, s: DashboardSession, *args: Any) -> Response:
    with ui.svc.sessions() as session:
        return _deployments_page(ui, session, request, s, *args)


@router.get("/deployments", response_class=HTMLResponse)
def deployments_page(request: Request, s: PageS, db: Db, ui: Ui, edit: str = "") -> Response:
    # ?edit=<name>: the paste form starts with that deployment's manifest, to change and re-apply.
    text = ""
    if edit:
        view = queries.get_deployment_view(db, edit)
        text = actions.manifest_yaml(view.dep.manifest) if view else ""
    return _deployments_page(ui, db, request, s, manifest_text=text)


@router.get("/ui/fragments/deployments", response_class=HTMLResponse)
def deployments_fragment(request: Request, s: FragS, db: Db, ui: Ui) -> Response:
    ctx = {"deps": queries.deployments(db), "bundles": queries.bundle_choices(db)}
    return ui.render(request, "fragments/deployments.html", ctx, s)


def _manifest_from(form: dict[str, str]) -> Any:
    """The posted form's manifest: pasted text (mode=manifest) or the compose form's fields."""
    if form.get("mode", "compose") == "manifest":
        return actions.parse_manifest_text(form.get("manifest", ""))
    try:
        doc = actions.compose_manifest(form)
    except ValueError as exc:
        raise actions.ManifestInputError(f"a number field is not a number: {exc}") from exc
    return actions.validate_manifest(doc)


@router.post("/deployments")
async def start_deployment(request: Request) -> Response:
    form = {k: str(v) for k, v in (await request.form()).items()}
    ui = dashboard_of(request)
    s = action_session(request, ui, form.get(CSRF_FIELD))
    manifest_text = form.get("manifest", "") if form.get("mode", "compose") == "manifest" else ""
    try:
        manifest = _manifest_from(form)
        applied = await run_in_threadpool(ui.svc.execute, commands.apply_deployment, manifest, actor=actions.ACTOR)
    except InvalidManifestError as exc:
        return await run_in_threadpool(_refused_page, ui, request, s, 422, exc.message, exc.errors, form, manifest_text)
    except FleetError as exc:
        return await run_in_threadpool(
            _refused_page, ui, request, s, exc.status_code, exc.message, None, form, manifest_text
        )
    name, result = applied.value.deployment.name, applied.value.result
    return RedirectResponse(f"/deployments/{quote(name)}?" + urlencode({"applied": result}), status_code=303)


def version_label(ref: str) -> str:
    """``qv@0`` is an adapter's "no version" (UNLOADED_VERSION): the base model served without it before."""
    name, _, version = ref.rpartition("@")
    return f"without {name}" if version == str(UNLOADED_VERSION) else ref


def _deployment_ctx(session: Session, name: str) -> dict[str, Any] | None:
    view = queries.get_deployment_view(session, name)
    if view is None:
        return None
    ba = queries.before_after(session, view.dep)
    dep = view.dep
    # Bars in the colours of the versions they measure (the same as on the device pages' lines).
    previous = {f"{t.previous_name}@{t.previous_version}" for t in dep.targets if t.previous_name}
    # A release deployment sends each device its variant: "this one" is one version only if all got the same.
    sent = {f"{t.bundle_name}@{t.bundle_version}" for t in dep.targets if t.bundle_name} or (
        set() if dep.release_name else {f"{dep.bundle_name}@{dep.bundle_version}"}
    )
    versions = (previous.pop() if len(previous) == 1 else None, sent.pop() if len(sent) == 1 else None)
    labels = (
        f"previous ({version_label(versions[0])})" if versions[0] else "previous model",
        f"this one ({versions[1]})" if versions[1] else "each device's variant",
    )
    return {
        "v": view,
        "dep": view.dep,
        "tok_chart": charts.before_after_chart(
            "Decode speed before and after the update", ba.tok_s, "tok/s", labels, versions
        ),
        "err_chart": charts.before_after_chart(
            "Error rate before and after the update", ba.error_rate, "%", labels, versions
        ),
        "ba": ba,
        "audit": queries.audit_entries(session, deployment=name, limit=50),
    }


@router.get("/deployments/{name}", response_class=HTMLResponse)
def deployment_page(
    request: Request, name: str, s: PageS, db: Db, ui: Ui, applied: str = "", done: str = ""
) -> Response:
    ctx = _deployment_ctx(db, name)
    if ctx is None:
        return ui.render(request, "notfound.html", {"what": f"deployment {name}"}, s, 404)
    return ui.render(request, "deployment.html", {"nav": "deployments", "applied": applied, "done": done, **ctx}, s)


@router.get("/ui/fragments/deployment/{name}", response_class=HTMLResponse)
def deployment_fragment(request: Request, name: str, s: FragS, db: Db, ui: Ui) -> Response:
    ctx = _deployment_ctx(db, name)
    if ctx is None:
        return HTMLResponse("<p>This deployment no longer exists.</p>", status_code=404)
    return ui.render(request, "fragments/deployment.html", ctx, s)


@router.post("/deployments/{name}/{action}")
def control_deployment(
    request: Request, name: str, action: str, s: ActS, db: Db, ui: Ui, confirmed: Annotated[str, Form()] = ""
) -> Response:
    if action not in actions.CONTROL_ACTIONS:
        return ui.render(request, "notfound.html", {"what": f"action {action}"}, s, 404)
    if confirmed != "yes":
        # No script (or a hand-made request): ask on a page of its own.
        return ui.render(request, "confirm.html", {"nav": "deployments", "name": name, "action": action}, s)
    try:
        status = ui.svc.execute(
            commands.control_deployment, name, ControlAction(action), actor=actions.ACTOR
        ).value.status
    except FleetError as exc:
        ctx = _deployment_ctx(db, name)
        if ctx is None:
            return ui.render(request, "notfound.html", {"what": f"deployment {name}"}, s, 404)
        page = {"nav": "deployments", "applied": "", "done": "", "error": exc.message, **ctx}
        return ui.render(request, "deployment.html", page, s, exc.status_code)
    done = urlencode({"done": f"{action} → {status}"})
    return RedirectResponse(f"/deployments/{quote(name)}?{done}", status_code=303)
