"""The request path shared by every route: auth, body parsing, model check, admission, the worker thread.

Request path: parse (400/413) -> model check (404; ``<base id>:<adapter>`` picks a resident LoRA adapter) ->
admission: a slot or a queue place (429/503) -> lease the current engine and resolve the request's adapter on
it -> encode and check the context (400) -> a worker thread generates and pushes
events to the handler (``events``). A client that goes away sets the cancel flag; the worker stops at the
next token and returns the slot and the lease."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from device.engine import ContextWindowError, Engine, SamplingParams, TextEvent
from device.engine.adapters import Adapter, UnknownAdapterError
from device.engine.constraints import engine_token_table
from device.engine.sampling import Constraint

from .errors import (
    AuthError,
    BadRequestError,
    BodyTooLargeError,
    ModelNotFoundError,
    QueueFullError,
    UnavailableError,
)
from .holder import ModelHolder, NoModelError
from .metrics import Metrics
from .settings import ApiSettings
from .stats import RequestRecord

DISCONNECT_POLL_S = 0.25

_DONE = object()


class Admission:
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
class Job:
    """One generation, run by a worker thread; the handler reads ``queue`` through ``Service.events``."""

    engine: Engine
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue[Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    extra: Any = None
    constraint: Constraint | None = None
    logprobs: int | None = None  # top-N per token (0: the chosen token's only), None: off
    adapter: Adapter | None = None  # the LoRA adapter the request's model id chose (None: the base alone)
    completion_tokens: int = 0
    finish_reason: str = "stop"
    release_lease: Callable[[], object] = lambda: None
    release_slot: Callable[[], object] = lambda: None

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": len(self.prompt),
            "completion_tokens": self.completion_tokens,
            "total_tokens": len(self.prompt) + self.completion_tokens,
        }


Encoder = Callable[[Engine], tuple[list[int], Any]]
ParamsMaker = Callable[[Engine, list[int], Any], SamplingParams]
ConstraintMaker = Callable[[Engine], Constraint]


class Service:
    """What the routes share: settings, metrics, admission and the generation workers of one app."""

    def __init__(self, holder: ModelHolder, settings: ApiSettings) -> None:
        self.holder = holder
        self.settings = settings
        self.metrics = Metrics(holder)
        self.executor = ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="nanofleet-gen"
        )
        self._admission: Admission | None = None  # created on the server's loop
        self.last_ok = 0.0

    def admission(self) -> Admission:
        if self._admission is None:
            self._admission = Admission(self.settings, self.holder)
        return self._admission

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

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
            message = f"{param}: {err['msg']}" if param else err["msg"]
            raise BadRequestError(message, code="invalid_value", param=param) from exc

    def check_model(self, requested: str | None) -> Engine:
        """The current engine, after checking ``requested`` names it or one of its adapters (404 otherwise)."""
        engine = self.holder.engine
        if engine is None or engine.closed:
            raise UnavailableError("no model is loaded yet", code="model_not_loaded")
        self.resolve_adapter(engine, requested)
        return engine

    def model_ids(self, engine: Engine) -> list[str]:
        """Every model id ``engine`` answers to: its name, then ``<name>:<adapter>`` per resident adapter."""
        return [engine.name, *(f"{engine.name}:{n}" for n in engine.adapters.names())]

    def resolve_adapter(self, engine: Engine, requested: str | None) -> Adapter | None:
        """The adapter a request's ``model`` selects on ``engine``: None for the base (its name, an alias, or no
        model given), the resident adapter for ``<base id>:<adapter name>``; anything else is a 404."""
        bases = (engine.name, *self.settings.model_aliases)
        if not requested or requested in bases:
            return None
        base, sep, name = requested.partition(":")  # bundle and adapter names never contain ':'
        if sep and base in bases:
            try:
                return engine.adapters.get(name)
            except UnknownAdapterError:
                pass
        raise ModelNotFoundError(
            f"the model {requested!r} does not exist; this server has {', '.join(map(repr, self.model_ids(engine)))}",
            code="model_not_found",
            param="model",
        )

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
        encode: Encoder,
        make_params: ParamsMaker,
        constraint: ConstraintMaker | None = None,
        logprobs: int | None = None,
        model: str | None = None,
    ) -> Job:
        """Admit, lease, encode, then start the worker; on any failure give everything back.
        ``constraint`` builds the job's per-request token constraint from the leased engine; ``model`` (the
        request's model id) picks the adapter on it, held for the whole generation."""
        adm = self.admission()
        await adm.acquire()
        lease = self.holder.lease()
        try:
            engine = lease.__enter__()
        except NoModelError as exc:
            adm.sem.release()
            raise UnavailableError(str(exc), code="model_not_loaded") from exc
        try:
            adapter = self.resolve_adapter(engine, model)  # on the leased engine: a swap may have come between
            prompt, extra = encode(engine)
            params = make_params(engine, prompt, extra)
            job_constraint = constraint(engine) if constraint is not None else None
        except BaseException:
            lease.__exit__(None, None, None)
            adm.sem.release()
            raise
        job = Job(engine, prompt, params, asyncio.Queue(), extra=extra, constraint=job_constraint, logprobs=logprobs,
                  adapter=adapter)  # fmt: skip
        job.release_lease = lambda: lease.__exit__(None, None, None)
        job.release_slot = adm.sem.release
        self.executor.submit(self._work, job, asyncio.get_running_loop())
        return job

    def _work(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        stats = self.holder.stats
        stats.adjust(in_flight=+1)
        t0 = time.perf_counter()
        first = last = None
        ok = True

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(job.queue.put_nowait, item)
            except RuntimeError:  # loop closed: server shutting down
                job.cancel.set()

        events = job.engine.stream_text(job.prompt, job.params, job.constraint, job.logprobs, job.adapter)
        try:
            if job.logprobs is not None:
                engine_token_table(job.engine)  # the bytes of each token, built once per engine, not on the loop
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
            self.metrics.errors.labels(kind="generation").inc()
            emit(exc)
        finally:
            events.close()
            stats.adjust(in_flight=-1)
            self._record(job, t0, first, last, ok)
            # the lease first (a swap may be waiting to close the engine), then the slot, on the loop's thread
            job.release_lease()
            try:
                loop.call_soon_threadsafe(job.release_slot)
            except RuntimeError:
                pass  # loop closed: nothing is waiting for the slot
            emit(_DONE)

    def _record(self, job: Job, t0: float, first: float | None, last: float | None, ok: bool) -> None:
        m = self.metrics
        ttft = None if first is None else first - t0
        decode_s = 0.0 if first is None or last is None else last - first
        self.holder.stats.record(RequestRecord(ttft, len(job.prompt), job.completion_tokens, decode_s, ok))
        m.prompt_tokens.inc(len(job.prompt))
        m.completion_tokens.inc(job.completion_tokens)
        if ttft is not None:
            m.ttft.observe(ttft)
            m.decode.observe(decode_s)
            if job.completion_tokens > 1:
                m.tpot.observe(decode_s / (job.completion_tokens - 1))
        if ok and job.finish_reason != "cancelled":
            self.last_ok = time.monotonic()

    async def events(self, job: Job, request: Request | None = None) -> AsyncIterator[TextEvent]:
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


def probe(holder: ModelHolder) -> None:
    """One greedy token through the current engine: the model is loaded *and* answering."""
    with holder.lease() as engine:
        start = engine.arch.bos_token_id if engine.arch.bos_token_id is not None else 0
        engine.greedy([start], 1)


def service_of(request: Request) -> Service:
    """The app's Service (a FastAPI dependency)."""
    return request.app.state.service


async def require_auth(request: Request) -> None:
    """The bearer-token check of /v1/* (a FastAPI dependency; /healthz, /readyz, /metrics stay open)."""
    service_of(request).check_auth(request)
