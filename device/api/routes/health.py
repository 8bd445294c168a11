"""GET /healthz (alive), /readyz (a model answers a one-token probe) and /metrics (Prometheus): no auth."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from ..service import Service, probe, service_of

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(svc: Service = Depends(service_of)) -> JSONResponse:
    engine = svc.holder.engine
    if engine is None or engine.closed:
        return JSONResponse({"status": "not_ready", "reason": "no model loaded"}, status_code=503)
    if time.monotonic() - svc.last_ok > svc.settings.ready_probe_interval_s:
        try:
            await asyncio.to_thread(probe, svc.holder)
            svc.last_ok = time.monotonic()
        except Exception as exc:
            return JSONResponse({"status": "not_ready", "reason": f"probe failed: {exc}"}, status_code=503)
    return JSONResponse({"status": "ready", "model": engine.name, "version": engine.version})


@router.get("/metrics")
async def metrics(svc: Service = Depends(service_of)) -> Response:
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
