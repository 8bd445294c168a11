"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from device.engine import Engine, SamplingParams, TextEvent

from ..schemas import ChatCompletionRequest
from ..service import Service, require_auth, service_of
from ..streaming import ResponseWriter, finish_reason, respond

router = APIRouter(prefix="/v1", dependencies=[Depends(require_auth)])


class ChatWriter(ResponseWriter):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def opening_choices(self) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]

    def event_choices(self, ev: TextEvent) -> list[dict[str, Any]]:
        if not ev.text:
            return []
        return [{"index": 0, "delta": {"content": ev.text}, "finish_reason": None}]

    def closing_choices(self) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": {}, "finish_reason": finish_reason(self.job)}]

    def choice(self, events: list[TextEvent]) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(ev.text for ev in events)},
            "logprobs": None,
            "finish_reason": finish_reason(self.job),
        }


@router.post("/chat/completions")
async def chat_completions(request: Request, svc: Service = Depends(service_of)) -> Response:
    req: ChatCompletionRequest = await svc.read_body(request, ChatCompletionRequest)
    svc.check_model(req.model)

    def encode(engine: Engine) -> tuple[list[int], Any]:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return engine.encode_chat(messages), None

    def params(engine: Engine, prompt: list[int], _extra: Any) -> SamplingParams:
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return svc.sampling(req, len(prompt), mt, engine.context_length)

    job = await svc.start(encode, params)
    include_usage = bool((req.stream_options or {}).get("include_usage"))
    return await respond(svc, request, ChatWriter(job), req.stream, include_usage)
