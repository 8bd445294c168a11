"""Prepacked-weights cache: build once per board, then map the weights instead of repacking them.

Why: onnxruntime repacks every MatMulNBits weight into its kernel's layout when a session loads. The packed
copy lives in anonymous memory next to the unpacked one until packing ends, so a plain load peaks at about
2.5x the model (395 MiB for the 146 MiB default model) and then holds ~1.5x of it for good. onnxruntime can
instead save the optimized graph with the packed weights in an external data file
(``session.save_external_prepacked_constant_initializers``); loading that file maps the weights read-only
(file-backed pages: shared, evictable, no packing at all). The serving process then peaks at the mapped
weights plus working memory, and loads in a fraction of the time.

The packed layout depends on the CPU (MLAS picks kernels by ISA: AVX-512 VNNI, AVX2, NEON dot product...),
the onnxruntime version and the graph optimization level, so the cache is built on the machine that uses it
and keyed by all of them. It is derived data: a missing, partial or unreadable entry is rebuilt, and when it
cannot be built (old onnxruntime, disk full) the engine loads the plain model, as before.

The build runs in a child process (``python -m device.engine.weights_cache``) because building is a plain
load plus a save: doing it in the serving process would raise that process's own high-water mark, which is
what this cache exists to lower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from manifests import MODEL_DATA_FILE, MODEL_FILE, atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MODEL_NAME = MODEL_FILE
DATA_NAME = MODEL_DATA_FILE
META_NAME = "meta.json"
# Entries kept per cache folder (least recently used beyond it are deleted): A/B slots plus one spare.
KEEP_ENTRIES = 3
# Free disk asked for before building, as a multiple of the source model's size: the entry holds the
# optimized graph's own initializers and the packed copies (~2.3x the model for the int8 bundles).
SPACE_FACTOR = 3.0
BUILD_TIMEOUT_S = 1800


class WeightsCacheError(Exception):
    """The cache entry could not be built or read. The engine logs it and loads the plain model."""


@dataclass(frozen=True)
class CacheEntry:
    path: Path

    @property
    def model(self) -> Path:
        return self.path / MODEL_NAME


def default_cache_dir() -> Path:
    """$NANOFLEET_WEIGHTS_CACHE, else $XDG_CACHE_HOME/nanofleet/weights (~/.cache/nanofleet/weights)."""
    explicit = os.environ.get("NANOFLEET_WEIGHTS_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nanofleet" / "weights"


def cpu_fingerprint() -> str:
    """What decides MLAS's kernel choice: machine, CPU model and ISA flags (x86 ``flags``, ARM ``Features``)."""
    parts = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            seen: set[str] = set()
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags", "Features", "CPU part", "CPU implementer") and key not in seen:
                    seen.add(key)
                    parts.append(f"{key}={value.strip()}")
    except OSError:  # not Linux: the machine name and processor string are what we have
        parts.append(platform.processor())
    return "\n".join(parts)


def source_identity(model_path: Path, file_hashes: dict[str, str] | None = None) -> dict[str, object]:
    """Identity of the source model: the manifest's sha256 of each file when a manifest vouches for them
    (already verified), else path, size and mtime of the graph and its external data."""
    if file_hashes:
        return {"sha256": dict(sorted(file_hashes.items()))}
    out = {}
    for p in source_files(model_path):
        st = p.stat()
        out[str(p.resolve())] = [st.st_size, st.st_mtime_ns]
    return {"files": out}


