"""Build-once test artefacts for the adapter tests, cached under ``.cache/test-adapters/`` behind file locks.

Base bundles are built by the CURRENT exporter (the pinned default test bundle predates LoRA slots), one per
precision, keyed by a hash of what shapes a base (export/ without adapters/ and target/, the bundle contract).
The PEFT adapters are trained by tests/adapters/train_lora.py in a subprocess (keyed by that script and its
texts); the adapter bundles by the real `nanofleet export-adapter` CLI (keyed by all of the above plus
export/adapters/ and manifests/adapter.py). Everything is signed by one test key kept beside them.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from manifests import write_keypair

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "test-adapters"
BASE_SOURCES = ("export", "manifests/bundle.py", "manifests/signing.py", "manifests/_files.py")
BASE_SKIP = ("export/adapters", "export/target")
PEFT_SOURCES = ("tests/adapters/train_lora.py", "tests/adapters/data")
ADAPTER_SOURCES = ("export/adapters", "manifests/adapter.py")
TIMEOUT_S = 1800
STALE_AFTER_S = 6 * 3600


def _hash(tops: tuple[str, ...], skip: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256()
    for top in tops:
        root = REPO / top
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            rel = p.relative_to(REPO).as_posix()
            if rel.startswith(skip) or "__pycache__" in p.parts or not p.is_file():
                continue
            if p.suffix in (".py", ".txt", ".json", ".jinja"):
                h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def base_hash() -> str:
    return _hash(BASE_SOURCES, BASE_SKIP)


def peft_hash() -> str:
    return _hash(PEFT_SOURCES)


def adapter_hash(base: Path) -> str:
    """Keyed by the very base bundle it is built on (its manifest's sha256), not by the base's sources: a source
    edited while a session runs must not pair an adapter with a base it was not built for."""
    base_sha = hashlib.sha256((base / "manifest.yaml").read_bytes()).hexdigest()
    return hashlib.sha256((base_sha + peft_hash() + _hash(ADAPTER_SOURCES)).encode()).hexdigest()[:12]


@contextmanager
def _locked(name: str) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def test_keys() -> tuple[Path, Path]:
    """(private key, public key) of the test key that signs every cached base and adapter."""
    keys = CACHE / "keys"
    with _locked("keys"):
        if not (keys / "nanofleet.key").exists():
            write_keypair(keys)
    return keys / "nanofleet.key", keys / "nanofleet.pub"


def _run(cmd: list[str], what: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except BaseException:
        proc.terminate()  # SIGTERM: the CLI removes its temporary files before it exits
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"building {what} failed (exit {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return stdout


def _prune(prefix: str, keep: Path) -> None:
    now = time.time()
    for old in CACHE.glob(f"{prefix}-*"):
        if old.is_dir() and old != keep and now - old.stat().st_mtime > STALE_AFTER_S:
            shutil.rmtree(old, ignore_errors=True)


@functools.cache
def base_bundle(precision: str) -> Path:
    """A signed base bundle of the default model at ``precision`` (int8, int4, fp32) with LoRA slots; one per
    precision for the whole session (cached: every caller gets the same base, whatever changes on disk)."""
    key, _pub = test_keys()
    root = CACHE / f"base-{precision}-{base_hash()}"
    bundle = root / "bundle"
    with _locked(root.name):
        if not (bundle / "manifest.sig").exists():
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".*"):  # a SIGKILLed build's work folders (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            _run([sys.executable, "-m", "nanofleet.cli", "export", "--precision", precision, "--key", str(key),
                  "--out", str(bundle), "--version", "1", "--json", "--force"], f"the {precision} base")  # fmt: skip
            _prune(f"base-{precision}", root)
    return bundle


@functools.cache
def peft_adapter(kind: str) -> Path:
    """A PEFT LoRA folder of ``kind`` (train_lora.KINDS); ``qv`` also has the merged model at ``<dir>-merged``."""
    root = CACHE / f"peft-{kind}-{peft_hash()}"
    out, merged = root / "adapter", root / "merged"
    with _locked(root.name):
        if not (out / "adapter_config.json").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            extra = ["--merged", str(merged)] if kind == "qv" else []
            _run([sys.executable, "-m", "tests.adapters.train_lora", str(out), kind, *extra], f"the {kind} LoRA")
            _prune(f"peft-{kind}", root)
    return out


def merged_model(kind: str = "qv") -> Path:
    """The HF folder of the default model with the ``kind`` adapter merged in (peft's merge_and_unload)."""
    return peft_adapter(kind).parent / "merged"


@functools.cache
def adapter_bundle(kind: str, precision: str) -> tuple[Path, dict]:
    """(adapter bundle, export-adapter --json summary) of the ``kind`` LoRA on the ``precision`` base."""
    key, _pub = test_keys()
    base, peft = base_bundle(precision), peft_adapter(kind)
    root = CACHE / f"adapter-{kind}-{precision}-{adapter_hash(base)}"
    out, summary = root / "adapter", root / "export.json"
    with _locked(root.name):
        if not (out / "manifest.sig").exists() or not summary.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            text = {"qv": "greenhouse_manual.txt", "all": "bakery_answers.txt"}[kind]
            stdout = _run([sys.executable, "-m", "nanofleet.cli", "export-adapter", "--base", str(base), "--adapter",
                           str(peft), "--key", str(key), "--name", kind, "--version", "1", "--out", str(out),
                           "--eval-text", str(REPO / "tests/adapters/data" / text), "--json"],
                          f"the {kind} adapter on the {precision} base")  # fmt: skip
            summary.write_text(stdout)
            _prune(f"adapter-{kind}-{precision}", root)
    return out, json.loads(summary.read_text())
