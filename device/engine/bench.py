"""`nanofleet bench`: time-to-first-token, prefill and decode speed, and peak RSS of one model on this CPU.

The loop is the engine's own (new_state -> prefill -> forward per token), greedy with EOS ignored, so the
figures are what `device serve` delivers per request."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from manifests import MANIFEST_NAME, MODEL_FILE, TrustStore

from .adapters import Adapter
from .engine import Engine
from .errors import BundleLoadError
from .options import EngineOptions
from .spec import arch_from_hf_config, graph_spec_for_folder
from .weights_cache import source_files

# Plain English, repeated to the asked length: the prompt's content barely matters to speed.
PROMPT_TEXT = (
    "The history of computing is a story of machines becoming smaller, cheaper and closer to the people who "
    "use them. Mainframes filled rooms; minicomputers filled closets; personal computers sat on desks; "
    "phones fit in pockets. Single-board computers now cost less than a meal and run a full operating "
    "system, and small language models are starting to run on them without any network at all. "
)


@dataclass
class BenchResult:
    model: str
    path: str
    threads: int | None
    prompt_tokens: int
    new_tokens: int
    load_s: float
    ttft_ms: float
    prefill_tok_s: float
    decode_tok_s: float
    decode_ms_per_token: float
    peak_rss_mb: float
    model_mb: float
    onnxruntime: str
    cpu: str
    runs: int
    # "mapped": prepacked weights mapped from the weights cache; "packed": packed in memory at load
    weights: str = "packed"
    # LoRA adapters (--adapter): per adapter its load time, bytes, resident memory added, TTFT and decode speed
    adapters: list[dict[str, Any]] = field(default_factory=list)
    # per-request adapter switch: binding another adapter's matrices into a new request's state (median ms)
    switch_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_for_bench(path: str | Path, trust: TrustStore | None, options: EngineOptions) -> Engine:
    """A bundle folder (manifest.yaml) or a plain optimum export folder (config.json + model.onnx)."""
    root = Path(path)
    if not root.exists():
        raise BundleLoadError(f"{root} does not exist")
    if (root / MANIFEST_NAME).is_file():
        return Engine.from_bundle(root, trust, options)
    if (root / "config.json").is_file() and (root / MODEL_FILE).is_file():
        arch = arch_from_hf_config(root / "config.json")
        return Engine.from_parts(root, arch, graph_spec_for_folder(root, arch.num_layers), options)
    raise BundleLoadError(f"{root} is neither a bundle (manifest.yaml) nor an optimum export folder")


def bench_prompt(engine: Engine, n: int) -> list[int]:
    if engine.tokenizer is None:
        rng = np.random.default_rng(0)
        return rng.integers(100, engine.arch.vocab_size - 100, size=n).tolist()
    ids: list[int] = []
    while len(ids) < n:
        ids += engine.encode(PROMPT_TEXT, add_special_tokens=not ids)
    return ids[:n]


def _peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a bench started by a big parent
    # (a test runner, a benchmark driver holding torch) would report the parent's peak as its own.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return 0.0


def _measure(
    engine: Engine, prompt: np.ndarray, new_tokens: int, runs: int, adapter: Adapter | None = None
) -> tuple[float, float]:
    """(median TTFT s, median decode tok/s) of greedy runs, with ``adapter`` (a resident Adapter) or the base."""
    ttfts, decode_rates = [], []
    for _ in range(max(1, runs)):
        state = engine.new_state(prompt.shape[0] + new_tokens, adapter)
        start = time.perf_counter()
        logits = engine.prefill(state, prompt)  # [vocab]
        tok = int(np.argmax(logits))
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            tok = int(np.argmax(engine.forward(state, [tok])[0]))
        end = time.perf_counter()
        del state  # a request's KV cache is freed when it ends, as in the server, before the next one
        ttfts.append(first - start)
        if new_tokens > 1:
            decode_rates.append((new_tokens - 1) / (end - first))
    return statistics.median(ttfts), statistics.median(decode_rates) if decode_rates else 0.0


def _bench_adapters(
    engine: Engine, paths: list[Path], trust: TrustStore | None, prompt: np.ndarray, new_tokens: int, runs: int
) -> tuple[list[dict[str, Any]], float | None]:
    """Load each adapter over the running base and time it; then the per-request switch between them."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        rss0, t0 = _rss_mb(), time.perf_counter()
        adapter = engine.load_adapter(path, trust)
        load_ms, rss1 = (time.perf_counter() - t0) * 1000, _rss_mb()
        ttft, rate = _measure(engine, prompt, new_tokens, runs, adapter)
        rows.append({"name": adapter.name, "version": adapter.version, "load_ms": round(load_ms, 2),
                     "bytes": adapter.nbytes, "rss_added_mb": round(rss1 - rss0, 2), "ttft_ms": round(ttft * 1000, 2),
                     "decode_tok_s": round(rate, 2)})  # fmt: skip
    if not rows:
        return rows, None
    # A switch is binding another adapter's matrices into a new request's IO binding: no base weight moves.
    choices = [None, *engine.adapters.snapshot()]
    times = []
    for i in range(60):
        t0 = time.perf_counter()
        engine.new_state(prompt.shape[0] + new_tokens, choices[i % len(choices)])
        times.append(time.perf_counter() - t0)
    return rows, round(statistics.median(times) * 1000, 4)


def run_bench(
    path: str | Path,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    threads: int | None = None,
    runs: int = 3,
    trust: TrustStore | None = None,
    options: EngineOptions | None = None,
    adapters: list[Path] | None = None,
) -> BenchResult:
    opts = options or EngineOptions(threads=threads)
    t0 = time.perf_counter()
    engine = load_for_bench(path, trust, opts)
    load_s = time.perf_counter() - t0
    try:
        prompt = np.asarray(bench_prompt(engine, prompt_tokens), dtype=np.int64)  # [p]
        if prompt.shape[0] + new_tokens > engine.context_length:
            raise BundleLoadError(f"{prompt_tokens}+{new_tokens} tokens exceed the context {engine.context_length}")
        engine.greedy(prompt[:8].tolist(), 4)  # warm-up: arenas, prepacked weights, thread pool
        ttft, rate = _measure(engine, prompt, new_tokens, runs)
        adapter_rows, switch_ms = _bench_adapters(engine, list(adapters or []), trust, prompt, new_tokens, runs)
        model_bytes = sum(f.stat().st_size for f in source_files(engine.model_path))
        return BenchResult(
            model=engine.name,
            path=str(path),
            threads=threads,
            prompt_tokens=int(prompt.shape[0]),
            new_tokens=new_tokens,
            load_s=round(load_s, 3),
            ttft_ms=round(ttft * 1000, 2),
            prefill_tok_s=round(prompt.shape[0] / ttft, 1),
            decode_tok_s=round(rate, 2),
            decode_ms_per_token=round(1000 / rate, 3) if rate else 0.0,
            peak_rss_mb=round(_peak_rss_mb(), 1),
            model_mb=round(model_bytes / 2**20, 1),
            onnxruntime=ort.__version__,
            cpu=f"{platform.machine()} x{os.cpu_count()}",
            runs=max(1, runs),
            weights=engine.weights,
            adapters=adapter_rows,
            switch_ms=switch_ms,
        )
    finally:
        engine.close()