def cache_key(
    model_path: Path, optimization: str, file_hashes: dict[str, str] | None = None, kleidiai: bool = False
) -> str:
    ident = {
        "format": CACHE_FORMAT,
        "onnxruntime": ort.__version__,
        "cpu": cpu_fingerprint(),
        "optimization": optimization,
        "kleidiai": kleidiai,  # KleidiAI packs weights in its own layout
        "source": source_identity(model_path, file_hashes),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def lookup(root: Path, key: str) -> CacheEntry | None:
    """A complete entry (its meta.json written last, sizes matching) or None. Touches it for LRU."""
    entry = CacheEntry(root / key)
    meta_path = entry.path / META_NAME
    try:
        meta = json.loads(meta_path.read_text())
        for name, size in meta["files"].items():
            if (entry.path / name).stat().st_size != size:
                raise WeightsCacheError(f"{name} is {(entry.path / name).stat().st_size} bytes, not {size}")
    except FileNotFoundError:
        if entry.path.exists():  # files without meta.json: a copy or restore that stopped half-way
            log.warning("weights cache entry %s is incomplete; rebuilding it", entry.path)
            shutil.rmtree(entry.path, ignore_errors=True)
        return None
    except (OSError, ValueError, KeyError, TypeError, WeightsCacheError) as exc:
        log.warning("weights cache entry %s is damaged (%s); rebuilding it", entry.path, exc)
        shutil.rmtree(entry.path, ignore_errors=True)
        return None
    os.utime(meta_path)
    return entry


def build(root: Path, key: str, model_path: Path, optimization: str, kleidiai: bool = False) -> CacheEntry:
    """Build the entry in a child process, into a temporary folder renamed into place when complete."""
    root.mkdir(parents=True, exist_ok=True)
    need = int(_source_bytes(model_path) * SPACE_FACTOR)
    free = shutil.disk_usage(root).free
    if free < need:
        raise WeightsCacheError(f"{free >> 20} MiB free in {root}, building the cache needs ~{need >> 20} MiB")
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    # The child must import this package exactly as the parent did (tests and benchmarks extend sys.path).
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "device.engine.weights_cache", str(model_path), str(tmp), optimization]
    if kleidiai:
        cmd.append("kleidiai")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise WeightsCacheError(f"building the weights cache failed (exit {proc.returncode}): {' | '.join(tail)}")
        try:
            tmp.rename(root / key)
        except OSError:
            if lookup(root, key) is None:  # not a concurrent build that won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except subprocess.TimeoutExpired as exc:
        raise WeightsCacheError(f"building the weights cache took over {BUILD_TIMEOUT_S} s") from exc
    except OSError as exc:
        raise WeightsCacheError(f"cannot write the weights cache in {root}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(root)
    log.info("built weights cache %s in %.1f s", root / key, time.perf_counter() - t0)
    prune(root, keep=KEEP_ENTRIES)
    entry = lookup(root, key)
    if entry is None:
        raise WeightsCacheError(f"weights cache entry {root / key} is incomplete after building")
    return entry


def prune(root: Path, keep: int = KEEP_ENTRIES) -> list[Path]:
    """Delete the least recently used entries beyond ``keep`` (and leftovers of killed builds). A process
    still mapping a deleted entry keeps its pages: unlinking does not unmap on Linux."""
    removed: list[Path] = []
    entries = []
    for p in root.iterdir():
        if p.name.startswith(".tmp-"):
            if time.time() - p.stat().st_mtime > BUILD_TIMEOUT_S:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        elif p.is_dir():
            meta = p / META_NAME
            entries.append((meta.stat().st_mtime if meta.exists() else 0.0, p))
    for _, p in sorted(entries, reverse=True)[keep:]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def source_files(model_path: Path) -> list[Path]:
    """The graph and its external data files beside it (``model.onnx_data``, optimum's ``*.data``)."""
    extra = [
        p
        for p in sorted(model_path.parent.iterdir())
        if p != model_path and (p.name.endswith(".onnx_data") or p.suffix == ".data") and p.is_file()
    ]
    return [model_path, *extra]


def _source_bytes(model_path: Path) -> int:
    return sum(p.stat().st_size for p in source_files(model_path))


def _build_here(model_path: Path, out: Path, optimization: str, kleidiai: bool = False) -> None:
    """The child: one session that writes the optimized graph and the packed weights, then meta.json."""
    from .options import EngineOptions
    from .session import session_options

    out.mkdir(parents=True)
    so = session_options(
        EngineOptions(threads=1, graph_optimization=optimization, kleidiai=kleidiai)  # type: ignore[arg-type]
    )
    so.optimized_model_filepath = str(out / MODEL_NAME)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_NAME)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    so.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    ort.InferenceSession(str(model_path), sess_options=so, providers=["CPUExecutionProvider"])
    files = {}
    for p in sorted(out.iterdir()):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        files[p.name] = p.stat().st_size
    if MODEL_NAME not in files:
        raise WeightsCacheError("onnxruntime wrote no optimized model")
    meta = {
        "format": CACHE_FORMAT,
        "onnxruntime": ort.__version__,
        "source": str(model_path),
        "optimization": optimization,
        "kleidiai": kleidiai,
        "files": files,
    }
    # written last, atomically: its presence marks the entry complete
    atomic_write_text(out / META_NAME, json.dumps(meta, indent=1))


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[4:] not in ([], ["kleidiai"]):
        sys.exit("usage: python -m device.engine.weights_cache MODEL OUT_DIR OPTIMIZATION [kleidiai]")
    _build_here(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], kleidiai=sys.argv[4:] == ["kleidiai"])
