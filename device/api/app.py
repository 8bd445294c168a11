"""The OpenAI-compatible local API over a ModelHolder.

Request path: parse (400/413) -> model check (404) -> admission: a slot or a queue place (429/503) ->
lease the current engine -> encode and check the context (400) -> a worker thread generates and pushes
events to the handler -> JSON or SSE. A client that goes away sets the cancel flag; the worker stops at
the next token and returns the slot and the lease."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from device.engine import (
    ContextWindowError,
    Engine,
    EngineError,
    InvalidParamsError,
    SamplingParams,
    TextEvent,
)

from .errors import (
    ApiError,
    AuthError,
    BadRequestError,
    BodyTooLargeError,
    ModelNotFoundError,
    QueueFullError,
    UnavailableError,
)
from .holder import ModelHolder, NoModelError
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest
from .settings import ApiSettings
from .stats import RequestRecord

_DONE = object()

DISCONNECT_POLL_S = 0.25


class _Admission:
    """At most ``max_concurrency`` generations; at most ``max_queue`` waiting; the rest are refused."""

    def __init__(self, settings: ApiSettings, holder: ModelHolder) -> None:
        self.settings = settings
        self.holder = holder
        self.sem = asyncio.Semaphore(settings.max_concurrency)
        self.waiting = 0

    async def acquire(self) -> None:
        if self.sem.locked() and self.waiting >= self.settings.max_queue:
            err_cls = QueueFullError if self.settings.queue_full_status == 429 else UnavailableError
            raise err_cls("the server is busy: queue full, retry later", code="queue_full")
        self.waiting += 1
        self.holder.stats.adjust(queue=+1)
        try:
            await self.sem.acquire()
        finally:
            self.waiting -= 1
            self.holder.stats.adjust(queue=-1)


@dataclass
class _Job:
    """One generation, run by a worker thread; the handler reads ``queue``."""

    engine: Engine
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue[Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    extra: Any = None
    completion_tokens: int = 0
    finish_reason: str = "stop"
    release_lease: Callable[[], object] = lambda: None
    release_slot: Callable[[], object] = lambda: None


class _Service:
    def __init__(self, holder: ModelHolder, settings: ApiSettings) -> None:
        self.holder = holder
        self.settings = settings
        self.metrics = Metrics(holder)
        self.executor = ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="nanofleet-gen"
        )
        self.admission: _Admission | None = None  # created on the server's loop
        self.last_ok = 0.0

    def _admission(self) -> _Admission:
        if self.admission is None:
            self.admission = _Admission(self.settings, self.holder)
        return self.admission

    # ------------------------------------------------------------ request edges

    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if not key:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:].encode(), key.encode())):
            raise AuthError("missing or wrong bearer token", code="invalid_api_key")

    async def read_body(self, request: Request, model: type[BaseModel]) -> Any:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise BodyTooLargeError(f"request body over {limit} bytes", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLargeError(f"request body over {limit} bytes", code="body_too_large")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks) or b"null")
        except ValueError as exc:
            raise BadRequestError(f"body is not valid JSON: {exc}", code="invalid_json") from exc
        if not isinstance(data, dict):
            raise BadRequestError("body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise BadRequestError(f"{param}: {err['msg']}", code="invalid_value", param=param) from exc

    def check_model(self, requested: str | None) -> Engine:
        engine = self.holder.engine
        if engine is None or engine.closed:
            raise UnavailableError("no model is loaded yet", code="model_not_loaded")
        if requested and requested not in (engine.name, *self.settings.model_aliases):
            raise ModelNotFoundError(
                f"the model {requested!r} does not exist; this server has {engine.name!r}",
                code="model_not_found",
                param="model",
            )
        return engine

    def sampling(self, req: Any, prompt_len: int, max_tokens: int | None, context: int) -> SamplingParams:
        if prompt_len >= context:
            raise ContextWindowError(
                f"this model's maximum context length is {context} tokens; the prompt has {prompt_len}"
            )
        if max_tokens is None:
            max_tokens = min(self.settings.default_max_tokens, context - prompt_len)
        elif prompt_len + max_tokens > context:
            raise ContextWindowError(
                f"this model's maximum context length is {context} tokens; you requested "
                f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate)"
            )
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            repetition_penalty=req.repetition_penalty,
            seed=req.seed,
            stop=tuple(req.stop_list()),
            ignore_eos=req.ignore_eos,
        )

    # ------------------------------------------------------------ generation

    async def start(
        self,
        encode: Callable[[Engine], tuple[list[int], Any]],
        make_params: Callable[[Engine, list[int], Any], SamplingParams],
    ) -> _Job:
        """Admit, lease, encode, then start the worker; on any failure give everything back."""
        adm = self._admission()
        await adm.acquire()
        lease = self.holder.lease()
        try:
            engine = lease.__enter__()
        except NoModelError as exc:
            adm.sem.release()
            raise UnavailableError(str(exc), code="model_not_loaded") from exc
        try:
            prompt, extra = encode(engine)
            params = make_params(engine, prompt, extra)
        except BaseException:
            lease.__exit__(None, None, None)
            adm.sem.release()
            raise
        job = _Job(engine, prompt, params, asyncio.Queue(), extra=extra)
        job.release_lease = lambda: lease.__exit__(None, None, None)
        job.release_slot = adm.sem.release
        self.executor.submit(self._work, job, asyncio.get_running_loop())
        return job

    def _work(self, job: _Job, loop: asyncio.AbstractEventLoop) -> None:
        stats, m = self.holder.stats, self.metrics
        stats.adjust(in_flight=+1)
        t0 = time.perf_counter()
        first = last = None
        ok = True

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(job.queue.put_nowait, item)
            except RuntimeError:  # loop closed: server shutting down
                job.cancel.set()

        events = job.engine.stream_text(job.prompt, job.params)
        try:
            for ev in events:
                if ev.token_id is not None:
                    job.completion_tokens += 1
                    last = time.perf_counter()
                    if first is None:
                        first = last
                if ev.finish_reason:
                    job.finish_reason = ev.finish_reason
                emit(ev)
                if job.cancel.is_set():
                    job.finish_reason = "cancelled"
                    break
        except Exception as exc:  # reported to the client as a server error
            ok = False
            m.errors.labels(kind="generation").inc()
            emit(exc)
        finally:
            events.close()
            stats.adjust(in_flight=-1)
            ttft = None if first is None else first - t0
            decode_s = 0.0 if first is None or last is None else last - first
            stats.record(RequestRecord(ttft, len(job.prompt), job.completion_tokens, decode_s, ok))
            m.prompt_tokens.inc(len(job.prompt))
            m.completion_tokens.inc(job.completion_tokens)
            if ttft is not None:
                m.ttft.observe(ttft)
                m.decode.observe(decode_s)
                if job.completion_tokens > 1:
                    m.tpot.observe(decode_s / (job.completion_tokens - 1))
            if ok and job.finish_reason != "cancelled":
                self.last_ok = time.monotonic()
            # the lease first (a swap may be waiting to close the engine), then the slot, on the loop's thread
            job.release_lease()
            try:
                loop.call_soon_threadsafe(job.release_slot)
            except RuntimeError:
                pass  # loop closed: nothing is waiting for the slot
            emit(_DONE)

    async def events(self, job: _Job, request: Request | None = None) -> AsyncIterator[TextEvent]:
        """Events of a job; when ``request`` is given, a client that disconnects cancels it."""
        # Look for a disconnect every DISCONNECT_POLL_S of wall time, whether or not tokens are flowing:
        # a fast model never leaves the queue idle long enough for a timeout-only check to run.
        next_check = time.monotonic() + DISCONNECT_POLL_S
        while True:
            try:
                item = await asyncio.wait_for(job.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                item = None
            if request is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    job.cancel.set()
            if item is None:
                continue
            if item is _DONE:
                return
            if isinstance(item, Exception):
                raise item
            yield item


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _usage(job: _Job) -> dict[str, int]:
    return {
        "prompt_tokens": len(job.prompt),
        "completion_tokens": job.completion_tokens,
        "total_tokens": len(job.prompt) + job.completion_tokens,
    }


def _finish(job: _Job) -> str:
    return "length" if job.finish_reason == "length" else "stop"


class _StatusMiddleware:
    """Counts every HTTP response by endpoint and status (pure ASGI: streaming stays intact)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint=endpoint, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


