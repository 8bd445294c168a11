"""POST /v1/chat/completions: text, ``response_format`` JSON, tool calls, logprobs; streaming or not."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from device.engine import Engine, SamplingParams, TextEvent
from device.engine.sampling import TokenLogprob

from .. import structured
from ..schemas import ChatCompletionRequest
from ..service import Job, Service, require_auth, service_of
from ..streaming import ResponseWriter, finish_reason, respond
from ..tools import CallDelta, ToolCallParser, ToolPlan, render

router = APIRouter(prefix="/v1", dependencies=[Depends(require_auth)])


class ChatWriter(ResponseWriter):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, job: Job, tools_active: bool) -> None:
        super().__init__(job)
        self.parser = ToolCallParser() if tools_active else None
        self.pending: list[TokenLogprob] = []  # logprobs not yet sent (their text is held back)

    def _finish(self) -> str:
        reason = finish_reason(self.job)
        return "tool_calls" if reason == "stop" and self.parser is not None and self.parser.is_calls else reason

    def _logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.job.logprobs is None:
            return None
        table = structured.token_table(self.job.engine)  # built by the worker before the first token
        return {"content": [structured.chat_logprob(table, lp) for lp in lps], "refusal": None}

    def _deltas(self, text: str) -> list[dict[str, Any]]:
        if self.parser is None:
            return [{"content": text}] if text else []
        return [_delta(d) for d in self.parser.feed(text)]

    def _choices(self, deltas: list[dict[str, Any]], finish: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"index": 0, "delta": d, "finish_reason": finish} for d in deltas]
        if self.job.logprobs is not None:
            for choice in out:
                choice["logprobs"] = None
            if out and self.pending:  # a chunk carries the logprobs of the tokens whose text it completes
                out[0]["logprobs"] = self._logprobs(self.pending)
                self.pending = []
        return out

    def opening_choices(self) -> list[dict[str, Any]]:
        delta: dict[str, Any] = {"role": "assistant"} if self.parser else {"role": "assistant", "content": ""}
        return [{"index": 0, "delta": delta, "finish_reason": None}]

    def event_choices(self, ev: TextEvent) -> list[dict[str, Any]]:
        if ev.logprob is not None and ev.token_id is not None:
            self.pending.append(ev.logprob)
        return self._choices(self._deltas(ev.text))

    def closing_choices(self) -> list[dict[str, Any]]:
        tail = [_delta(d) for d in self.parser.finish()] if self.parser else []
        if self.pending and not tail:
            tail = [{}]
        return [*self._choices(tail), {"index": 0, "delta": {}, "finish_reason": self._finish()}]

    def choice(self, events: list[TextEvent]) -> dict[str, Any]:
        text = "".join(ev.text for ev in events)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.parser is not None:
            self.parser.feed(text)
            self.parser.finish()
            if self.parser.is_calls:
                message["content"] = None
                message["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in self.parser.calls
                ]
        lps = [ev.logprob for ev in events if ev.logprob is not None and ev.token_id is not None]
        return {"index": 0, "message": message, "logprobs": self._logprobs(lps), "finish_reason": self._finish()}


def _delta(d: CallDelta) -> dict[str, Any]:
    if d.index is None:
        return {"content": d.content}
    call: dict[str, Any] = {"index": d.index}
    if d.id is not None:
        call.update(id=d.id, type="function", function={"name": d.name, "arguments": ""})
    else:
        call["function"] = {"arguments": d.arguments}
    return {"tool_calls": [call]}


@router.post("/chat/completions")
async def chat_completions(request: Request, svc: Service = Depends(service_of)) -> Response:
    req: ChatCompletionRequest = await svc.read_body(request, ChatCompletionRequest)
    svc.check_model(req.model)
    tp = ToolPlan.of(req.tools, req.tool_choice, req.parallel_tool_calls)
    grammar = structured.grammar_for(req.response_format, tp)

    def encode(engine: Engine) -> tuple[list[int], Any]:
        messages, template_tools = render(engine, req.messages, tp)
        return engine.encode_chat(messages, tools=template_tools), None

    def params(engine: Engine, prompt: list[int], _extra: Any) -> SamplingParams:
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return svc.sampling(req, len(prompt), mt, engine.context_length)

    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    job = await svc.start(encode, params, structured.constraint_maker(grammar), logprobs, req.model)
    include_usage = bool((req.stream_options or {}).get("include_usage"))
    return await respond(svc, request, ChatWriter(job, tp.active), req.stream, include_usage)
