"""A content-addressed cache of emulated measurements, so the same bytes are never emulated twice.

An emulated teacher-forced pass over the eval text takes minutes (about 8 on a loaded 2-core machine for the
default model), and the usual flow verifies the same model twice: `nanofleet export --verify-target` on the
staged files, then `nanofleet verify-target` on the published bundle (an operator, CI, a second board
CPU check). Emulation is deterministic (qemu executes the instructions bit-exactly, the build's run is the
same program on the same inputs), so a measurement is a pure function of what went in, and this module
keys it by all of that:

- the bytes of every file the engine can read (sha256 of each file in the folder but the manifest, its
  signature and the quality report, by name), and what the engine is told about them (arch, graph, which
  file is the tokenizer);
- what is measured: the eval text, ``max_text_tokens``, threads, the golden prompt and its length;
- the target: CPU model, onnxruntime version, the aarch64 wheel set (each wheel's RECORD), the qemu
  binary's sha256, the arm64 root's build;
- the build machine: Python, onnxruntime, numpy and tokenizers versions, the CPU's model name and flags;
- the code that measures: every ``.py``/``.json`` file of ``device/``, ``manifests/``, ``export/target/``
  (``_remote.py``, the runner, the comparison's slicing) and ``export/teacher_forced.py``.

Paths are not in the key: the staging folder the export gate verifies and the bundle it becomes (the
same files) share one entry. Limits are not in the key either: an entry holds both runs' results and the
comparison's per-position terms (KL, same top token, both negative log-likelihoods: a few numbers per
position), and every use judges them again with its own thresholds. What is never cached: refusals,
crashes, and the checks that must hold now: a hit still runs the signature and runtime-compatibility
checks on the emulated target (``_remote.py`` mode ``admit``, about half a minute), then reuses the
measurement.

Entries are JSON files named by the key under ``$NANOFLEET_VERIFY_CACHE`` (default: ``results/`` in the
target cache, export/target/tools.py; ``off`` disables it), written atomically, the least recently used
pruned beyond ``MAX_ENTRIES``; an unreadable or foreign entry is a miss and is replaced.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from manifests import MANIFEST_NAME, REPORT_NAME, SIGNATURE_NAME, TOKENIZER_FILE, ArchConfig, GoldenCheck, GraphSpec

from .runner import REMOTE, REPO, TargetEnv

FORMAT = 1
MAX_ENTRIES = 256
ENV = "NANOFLEET_VERIFY_CACHE"
# Files in a bundle folder the engine never reads: what describes the model, not the model.
NOT_READ = frozenset({MANIFEST_NAME, SIGNATURE_NAME, REPORT_NAME})
# The code a measurement depends on: the board's view of our code (device/, manifests/), and all of
# export/target/ (the program _remote.py, how runner.py starts it, how verify.py slices the rows) plus the
# comparison. Wider than strictly needed on purpose: an edit there re-measures, never serves a stale result.
CODE_ROOTS = (REPO / "device", REPO / "manifests", REMOTE.parent)
CODE_FILES = (REMOTE, REPO / "export" / "teacher_forced.py")


def cache_dir() -> Path | None:
    """Where entries live; None when ``$NANOFLEET_VERIFY_CACHE`` is ``off``."""
    from .tools import cache_root

    env = os.environ.get(ENV, "")
    if env.lower() in ("off", "0", "no", "false"):
        return None
    return Path(env) if env else cache_root() / "results"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_files_digest(folder: Path) -> dict[str, str]:
    """sha256 of every regular file the engine can read in ``folder`` (a bundle or a staging folder)."""
    return {
        f.name: _sha256_file(f)
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name not in NOT_READ and not f.name.startswith(".")
    }


def code_digest(roots: Iterable[Path] = CODE_ROOTS, files: Iterable[Path] = CODE_FILES) -> str:
    """One digest over the measuring code: every .py/.json under ``roots`` plus ``files`` (path and bytes)."""
    h = hashlib.sha256()
    paths = [p for r in roots for p in r.rglob("*") if p.suffix in (".py", ".json") and "__pycache__" not in p.parts]
    for p in sorted({*paths, *files}):
        h.update(p.relative_to(REPO).as_posix().encode() if p.is_relative_to(REPO) else p.name.encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def host_identity() -> dict[str, Any]:
    """What decides the build machine's run: interpreter, runtime versions, the CPU (its kernels: AVX2,
    AVX-512, VNNI and AMX give other int8 rounding)."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "python": sys.version,
        "onnxruntime": _version("onnxruntime"),
        "numpy": _version("numpy"),
        "tokenizers": _version("tokenizers"),
        "cpu_model": model,
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest(),
    }


