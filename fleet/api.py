"""The REST API (FastAPI). Admin endpoints take the admin token; device endpoints take a device's own
token; bundle files are public (they are signed: a device trusts the signature, not the transport).
"""

import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, BinaryIO

from fastapi import Depends, FastAPI, File, Header, HTTPException, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from manifests import MANIFEST_NAME, SIGNATURE_NAME, DeploymentManifest
from manifests.signing import key_id_of

from . import commands
from . import schemas as S
from .credentials import DEVICE_TOKEN_PREFIX, hash_secret
from .db import AuditEntry, BundleRecord, Deployment, Device, DeviceEvent
from .errors import FleetError, InvalidBundleError, InvalidManifestError, NotFoundError
from .registry import get_bundle
from .rollout import ControlAction, get_deployment
from .service import FleetService
from .views import (
    audit_out,
    credentials_out,
    deployment_out,
    device_out,
    event_out,
    model_out,
    telemetry_points,
)

bearer = HTTPBearer(auto_error=False)
# Bundle versions are positive 32-bit integers everywhere (database columns included).
Version = Annotated[int, PathParam(ge=1, le=2_147_483_647)]


class Principal:
    def __init__(self, kind: str, device_id: str | None = None) -> None:
        self.kind = kind
        self.device_id = device_id

    @property
    def name(self) -> str:
        return "admin" if self.kind == "admin" else f"device:{self.device_id}"


def _unauthorized(msg: str = "missing or invalid bearer token") -> HTTPException:
    return HTTPException(401, msg, headers={"WWW-Authenticate": "Bearer"})


# --- the app ----------------------------------------------------------------------------------------


