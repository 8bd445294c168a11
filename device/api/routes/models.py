"""GET /v1/models: the model this server holds now, and each LoRA adapter resident over it as
``<base id>:<adapter name>`` (``parent``: the base id, as vLLM lists its LoRA modules)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from ..service import Service, require_auth, service_of

router = APIRouter(prefix="/v1", dependencies=[Depends(require_auth)])


@router.get("/models")
async def list_models(svc: Service = Depends(service_of)) -> JSONResponse:
    engine = svc.holder.engine
    data = []
    if engine is not None and not engine.closed:
        m = engine.manifest
        created = int(m.created_at.timestamp()) if m else 0
        entry = {"id": engine.name, "object": "model", "created": created, "owned_by": "nanofleet"}
        if m is not None:  # which version of the bundle serves (the id stays the name across updates)
            entry.update(version=m.version, bundle=m.ref)
        data.append(entry)
        for adapter in engine.adapters.snapshot():
            data.append({"id": f"{engine.name}:{adapter.name}", "object": "model",
                         "created": int(adapter.manifest.created_at.timestamp()), "owned_by": "nanofleet",
                         "parent": engine.name, "version": adapter.version})  # fmt: skip
    return JSONResponse({"object": "list", "data": data})
