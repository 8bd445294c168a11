"""The model edge: load a bundle, health-check it, swap it into service (draining), report serving stats.

The update state machine codes against the small ``ModelRuntime`` protocol, so it and its tests do not
depend on onnxruntime. ``EngineRuntime`` is the real one: ``device.engine`` + the local API of
``device.api`` (``ModelHolder.swap`` drains in-flight requests). A config may name a plug-in runtime
as ``module:factory`` (the factory takes the AgentConfig).
"""

from __future__ import annotations

import importlib
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from manifests import BundleManifest

from .errors import ConfigError, HealthCheckError, ModelLoadError

if TYPE_CHECKING:
    from .config import AgentConfig


@dataclass(frozen=True)
class ServingInfo:
    name: str
    version: int
    slot: str
    manifest_sha256: str


class LoadedModel(Protocol):
    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]: ...

    def perplexity(self, token_ids: Sequence[int]) -> float: ...

    def close(self) -> None: ...


class ModelRuntime(Protocol):
    def start(self) -> None:
        """Start the local API (it answers 503 until a model is served)."""

    def load(self, bundle_dir: Path, manifest: BundleManifest) -> LoadedModel: ...

    def serve(self, model: LoadedModel, info: ServingInfo) -> None:
        """Put ``model`` in service; in-flight requests finish on the previous one, which is then closed."""

    def serving(self) -> ServingInfo | None: ...

    def stats(self) -> dict[str, Any]:
        """decode_tok_s, ttft_p50_ms, ttft_p95_ms, requests, errors, queue_depth (missing keys: unknown)."""

    def stop(self) -> None: ...


def health_check(model: LoadedModel, manifest: BundleManifest) -> dict[str, Any]:
    """The activation gate: golden tokens, the latency budget, and a finite perplexity (no NaN/inf)."""
    golden = manifest.golden
    if golden is None:
        probe = [manifest.arch.bos_token_id or 1, 2, 3, 4]
        ppl = model.perplexity(probe)
        if not math.isfinite(ppl):
            raise HealthCheckError(f"perplexity on a probe is {ppl}: the model produces NaN/inf")
        return {"golden": False, "perplexity": ppl}
    n = len(golden.expected_token_ids)
    t0 = time.perf_counter()
    got = list(model.greedy(golden.prompt_token_ids, n))
    elapsed_ms = (time.perf_counter() - t0) * 1000.0
    if got != list(golden.expected_token_ids):
        first = next(
            (i for i, (a, b) in enumerate(zip(got, golden.expected_token_ids, strict=False)) if a != b),
            min(len(got), n),
        )
        raise HealthCheckError(
            f"golden output differs at token {first}: got {got[: first + 3]}..., "
            f"expected {list(golden.expected_token_ids)[: first + 3]}..."
        )
    if elapsed_ms > golden.latency_budget_ms:
        raise HealthCheckError(
            f"golden prompt took {elapsed_ms:.0f} ms, over the {golden.latency_budget_ms:.0f} ms budget"
        )
    ppl = model.perplexity(list(golden.prompt_token_ids) + list(golden.expected_token_ids))
    if not math.isfinite(ppl):
        raise HealthCheckError(f"perplexity on the golden text is {ppl}: the model produces NaN/inf")
    return {"golden": True, "latency_ms": round(elapsed_ms, 1), "perplexity": ppl}


class EngineRuntime:
    """onnxruntime engine (device.engine) behind the local OpenAI-compatible API (device.api)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._holder: Any = None
        self._server: Any = None
        self._info: ServingInfo | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        from device.api import ApiServer, ApiSettings, ModelHolder, create_app

        api = self.config.api
        self._holder = ModelHolder()
        settings = ApiSettings(host=api.bind, port=api.port, api_key=api.resolved_token())
        self._server = ApiServer(create_app(self._holder, settings), host=api.bind, port=api.port).start()

    def load(self, bundle_dir: Path, manifest: BundleManifest) -> LoadedModel:
        from device.engine import Engine, EngineOptions

        try:
            # The agent verified the slot already; a second hashing pass would double the activation time.
            limits = self.config.limits
            cache = str(self.config.layout.weights_cache) if limits.weights_cache else None
            options = EngineOptions(threads=limits.threads, weights_cache=cache)
            return Engine.from_bundle(bundle_dir, None, options=options)
        except Exception as exc:  # onnxruntime/tokenizers raise many kinds: translate at the edge
            raise ModelLoadError(f"cannot load {manifest.ref}: {type(exc).__name__}: {exc}") from exc

    def serve(self, model: LoadedModel, info: ServingInfo) -> None:
        from .adapters import attach_resident

        attach_resident(model, self.config.data_dir)  # before it serves: no request sees it without them
        with self._lock:
            # swap drains: in-flight requests and streams finish on the old engine, which is then closed
            self._holder.swap(model)
            self._info = info

    def serving(self) -> ServingInfo | None:
        return self._info

    def activate_adapter(self, folder: Path, manifest: Any, probe_ids: list[int]) -> dict[str, Any]:
        """Make a verified adapter resident over the serving engine (device/agent/adapters.py)."""
        from .adapters import activate_on_engine

        engine = self._holder.engine if self._holder is not None else None
        if engine is None:
            raise ModelLoadError("no model is serving: an adapter needs its base loaded")
        return activate_on_engine(engine, folder, probe_ids)

    def deactivate_adapter(self, name: str) -> bool:
        """Unload adapter ``name`` from the serving engine (an adapter rollback to no version); False: not there."""
        from .adapters import deactivate_on_engine

        engine = self._holder.engine if self._holder is not None else None
        return engine is not None and deactivate_on_engine(engine, name)

    def adapter_version(self, name: str) -> int | None:
        engine = self._holder.engine if self._holder is not None else None
        found = [a for a in engine.adapters.snapshot() if a.name == name] if engine is not None else []
        return found[0].version if found else None

    def stats(self) -> dict[str, Any]:
        if self._holder is None:
            return {}
        return dict(self._holder.stats.snapshot())

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


def make_runtime(config: AgentConfig) -> ModelRuntime:
    if config.runtime == "engine":
        return EngineRuntime(config)
    module_name, _, attr = config.runtime.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"runtime must be 'engine' or 'module:factory', got {config.runtime!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"runtime {config.runtime!r} cannot be imported: {exc}") from exc
    return factory(config)