def create_app(
    svc: FleetService, *, manage_lifecycle: bool = True, on_started: Callable[[], None] | None = None
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            svc.start()
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            if manage_lifecycle:
                svc.stop()

    app = FastAPI(
        title="nanofleet fleet service",
        version="1",
        description="Device registry, signed model bundles, staged rollouts with automatic abort, telemetry.",
        lifespan=lifespan,
        responses={401: {"model": S.ErrorBody}, 422: {"model": S.ErrorBody}},
    )
    app.state.service = svc

    @app.exception_handler(FleetError)
    async def _fleet_error(_req: Request, exc: FleetError) -> JSONResponse:
        body: dict[str, Any] = {"detail": exc.message, "reason": exc.reason}
        if isinstance(exc, InvalidManifestError):
            body["errors"] = exc.errors
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        return JSONResponse(
            {"detail": str(exc.detail), "reason": reason},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            if loc and loc[0] in ("body", "query", "path", "header"):
                where, loc = loc[0], loc[1:]
            else:
                where = "body"
            errors.append({"path": ".".join(loc) or "<root>", "in": where, "msg": str(err.get("msg", ""))})
        detail = "invalid request: " + "; ".join(f"{e['path']}: {e['msg']}" for e in errors)
        return JSONResponse({"detail": detail, "reason": "validation", "errors": errors}, status_code=422)

    def db() -> Any:
        with svc.sessions() as session:
            yield session

    def principal(
        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        session: Annotated[Session, Depends(db)],
    ) -> Principal:
        if cred is None or not cred.credentials:
            raise _unauthorized()
        token = cred.credentials
        if hmac.compare_digest(token.encode(), svc.admin_token.encode()):
            return Principal("admin")
        if token.startswith(DEVICE_TOKEN_PREFIX):
            dev = session.scalar(select(Device).where(Device.secret_hash == hash_secret(token)))
            if dev is not None:
                return Principal("device", dev.id)
        raise _unauthorized()

    def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
        if p.kind != "admin":
            raise HTTPException(403, "this endpoint needs the admin token")
        return p

    def self_or_admin(device_id: str, p: Annotated[Principal, Depends(principal)]) -> Principal:
        if p.kind == "admin" or p.device_id == device_id:
            return p
        raise HTTPException(403, "a device may only access its own record")

    Db = Annotated[Session, Depends(db)]
    Admin = Annotated[Principal, Depends(admin)]
    SelfOrAdmin = Annotated[Principal, Depends(self_or_admin)]

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        return {"ok": True, "mqtt_connected": bool(svc.bridge and svc.bridge.connected.is_set())}

    # Enrolment ----------------------------------------------------------------------------------
    @app.post(
        "/api/v1/enrollment-tokens", response_model=S.EnrollmentTokenOut, status_code=201, tags=["devices"]
    )
    def create_enrollment_token(
        body: S.EnrollmentTokenRequest, session: Db, p: Admin
    ) -> S.EnrollmentTokenOut:
        return svc.execute(commands.create_enrollment_token, body, actor=p.name).value

    @app.post(
        "/api/v1/enroll",
        response_model=S.EnrollResponse,
        status_code=201,
        tags=["devices"],
        responses={409: {"model": S.ErrorBody}},
    )
    def enroll(body: S.EnrollRequest, session: Db) -> S.EnrollResponse:
        """Exchange a one-time enrolment token for this device's own credentials (no other auth)."""
        return svc.execute(commands.enroll, body).value

    # Devices ------------------------------------------------------------------------------------
    @app.get("/api/v1/devices", response_model=list[S.DeviceOut], tags=["devices"])
    def list_devices(session: Db, p: Admin) -> list[S.DeviceOut]:
        return [
            device_out(d) for d in session.scalars(select(Device).order_by(Device.enrolled_at, Device.id))
        ]

    def _device(session: Session, device_id: str) -> Device:
        d = session.get(Device, device_id)
        if d is None:
            raise NotFoundError(f"no device {device_id!r}")
        return d

    @app.get(
        "/api/v1/devices/{device_id}",
        response_model=S.DeviceOut,
        tags=["devices"],
        responses={403: {"model": S.ErrorBody}, 404: {"model": S.ErrorBody}},
    )
    def get_device(device_id: str, session: Db, p: SelfOrAdmin) -> S.DeviceOut:
        return device_out(_device(session, device_id))

    @app.patch(
        "/api/v1/devices/{device_id}",
        response_model=S.DeviceOut,
        tags=["devices"],
        responses={404: {"model": S.ErrorBody}},
    )
    def patch_device(device_id: str, body: S.DevicePatch, session: Db, p: Admin) -> S.DeviceOut:
        return svc.execute(commands.update_device, device_id, body, actor=p.name).value

    @app.delete(
        "/api/v1/devices/{device_id}",
        status_code=204,
        tags=["devices"],
        responses={404: {"model": S.ErrorBody}},
    )
    def delete_device(device_id: str, session: Db, p: Admin) -> Response:
        svc.execute(commands.delete_device, device_id, actor=p.name)
        return Response(status_code=204)

    @app.get(
        "/api/v1/devices/{device_id}/credentials",
        response_model=S.CredentialsOut,
        tags=["devices"],
        responses={403: {"model": S.ErrorBody}, 404: {"model": S.ErrorBody}},
    )
    def get_credentials(device_id: str, session: Db, p: SelfOrAdmin) -> S.CredentialsOut:
        """A device's connection details. The secret is never readable again (only its hash is kept)."""
        _device(session, device_id)
        return credentials_out(svc, device_id)

    @app.post(
        "/api/v1/devices/{device_id}/credentials/rotate",
        response_model=S.EnrollResponse,
        tags=["devices"],
        responses={403: {"model": S.ErrorBody}, 404: {"model": S.ErrorBody}},
    )
    def rotate_credentials(device_id: str, session: Db, p: SelfOrAdmin) -> S.EnrollResponse:
        return svc.execute(commands.rotate_credentials, device_id, actor=p.name).value

    @app.get(
        "/api/v1/devices/{device_id}/desired",
        tags=["devices"],
        responses={403: {"model": S.ErrorBody}, 404: {"model": S.ErrorBody}},
    )
    def get_desired(device_id: str, session: Db, p: SelfOrAdmin) -> dict[str, Any] | None:
        """The desired state also published (retained) on MQTT; for agents that poll over HTTP."""
        return _device(session, device_id).desired

    @app.get(
        "/api/v1/devices/{device_id}/telemetry",
        response_model=list[S.TelemetryPoint],
        tags=["devices"],
        responses={403: {"model": S.ErrorBody}, 404: {"model": S.ErrorBody}},
    )
    def telemetry(
        device_id: str, session: Db, p: SelfOrAdmin, limit: Annotated[int, Query(ge=1, le=10000)] = 500
    ) -> list[S.TelemetryPoint]:
        """Newest first: raw samples within the retention window, then downsampled rollups."""
        _device(session, device_id)
        return telemetry_points(session, device_id, limit, svc.config.telemetry.rollup_bucket_s)

    @app.get(
        "/api/v1/devices/{device_id}/events",
        response_model=list[S.EventOut],
        tags=["devices"],
        responses={403: {"model": S.ErrorBody}, 404: {"model": S.ErrorBody}},
    )
    def events(
        device_id: str, session: Db, p: SelfOrAdmin, limit: Annotated[int, Query(ge=1, le=10000)] = 200
    ) -> list[S.EventOut]:
        _device(session, device_id)
        rows = session.scalars(
            select(DeviceEvent)
            .where(DeviceEvent.device_id == device_id)
            .order_by(DeviceEvent.seq.desc())
            .limit(limit)
        ).all()
        return [event_out(r) for r in rows]

    # Models ------------------------------------------------------------------------------------------
    @app.post(
        "/api/v1/models",
        response_model=S.ModelOut,
        status_code=201,
        tags=["models"],
        responses={200: {"model": S.ModelOut}, 409: {"model": S.ErrorBody}},
    )
    def upload_model(
        files: Annotated[list[UploadFile], File(description="every bundle file; filename = path")],
        session: Db,
        p: Admin,
        response: Response,
    ) -> S.ModelOut:
        """Upload a signed bundle: manifest.yaml, manifest.sig and every file it lists (filename = its path).
        The signature is checked against the trusted keys before anything is stored."""
        parts: dict[str, BinaryIO] = {}
        for f in files:
            if not f.filename:
                raise HTTPException(
                    422, "every uploaded part needs a filename (the file's path in the bundle)"
                )
            if f.filename in parts:
                raise InvalidBundleError(f"{f.filename} uploaded twice")
            parts[f.filename] = f.file
        staged = commands.stage_upload(session, svc.blobs, svc.trust, parts)
        uploaded = svc.execute(commands.upload_model, staged, actor=p.name).value
        response.status_code = 201 if uploaded.created else 200
        return uploaded.model

    @app.get("/api/v1/models", response_model=list[S.ModelOut], tags=["models"])
    def list_models(session: Db, p: Admin) -> list[S.ModelOut]:
        recs = session.scalars(select(BundleRecord).order_by(BundleRecord.name, BundleRecord.version)).all()
        return [model_out(svc.public_url, session, b) for b in recs]

    @app.get("/api/v1/models/{name}/{version}", tags=["models"], responses={404: {"model": S.ErrorBody}})
    def inspect_model(name: str, version: Version, session: Db, p: Admin) -> dict[str, Any]:
        b = get_bundle(session, name, version)
        import yaml

        return {
            **model_out(svc.public_url, session, b).model_dump(mode="json"),
            "manifest": yaml.safe_load(b.manifest_yaml),
        }

    @app.delete(
        "/api/v1/models/{name}/{version}",
        status_code=204,
        tags=["models"],
        responses={404: {"model": S.ErrorBody}, 409: {"model": S.ErrorBody}},
    )
    def remove_model(name: str, version: Version, session: Db, p: Admin) -> Response:
        """Delete a bundle; refused while a device runs it or is told to, or an active deployment uses it."""
        svc.execute(commands.delete_model, name, version, actor=p.name)
        return Response(status_code=204)

    # Artifacts ----------------------------------------------------------------------------------
    @app.head("/bundles/{name}/{version}/{path:path}", include_in_schema=False)
    @app.get(
        "/bundles/{name}/{version}/{path:path}",
        tags=["artifacts"],
        responses={
            200: {"content": {"application/octet-stream": {}}},
            304: {},
            206: {},
            404: {"model": S.ErrorBody},
            416: {},
        },
    )
    def bundle_file(
        name: str,
        version: Version,
        path: str,
        session: Db,
        if_none_match: Annotated[str | None, Header()] = None,
    ) -> Response:
        """A bundle file, with Range, an ETag (its sha256) and X-Checksum-Sha256. No auth: bundles are
        signed, so devices trust the signature, not the transport."""
        b = get_bundle(session, name, version)
        if path in (MANIFEST_NAME, SIGNATURE_NAME):
            data = (b.manifest_yaml if path == MANIFEST_NAME else b.signature).encode("utf-8")
            import hashlib

            sha = hashlib.sha256(data).hexdigest()
            headers = {
                "etag": f'"{sha}"',
                "x-checksum-sha256": sha,
                "cache-control": "public, max-age=31536000, immutable",
            }
            if if_none_match and sha in if_none_match:
                return Response(status_code=304, headers=headers)
            return Response(
                data,
                media_type="application/yaml" if path == MANIFEST_NAME else "application/json",
                headers=headers,
            )
        entry = next((f for f in b.files if f.path == path), None)
        if entry is None:
            raise NotFoundError(f"{name}@{version} has no file {path!r}")
        headers = {
            "etag": f'"{entry.sha256}"',
            "x-checksum-sha256": entry.sha256,
            "cache-control": "public, max-age=31536000, immutable",
        }
        if if_none_match and entry.sha256 in if_none_match:
            return Response(status_code=304, headers=headers)
        blob = svc.blobs.path(entry.sha256)
        if not blob.is_file():
            raise NotFoundError(f"{path} of {name}@{version} is missing from the blob store")
        return FileResponse(blob, headers=headers, media_type="application/octet-stream")

    # Deployments --------------------------------------------------------------------------------
    @app.post(
        "/api/v1/deployments",
        response_model=S.ApplyResult,
        tags=["deployments"],
        responses={201: {"model": S.ApplyResult}},
    )
    def apply(body: DeploymentManifest, p: Admin, response: Response) -> S.ApplyResult:
        """Make a deployment manifest true (idempotent, like `kubectl apply`)."""

        out = svc.execute(commands.apply_deployment, body, actor=p.name).value
        response.status_code = 201 if out.result == "created" else 200
        return out

    @app.get("/api/v1/deployments", response_model=list[S.DeploymentOut], tags=["deployments"])
    def list_deployments(session: Db, p: Admin) -> list[S.DeploymentOut]:
        deps = session.scalars(select(Deployment).order_by(Deployment.created_at)).all()
        return [deployment_out(d, targets=False) for d in deps]

    @app.get(
        "/api/v1/deployments/{name}",
        response_model=S.DeploymentOut,
        tags=["deployments"],
        responses={404: {"model": S.ErrorBody}},
    )
    def show_deployment(name: str, session: Db, p: Admin) -> S.DeploymentOut:
        return deployment_out(get_deployment(session, name))

    for _action in ControlAction:

        def _make(action: ControlAction) -> Any:
            def control(name: str, p: Admin) -> S.DeploymentOut:
                return svc.execute(commands.control_deployment, name, action, actor=p.name).value

            control.__name__ = f"{action.value}_deployment"
            control.__doc__ = {
                "pause": "Stop starting devices; those in flight finish.",
                "resume": "Continue a paused deployment; failed devices are tried again.",
                "abort": "Stop for good; devices keep what they have.",
                "rollback": "Send every device this deployment touched back to its previous model (signed).",
            }[action.value]
            return control

        app.post(
            f"/api/v1/deployments/{{name}}/{_action.value}",
            response_model=S.DeploymentOut,
            tags=["deployments"],
            responses={404: {"model": S.ErrorBody}, 409: {"model": S.ErrorBody}},
        )(_make(_action))

    @app.delete(
        "/api/v1/deployments/{name}",
        status_code=204,
        tags=["deployments"],
        responses={404: {"model": S.ErrorBody}, 409: {"model": S.ErrorBody}},
    )
    def delete_deployment(name: str, p: Admin) -> Response:
        svc.execute(commands.delete_deployment, name, actor=p.name)
        return Response(status_code=204)

    # Audit and status ---------------------------------------------------------------------------
    @app.get("/api/v1/audit", response_model=list[S.AuditOut], tags=["service"])
    def audit_log(
        session: Db,
        p: Admin,
        deployment: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 200,
    ) -> list[S.AuditOut]:
        q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        if deployment:
            q = q.where(AuditEntry.deployment == deployment)
        return [audit_out(a) for a in session.scalars(q)]

    @app.get("/api/v1/status", response_model=S.StatusOut, tags=["service"])
    def status(session: Db, p: Admin) -> S.StatusOut:
        deps: dict[str, int] = {}
        for st, n in session.execute(select(Deployment.status, func.count()).group_by(Deployment.status)):
            deps[st] = n
        return S.StatusOut(
            devices=session.scalar(select(func.count()).select_from(Device)) or 0,
            online=session.scalar(select(func.count()).select_from(Device).where(Device.online.is_(True)))
            or 0,
            models=session.scalar(select(func.count()).select_from(BundleRecord)) or 0,
            deployments=deps,
            mqtt_url=svc.mqtt_url,
            mqtt_connected=bool(svc.bridge and svc.bridge.connected.is_set()),
            public_url=svc.public_url,
            fleet_key_id=key_id_of(svc.signing_key.public_key),
        )

    from .offline.api import mount as mount_offline  # removable media (fleet/offline/, docs/offline.md)

    mount_offline(app, svc, Admin)

    from .dashboard import mount_dashboard  # the web UI at / (fleet/dashboard/)

    mount_dashboard(app, svc)
    return app
