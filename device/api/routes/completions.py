"""POST /v1/completions (a text prompt or token ids): text or ``response_format`` JSON, logprobs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from device.engine import Engine, SamplingParams, TextEvent

from .. import structured
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
        self._lp: structured.CompletionLogprobs | None = None

    def _logprobs(self, events: list[TextEvent]) -> dict[str, Any] | None:
        if self.job.logprobs is None:
            return None
        if self._lp is None:  # the worker built the token table before the first token
            self._lp = structured.CompletionLogprobs(structured.token_table(self.job.engine), len(self.prefix))
        return self._lp.of([ev.logprob for ev in events if ev.logprob is not None and ev.token_id is not None])

    def opening_choices(self) -> list[dict[str, Any]]:
        if not self.prefix:
            return []
        return [{"index": 0, "text": self.prefix, "logprobs": None, "finish_reason": None}]

    def event_choices(self, ev: TextEvent) -> list[dict[str, Any]]:
        if not ev.text and ev.logprob is None:
            return []
        return [{"index": 0, "text": ev.text, "logprobs": self._logprobs([ev]), "finish_reason": None}]

    def closing_choices(self) -> list[dict[str, Any]]:
        return [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason(self.job)}]

    def choice(self, events: list[TextEvent]) -> dict[str, Any]:
        text = self.prefix + "".join(ev.text for ev in events)
        return {"index": 0, "text": text, "logprobs": self._logprobs(events), "finish_reason": finish_reason(self.job)}


@router.post("/completions")
async def completions(request: Request, svc: Service = Depends(service_of)) -> Response:
    req: CompletionRequest = await svc.read_body(request, CompletionRequest)
    svc.check_model(req.model)
    if req.echo and req.logprobs is not None:
        raise BadRequestError(
            "logprobs with echo (scores of the prompt's tokens) is not supported", code="unsupported", param="echo"
        )
    grammar = structured.grammar_for(req.response_format)

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

    job = await svc.start(encode, params, structured.constraint_maker(grammar), req.logprobs, req.model)
    include_usage = bool((req.stream_options or {}).get("include_usage"))
    writer = CompletionWriter(job, job.extra if req.echo else "")
    return await respond(svc, request, writer, req.stream, include_usage)
