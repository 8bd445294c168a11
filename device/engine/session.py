"""Build the onnxruntime session from EngineOptions. The only module that touches SessionOptions."""

from __future__ import annotations

import ctypes
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from . import weights_cache
from .errors import BundleLoadError
from .options import EngineOptions
from .providers import ACCELERATORS, CPU

log = logging.getLogger(__name__)

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(options: EngineOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = _LEVELS[options.graph_optimization]
    # One request = one sequential chain of ops: parallelism lives inside each op (intra-op threads).
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.intra_op_num_threads = options.threads or 0  # 0 = onnxruntime's choice (physical cores)
    so.enable_cpu_mem_arena = options.memory_arena
    so.enable_mem_pattern = options.memory_arena
    if not options.prepack_weights:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if not options.spin_wait:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not options.kleidiai:
        so.add_session_config_entry("mlas.disable_kleidiai", "1")  # onnxruntime >= 1.25; older ones ignore it
    if options.optimized_model_path:
        so.optimized_model_filepath = options.optimized_model_path
    so.log_severity_level = 3
    return so


def load_session(
    model_path: Path,
    options: EngineOptions,
    file_hashes: dict[str, str] | None = None,
    providers: Sequence[str] = (CPU,),
) -> tuple[ort.InferenceSession, str]:
    """The session and where its weights came from: "mapped" (the prepacked-weights cache, see
    weights_cache.py), "packed" (a plain load that packs the weights in this process's memory), or
    "device" (an accelerator provider holds them: providers.py chose it from the bundle's declaration)."""
    if not model_path.is_file():
        raise BundleLoadError(f"model file {model_path} not found")
    if providers[0] in ACCELERATORS:  # the CPU's prepacked weights mean nothing to a GPU session
        return _create(model_path, options, providers), "device"
    if options.weights_cache and options.prepack_weights:  # without prepacking there is nothing to cache
        session = _load_via_cache(model_path, options, file_hashes)
        if session is not None:
            return session, "mapped"
    return _create(model_path, options), "packed"


def _load_via_cache(
    model_path: Path, options: EngineOptions, file_hashes: dict[str, str] | None
) -> ort.InferenceSession | None:
    root = Path(options.weights_cache or "")
    key = weights_cache.cache_key(model_path, options.graph_optimization, file_hashes, options.kleidiai)
    try:
        entry = weights_cache.lookup(root, key) or weights_cache.build(
            root, key, model_path, options.graph_optimization, options.kleidiai
        )
    except (weights_cache.WeightsCacheError, OSError) as exc:
        log.warning("prepacked-weights cache unavailable, packing in memory instead: %s", exc)
        return None
    try:
        return _create(entry.model, options)
    except BundleLoadError as exc:  # a damaged entry must never stop a model from loading: drop it
        log.warning("prepacked-weights cache entry %s unusable (%s); removed", entry.path, exc)
        shutil.rmtree(entry.path, ignore_errors=True)
        return None


def _create(model_path: Path, options: EngineOptions, providers: Sequence[str] = (CPU,)) -> ort.InferenceSession:
    try:
        so = session_options(options)
        session = ort.InferenceSession(str(model_path), sess_options=so, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise BundleLoadError(f"onnxruntime cannot load {model_path.name}: {exc}") from exc
    _release_freed_memory()
    return session


def _release_freed_memory() -> None:
    """Loading parses the whole protobuf and then frees it; glibc keeps the freed pages mapped. Hand them
    back so the board's RSS is the weights, not weights + the file they came from (~40 MB on SmolLM2)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl or no glibc: nothing to trim
            pass