def target_identity(env: TargetEnv) -> dict[str, Any]:
    """What decides the emulated run: CPU model, onnxruntime, the wheel set (each wheel's RECORD: the sha256 of
    every file it installed, so a rebuilt wheel of the same version differs too), the qemu binary, the arm64
    root's build."""
    wheels = {}
    for info in sorted(env.site.glob("*.dist-info")) if env.site.is_dir() else []:
        record = info / "RECORD"
        wheels[info.name] = _sha256_file(record) if record.is_file() else None
    marker = env.rootfs / ".complete"
    root = marker.read_text() if marker.is_file() else ""
    built = marker.stat().st_mtime_ns if marker.is_file() else 0
    qemu = Path(env.emulator.path)
    return {"cpu": env.cpu, "onnxruntime": env.onnxruntime, "qemu": env.emulator.version_text,
            "qemu_sha256": _sha256_file(qemu) if qemu.is_file() else None,
            "wheels": wheels, "rootfs": root, "rootfs_built_ns": built}  # fmt: skip


@dataclass(frozen=True)
class Key:
    digest: str
    parts: dict[str, Any]


def measurement_key(
    folder: Path,
    arch: ArchConfig,
    graph: GraphSpec,
    text: str,
    max_text_tokens: int | None,
    threads: int | None,
    golden: GoldenCheck | None,
    env: TargetEnv,
    tokenizer_file: str = TOKENIZER_FILE,
) -> Key:
    """The key of one measurement (module doc); ``golden``: the golden check to decode, None for none;
    ``tokenizer_file``: the file the engine tokenizes with (a manifest's ``tokenizer`` role may name another)."""
    parts = {
        "format": FORMAT,
        "files": model_files_digest(folder),
        "arch": arch.model_dump(mode="json"),
        "graph": graph.model_dump(mode="json"),
        "tokenizer_file": tokenizer_file,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "max_text_tokens": max_text_tokens,
        "threads": threads,
        "golden": None if golden is None else {"prompt_token_ids": list(golden.prompt_token_ids),
                                               "tokens": len(golden.expected_token_ids)},  # fmt: skip
        "target": target_identity(env),
        "host": host_identity(),
        "code": code_digest(),
    }
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return Key(hashlib.sha256(blob).hexdigest(), parts)


# The measured fields of a run's result (what the key determines); the rest (machine, warnings) comes from
# the fresh admission on a hit.
MEASURED = ("machine", "python", "onnxruntime", "perplexity", "positions", "eval_tokens", "text_ids_sha256",
            "timings")
TERMS = ("kl", "same", "nll_ref", "nll_cand")


@dataclass(frozen=True)
class Entry:
    """One stored measurement: both runs' measured fields, the golden tokens, the comparison's terms."""

    target: dict[str, Any]
    host: dict[str, Any]
    target_seconds: float
    host_seconds: float
    golden_tokens: list[int] | None
    host_golden_tokens: list[int] | None
    terms: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None
    nonfinite_positions: int
    measured_at: str


def load(key: Key, folder: Path | None = None) -> Entry | None:
    """The entry for ``key``, or None (absent, unreadable, another format or key: a miss)."""
    folder = folder or cache_dir()
    if folder is None:
        return None
    path = folder / f"{key.digest}.json"
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT or doc.get("key") != key.digest:
            return None
        terms = doc["terms"]
        arrays = None
        if terms is not None:
            arrays = (np.asarray(terms["kl"], dtype=np.float64), np.asarray(terms["same"], dtype=bool),
                      np.asarray(terms["nll_ref"], dtype=np.float64),
                      np.asarray(terms["nll_cand"], dtype=np.float64))  # fmt: skip
            if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
                return None
        entry = Entry(
            target=dict(doc["target"]), host=dict(doc["host"]), target_seconds=float(doc["target_seconds"]),
            host_seconds=float(doc["host_seconds"]), golden_tokens=doc["golden_tokens"],
            host_golden_tokens=doc["host_golden_tokens"], terms=arrays,
            nonfinite_positions=int(doc["nonfinite_positions"]), measured_at=str(doc["measured_at"]),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.utime(path)  # recently used: pruned last
    except OSError:
        pass
    return entry


def store(
    key: Key,
    target: dict[str, Any],
    host: dict[str, Any],
    target_seconds: float,
    host_seconds: float,
    terms: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
    nonfinite_positions: int,
    folder: Path | None = None,
) -> Path | None:
    """Write the entry for ``key`` (atomically: a reader sees the old entry or the new one), then prune."""
    folder = folder or cache_dir()
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "key": key.digest,
        "parts": key.parts,
        "measured_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "target": {k: target.get(k) for k in MEASURED},
        "host": {k: host.get(k) for k in MEASURED},
        "target_seconds": round(target_seconds, 2),
        "host_seconds": round(host_seconds, 2),
        "golden_tokens": (target.get("golden") or {}).get("tokens"),
        "host_golden_tokens": (host.get("golden") or {}).get("tokens"),
        "terms": None if terms is None else {n: a.tolist() for n, a in zip(TERMS, terms, strict=True)},
        "nonfinite_positions": nonfinite_positions,
    }
    path = folder / f"{key.digest}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    prune(folder)
    return path


def prune(folder: Path, keep: int = MAX_ENTRIES) -> None:
    entries = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in entries[keep:]:
        old.unlink(missing_ok=True)
