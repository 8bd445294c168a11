"""One response path for every generating endpoint: a job's events become either one JSON body or an SSE
stream of chunks ending with ``data: [DONE]``. An endpoint only says how its choices look (a
``ResponseWriter``); the streaming, the error chunk, the usage chunk and cancellation live here once."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from device.engine import EngineError, TextEvent

from .errors import ApiError
from .service import Job, Service

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def finish_reason(job: Job) -> str:
    """OpenAI's finish reason of a job: "length" when it hit a limit, else "stop"."""
    return "length" if job.finish_reason == "length" else "stop"


class ResponseWriter:
    """How one endpoint's choices look. Subclasses fill in the ``*_choices`` hooks and ``message``."""

    object_name = "response"  # the non-streaming body's "object"
    chunk_object_name = "response.chunk"
    id_prefix = "resp"

    def __init__(self, job: Job) -> None:
        self.job = job
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        # the id the request chose: the base's name, or "<base>:<adapter>" (OpenAI echoes the model asked for)
        self.model = job.engine.name + (f":{job.adapter.name}" if job.adapter is not None else "")

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.chunk_object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    # -- streaming hooks: each returns the choices of zero or more chunks
    def opening_choices(self) -> list[dict[str, Any]]:
        return []

    def event_choices(self, ev: TextEvent) -> list[dict[str, Any]]:
        raise NotImplementedError

    def closing_choices(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    # -- non-streaming
    def choice(self, events: list[TextEvent]) -> dict[str, Any]:
        raise NotImplementedError

    def body(self, events: list[TextEvent]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": [self.choice(events)],
            "usage": self.job.usage(),
        }


async def collect(svc: Service, job: Job, request: Request) -> list[TextEvent]:
    """Every event of a non-streaming job; a client that disconnects meanwhile cancels it."""
    events: list[TextEvent] = []
    try:
        async for ev in svc.events(job, request):
            events.append(ev)
    except EngineError:
        raise
    except Exception as exc:
        raise ApiError(f"generation failed: {exc}") from exc
    finally:
        job.cancel.set()
    return events


def stream_response(svc: Service, writer: ResponseWriter, include_usage: bool) -> StreamingResponse:
    """The SSE stream of a job. A generation error mid-stream becomes an error chunk, then [DONE]."""
    job = writer.job

    async def body() -> AsyncIterator[bytes]:
        try:
            for choice in writer.opening_choices():
                yield sse(writer.chunk([choice]))
            try:
                async for ev in svc.events(job):
                    for choice in writer.event_choices(ev):
                        yield sse(writer.chunk([choice]))
                closing = writer.closing_choices()
            except Exception as exc:
                err = {"message": str(exc), "type": "server_error", "param": None, "code": None}
                yield sse({"error": err})
                yield DONE
                return
            for choice in closing:
                yield sse(writer.chunk([choice]))
            if include_usage:
                yield sse(writer.chunk([], usage=job.usage()))
            yield DONE
        finally:
            job.cancel.set()  # client gone (task cancelled) or done: either way stop

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


async def respond(
    svc: Service, request: Request, writer: ResponseWriter, stream: bool, include_usage: bool
) -> Response:
    """The job's answer: an SSE stream, or (collected) one JSON body."""
    if stream:
        return stream_response(svc, writer, include_usage)
    events = await collect(svc, writer.job, request)
    return JSONResponse(writer.body(events))
