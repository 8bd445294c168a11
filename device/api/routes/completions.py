"""POST /v1/completions (a text prompt or token ids)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from device.engine import Engine, SamplingParams, TextEvent

from ..errors import BadRequestError
from ..schemas import CompletionRequest
from ..service import Job, Service, require_auth, service_of
from ..streaming import ResponseWriter, finish_reason, respond

router = APIRouter(prefix="/v1", dependencies=[Depends(require_auth)])


class CompletionWriter(ResponseWriter):
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, job: Job, prefix: str) -> None:
        super().__init__(job)
        self.prefix = prefix  # the echoed prompt, or ""

    def opening_choices(self) -> list[dict[str, Any]]:
        if not self.prefix:
            return []
        return [{"index": 0, "text": self.prefix, "logprobs": None, "finish_reason": None}]

    def event_choices(self, ev: TextEvent) -> list[dict[str, Any]]:
        if not ev.text:
            return []
        return [{"index": 0, "text": ev.text, "logprobs": None, "finish_reason": None}]

    def closing_choices(self) -> list[dict[str, Any]]:
        return [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason(self.job)}]

    def choice(self, events: list[TextEvent]) -> dict[str, Any]:
        text = self.prefix + "".join(ev.text for ev in events)
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(self.job)}


@router.post("/completions")
async def completions(request: Request, svc: Service = Depends(service_of)) -> Response:
    req: CompletionRequest = await svc.read_body(request, CompletionRequest)
    svc.check_model(req.model)

    def encode(engine: Engine) -> tuple[list[int], Any]:
        p = req.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise BadRequestError("only one prompt per request", code="invalid_value", param="prompt")
            p = p[0]
        if isinstance(p, str):
            return engine.encode(p), p
        ids = [int(x) for x in p]
        return ids, engine.decode(ids) if req.echo else ""

    def params(engine: Engine, prompt: list[int], _extra: Any) -> SamplingParams:
        return svc.sampling(req, len(prompt), req.max_tokens, engine.context_length)

    job = await svc.start(encode, params)
    include_usage = bool((req.stream_options or {}).get("include_usage"))
    writer = CompletionWriter(job, job.extra if req.echo else "")
    return await respond(svc, request, writer, req.stream, include_usage)
