"""Build-once test artefacts for the adapter tests, cached under ``.cache/`` behind file locks.

Base bundles are the suite's shared test bundles of the current exporter (tests/export/bundle_cache.py:
``.cache/test-bundles/<precision>-<sources hash>/``, the int8 one being the default bundle that the export,
target and onboarding parts use too; every default export has LoRA slots), built once per checkout whichever
part asks first. Each is re-signed by the adapter test key into ``.cache/test-adapters/base-<precision>-<its
manifest's sha256>/``: hard links to the very same files and the same manifest.yaml bytes (so the same manifest
sha256), only manifest.sig new. The PEFT adapters are trained by tests/adapters/train_lora.py, every kind in one
subprocess (keyed by that script and its texts); the adapter bundles by the real `nanofleet export-adapter` CLI
(keyed by the base bundle's manifest plus the PEFT folder's and export/adapters/'s sources). Everything is
signed by one test key kept beside them.
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

from manifests import MANIFEST_NAME, SIGNATURE_NAME, SigningKey, write_keypair
from tests.export import bundle_cache

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "test-adapters"
# The shared bundle of each precision: (bundle_cache kind, export arguments); int8 is the default bundle itself.
SHARED_BASES: dict[str, tuple[str, list[str]]] = {
    "int8": ("int8", []),
    "fp32": ("fp32", ["--precision", "fp32"]),
    "int4": ("int4", ["--precision", "int4"]),
}
PEFT_SOURCES = ("tests/adapters/train_lora.py", "tests/adapters/data")
ADAPTER_SOURCES = ("export/adapters", "manifests/adapter.py")
# What else judges an adapter (the gate runs it through the device engine): a cached refusal holds only for these.
VERDICT_SOURCES = ("export", "device/engine", "manifests")
TIMEOUT_S = 1800
GATE_REFUSED = 3  # export-adapter's exit code when its quality gate refuses the adapter (export/adapters/cli.py)
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


class BuildError(RuntimeError):
    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


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
        msg = f"building {what} failed (exit {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}"
        raise BuildError(msg, proc.returncode)
    return stdout


def _prune(prefix: str, keep: Path) -> None:
    now = time.time()
    for old in CACHE.glob(f"{prefix}-*"):
        if old.is_dir() and old != keep and now - old.stat().st_mtime > STALE_AFTER_S:
            shutil.rmtree(old, ignore_errors=True)


def shared_base(precision: str) -> Path:
    """The suite's shared bundle of ``precision`` (built by the real `nanofleet export`), whatever
    .cache/test-bundles/PIN says: a pinned bundle may predate the LoRA slots these tests need."""
    kind, args = SHARED_BASES[precision]
    saved = os.environ.get("NANOFLEET_TEST_BUNDLE_PIN")
    os.environ["NANOFLEET_TEST_BUNDLE_PIN"] = ""
    try:
        return bundle_cache.cached_bundle(kind, args)[0]
    finally:
        if saved is None:
            os.environ.pop("NANOFLEET_TEST_BUNDLE_PIN", None)
        else:
            os.environ["NANOFLEET_TEST_BUNDLE_PIN"] = saved


def _link_tree(src: Path, dest: Path) -> None:
    """``dest`` as ``src``'s files hard-linked (copied where the filesystem cannot link)."""
    for p in sorted(src.rglob("*")):
        target = dest / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, target)
        except OSError:
            shutil.copy2(p, target)


@functools.cache
def base_bundle(precision: str) -> Path:
    """A signed base bundle of the default model at ``precision`` (int8, int4, fp32) with LoRA slots, signed by
    the adapter test key; one per precision for the whole session (every caller gets the same base, whatever
    changes on disk). Treat it as read-only: its files are the shared bundle's own (hard links)."""
    key, _pub = test_keys()
    shared = shared_base(precision)
    body = (shared / MANIFEST_NAME).read_bytes()
    root = CACHE / f"base-{precision}-{hashlib.sha256(body).hexdigest()[:12]}"
    bundle = root / "bundle"
    with _locked(root.name):
        if not (bundle / SIGNATURE_NAME).exists():
            shutil.rmtree(root, ignore_errors=True)  # a half-made copy (we hold the lock)
            staging = root / ".staging"
            _link_tree(shared, staging)
            (staging / SIGNATURE_NAME).unlink()  # a link to the shared signature: never written through
            (staging / SIGNATURE_NAME).write_text(SigningKey.load(key).sign(body).to_json())
            staging.replace(bundle)
            _prune(f"base-{precision}", root)
    return bundle


@functools.cache
def peft_root() -> Path:
    """The folder of every trained PEFT kind (train_lora.KINDS), all trained by one subprocess, once."""
    root = CACHE / f"peft-{peft_hash()}"
    with _locked(root.name):
        if not (root / "DONE").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            _run([sys.executable, "-m", "tests.adapters.train_lora", str(root)], "the test LoRAs")
            (root / "DONE").touch()
            _prune("peft", root)
    return root


def peft_adapter(kind: str) -> Path:
    """The PEFT LoRA folder of ``kind`` (train_lora.KINDS)."""
    out = peft_root() / kind
    assert (out / "adapter_config.json").is_file(), out
    return out


def merged_model(kind: str = "qv") -> Path:
    """The HF folder of the default model with the ``kind`` adapter merged in (peft's merge_and_unload)."""
    from .train_lora import MERGED

    return peft_root() / MERGED[kind]


@functools.cache
def adapter_bundle(kind: str, precision: str) -> tuple[Path, dict]:
    """(adapter bundle, export-adapter --json summary) of the ``kind`` LoRA on the ``precision`` base."""
    key, _pub = test_keys()
    # the LoRAs first: in a whole run the export part is building the shared bases meanwhile (under their lock)
    peft = peft_adapter(kind)
    base = base_bundle(precision)
    root = CACHE / f"adapter-{kind}-{precision}-{adapter_hash(base)}"
    out, summary, refused = root / "adapter", root / "export.json", root / "refused.txt"
    with _locked(root.name):
        # The gate's refusal of exactly these inputs, judged by exactly this code: it would only say it again.
        verdict_key = _hash(VERDICT_SOURCES)
        if refused.exists() and refused.read_text().startswith(verdict_key + "\n"):
            raise BuildError(f"{refused.read_text()}\n(the verdict cached in {refused})", GATE_REFUSED)
        if not (out / "manifest.sig").exists() or not summary.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            text = {"qv": "greenhouse_manual.txt", "all": "bakery_answers.txt"}[kind]
            try:
                stdout = _run([sys.executable, "-m", "nanofleet.cli", "export-adapter", "--base", str(base),
                               "--adapter", str(peft), "--key", str(key), "--name", kind, "--version", "1", "--out",
                               str(out), "--eval-text", str(REPO / "tests/adapters/data" / text), "--json"],
                              f"the {kind} adapter on the {precision} base")  # fmt: skip
            except BuildError as exc:
                if exc.returncode == GATE_REFUSED:  # deterministic; a crash or a timeout is not cached
                    refused.write_text(f"{verdict_key}\n{exc}")
                raise
            summary.write_text(stdout)
            _prune(f"adapter-{kind}-{precision}", root)
    return out, json.loads(summary.read_text())