_ENDPOINTS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/healthz",
    "/readyz",
    "/metrics",
}


def create_app(holder: ModelHolder, settings: ApiSettings | None = None) -> FastAPI:
    """The FastAPI app serving whatever engine ``holder`` holds now."""
    settings = settings or ApiSettings()
    svc = _Service(holder, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        svc.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nanofleet device API", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = svc
    app.state.holder = holder
    app.add_middleware(_StatusMiddleware, metrics=svc.metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        kind = exc.code or exc.type
        svc.metrics.errors.labels(kind=kind).inc()
        if isinstance(exc, (QueueFullError, UnavailableError)) and exc.code == "queue_full":
            holder.stats.record_rejected()
            return exc.response({"Retry-After": "1"})
        holder.stats.record_error()
        return exc.response()

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        if isinstance(exc, InvalidParamsError):
            return await _api_error(request, BadRequestError(str(exc), code=exc.code))
        return await _api_error(request, ApiError(str(exc), code=exc.code))

    async def guarded(request: Request, handler: Callable[[], Awaitable[Response]]) -> Response:
        svc.check_auth(request)
        return await handler()

    # ------------------------------------------------------------------ health

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        engine = holder.engine
        if engine is None or engine.closed:
            return JSONResponse({"status": "not_ready", "reason": "no model loaded"}, status_code=503)
        if time.monotonic() - svc.last_ok > settings.ready_probe_interval_s:
            try:
                await asyncio.to_thread(_probe, holder)
                svc.last_ok = time.monotonic()
            except Exception as exc:
                return JSONResponse(
                    {"status": "not_ready", "reason": f"probe failed: {exc}"}, status_code=503
                )
        return JSONResponse({"status": "ready", "model": engine.name, "version": engine.version})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ OpenAI

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        async def handle() -> Response:
            engine = holder.engine
            data = []
            if engine is not None and not engine.closed:
                created = int(engine.manifest.created_at.timestamp()) if engine.manifest else 0
                data.append(
                    {"id": engine.name, "object": "model", "created": created, "owned_by": "nanofleet"}
                )
            return JSONResponse({"object": "list", "data": data})

        return await guarded(request, handle)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        async def handle() -> Response:
            req: ChatCompletionRequest = await svc.read_body(request, ChatCompletionRequest)
            svc.check_model(req.model)

            def encode(engine: Engine) -> tuple[list[int], Any]:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                return engine.encode_chat(messages), None

            def params(engine: Engine, prompt: list[int], _extra: Any) -> SamplingParams:
                mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
                return svc.sampling(req, len(prompt), mt, engine.context_length)

            job = await svc.start(encode, params)
            rid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), job.engine.name
            if req.stream:
                include_usage = bool((req.stream_options or {}).get("include_usage"))

                async def sse() -> AsyncIterator[bytes]:
                    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
                    try:
                        yield _sse(
                            {
                                **base,
                                "choices": [
                                    {
                                        "index": 0,
                                        "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None,
                                    }
                                ],
                            }
                        )
                        try:
                            async for ev in svc.events(job):
                                if ev.text:
                                    yield _sse(
                                        {
                                            **base,
                                            "choices": [
                                                {
                                                    "index": 0,
                                                    "delta": {"content": ev.text},
                                                    "finish_reason": None,
                                                }
                                            ],
                                        }
                                    )
                        except Exception as exc:
                            yield _sse(
                                {
                                    "error": {
                                        "message": str(exc),
                                        "type": "server_error",
                                        "param": None,
                                        "code": None,
                                    }
                                }
                            )
                            yield b"data: [DONE]\n\n"
                            return
                        yield _sse(
                            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": _finish(job)}]}
                        )
                        if include_usage:
                            yield _sse({**base, "choices": [], "usage": _usage(job)})
                        yield b"data: [DONE]\n\n"
                    finally:
                        job.cancel.set()  # client gone (task cancelled) or done: either way stop

                return StreamingResponse(
                    sse(),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            parts: list[str] = []
            try:
                async for ev in svc.events(job, request):
                    parts.append(ev.text)
            except EngineError:
                raise
            except Exception as exc:
                raise ApiError(f"generation failed: {exc}") from exc
            finally:
                job.cancel.set()
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(parts)},
                            "logprobs": None,
                            "finish_reason": _finish(job),
                        }
                    ],
                    "usage": _usage(job),
                }
            )

        return await guarded(request, handle)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        async def handle() -> Response:
            req: CompletionRequest = await svc.read_body(request, CompletionRequest)
            svc.check_model(req.model)

            def encode(engine: Engine) -> tuple[list[int], Any]:
                p = req.prompt
                if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
                    if len(p) != 1:
                        raise BadRequestError(
                            "only one prompt per request", code="invalid_value", param="prompt"
                        )
                    p = p[0]
                if isinstance(p, str):
                    return engine.encode(p), p
                ids = [int(x) for x in p]
                return ids, engine.decode(ids) if req.echo else ""

            def params(engine: Engine, prompt: list[int], _extra: Any) -> SamplingParams:
                return svc.sampling(req, len(prompt), req.max_tokens, engine.context_length)

            job = await svc.start(encode, params)
            rid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), job.engine.name
            prefix = job.extra if req.echo else ""
            if req.stream:
                include_usage = bool((req.stream_options or {}).get("include_usage"))

                async def sse() -> AsyncIterator[bytes]:
                    base = {"id": rid, "object": "text_completion", "created": created, "model": model}
                    try:
                        if prefix:
                            yield _sse(
                                {
                                    **base,
                                    "choices": [
                                        {"index": 0, "text": prefix, "logprobs": None, "finish_reason": None}
                                    ],
                                }
                            )
                        try:
                            async for ev in svc.events(job):
                                if ev.text:
                                    yield _sse(
                                        {
                                            **base,
                                            "choices": [
                                                {
                                                    "index": 0,
                                                    "text": ev.text,
                                                    "logprobs": None,
                                                    "finish_reason": None,
                                                }
                                            ],
                                        }
                                    )
                        except Exception as exc:
                            yield _sse(
                                {
                                    "error": {
                                        "message": str(exc),
                                        "type": "server_error",
                                        "param": None,
                                        "code": None,
                                    }
                                }
                            )
                            yield b"data: [DONE]\n\n"
                            return
                        yield _sse(
                            {
                                **base,
                                "choices": [
                                    {"index": 0, "text": "", "logprobs": None, "finish_reason": _finish(job)}
                                ],
                            }
                        )
                        if include_usage:
                            yield _sse({**base, "choices": [], "usage": _usage(job)})
                        yield b"data: [DONE]\n\n"
                    finally:
                        job.cancel.set()

                return StreamingResponse(
                    sse(),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            parts: list[str] = [prefix]
            try:
                async for ev in svc.events(job, request):
                    parts.append(ev.text)
            except EngineError:
                raise
            except Exception as exc:
                raise ApiError(f"generation failed: {exc}") from exc
            finally:
                job.cancel.set()
            return JSONResponse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": 0, "text": "".join(parts), "logprobs": None, "finish_reason": _finish(job)}
                    ],
                    "usage": _usage(job),
                }
            )

        return await guarded(request, handle)

    return app


def _probe(holder: ModelHolder) -> None:
    """One greedy token through the current engine: the model is loaded *and* answering."""
    with holder.lease() as engine:
        start = engine.arch.bos_token_id if engine.arch.bos_token_id is not None else 0
        engine.greedy([start], 1)
