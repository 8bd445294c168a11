"""Build-once, reuse-everywhere test bundles of the real default model.

A bundle is cached under ``.cache/test-bundles/<kind>-<hash>/`` where the hash covers the sources that
shape it (export/, manifests/, the eval text), so a change there rebuilds it and nothing else does. A file
lock makes concurrent test sessions (several developers, xdist) build it once. Each cache folder holds:

    bundle/          the signed bundle (built by the real `nanofleet export` CLI, in a subprocess)
    keys/            nanofleet.key (0600) + nanofleet.pub: the test key that signed it
    export.json      the CLI's --json summary
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from manifests import write_keypair

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "test-bundles"
# What shapes a bundle: the build side (not export/target/, which only verifies) and the manifest contract.
HASHED = ("export", "manifests/bundle.py", "manifests/signing.py", "manifests/_files.py")
SKIP = ("export/target",)
BUILD_TIMEOUT_S = 1800
# Caches of older sources are removed once nobody can still be using them.
STALE_AFTER_S = 6 * 3600


def sources_hash() -> str:
    h = hashlib.sha256()
    for top in HASHED:
        root = REPO / top
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            rel = p.relative_to(REPO).as_posix()
            if rel.startswith(SKIP) or "__pycache__" in p.parts or not p.is_file():
                continue
            if p.suffix in (".py", ".txt", ".json", ".jinja"):
                h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# One answer per test session, even if sources change while it runs.
_SESSION: dict[str, tuple[Path, Path, dict]] = {}


def cached_bundle(kind: str, extra_args: list[str]) -> tuple[Path, Path, dict]:
    """(bundle dir, public key path, export summary) for ``kind`` (e.g. 'int8', 'fp32'); builds if missing."""
    if kind not in _SESSION:
        _SESSION[kind] = _cached_bundle(kind, extra_args)
    return _SESSION[kind]


def _cached_bundle(kind: str, extra_args: list[str]) -> tuple[Path, Path, dict]:
    pin = _pin(kind)
    root = CACHE / f"{kind}-{pin or sources_hash()}"
    bundle, keys, summary = root / "bundle", root / "keys", root / "export.json"
    root.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (keys / "nanofleet.key").exists():
            write_keypair(keys)
        if not (bundle / "manifest.sig").exists() or not summary.exists():
            # Work folders of builds that were SIGKILLed (we hold the lock: nobody else builds here).
            for stale in root.glob(".nanofleet-export-*"):
                shutil.rmtree(stale, ignore_errors=True)
            stdout = _build(bundle, keys, extra_args)
            summary.write_text(stdout)
            _prune(kind, keep=root)
    return bundle, keys / "nanofleet.pub", json.loads(summary.read_text())


def _pin(kind: str) -> str | None:
    """Developers only (a clean checkout, CI included, has neither): NANOFLEET_TEST_BUNDLE_PIN=<name>, or a
    file .cache/test-bundles/PIN holding <name>, reuses the cache folder <kind>-<name> whatever export/ holds
    now, so one developer's half-edited exporter neither rebuilds nor breaks the bundle under everyone
    else's tests. The file is ignored by the parts that test the build side itself (tests/export,
    tests/target) and by NANOFLEET_TEST_BUNDLE_PIN="" ; a pinned folder is never pruned."""
    env = os.environ.get("NANOFLEET_TEST_BUNDLE_PIN")
    if env is not None:
        return env or None
    pin_file = CACHE / "PIN"
    if not pin_file.is_file() or any(
        a.rstrip("/").endswith(("tests/export", "tests/target")) or "tests/export/" in a or "tests/target/" in a
        for a in sys.argv
    ):
        return None
    name = pin_file.read_text().strip()
    if not (CACHE / f"{kind}-{name}" / "bundle" / "manifest.sig").exists():
        return None
    sys.stderr.write(f"[bundle_cache] using the pinned test bundle {kind}-{name} (.cache/test-bundles/PIN)\n")
    return name


def _prune(kind: str, keep: Path) -> None:
    now = time.time()
    for old in CACHE.glob(f"{kind}-*"):
        pinned = (old / "PINNED").exists()
        if old.is_dir() and old != keep and not pinned and now - old.stat().st_mtime > STALE_AFTER_S:
            shutil.rmtree(old, ignore_errors=True)
            Path(f"{old}.lock").unlink(missing_ok=True)


def _build(bundle: Path, keys: Path, extra_args: list[str]) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "nanofleet.cli",
        "export",
        "--key",
        str(keys / "nanofleet.key"),
        "--out",
        str(bundle),
        "--version",
        "1",
        "--json",
        "--force",
        *extra_args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        stdout, stderr = proc.communicate(timeout=BUILD_TIMEOUT_S)
    except BaseException:
        # A test timeout or Ctrl-C: SIGTERM lets the export remove its temporary files before it exits.
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(
            f"building the test bundle {bundle} failed (exit {proc.returncode}):\n{stdout}\n{stderr[-4000:]}"
        )
    return stdout
