"""The device's Python packages for aarch64: downloaded as manylinux wheels with pip (resolving their
dependencies for the target platform) and unzipped into one folder that goes on the emulated PYTHONPATH.

What the device engine and manifests/ import: onnxruntime, numpy, tokenizers, jinja2 (chat templates),
pydantic, pyyaml, cryptography (signatures). tokenizers, pydantic, jinja2 and numpy are pinned to the
versions installed on this (build) machine when present, so the target differs from the build in one
thing only: the CPU (and the onnxruntime build for it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from .errors import WheelDownloadError
from .tools import cache_lock, cache_root

TARGET_PYTHON = "3.11"  # Debian bookworm / Raspberry Pi OS bookworm
PLATFORMS = (
    "manylinux_2_36_aarch64",
    "manylinux_2_34_aarch64",
    "manylinux_2_28_aarch64",
    "manylinux_2_27_aarch64",
    "manylinux_2_17_aarch64",
    "manylinux2014_aarch64",
)
PINNED_LIKE_HOST = ("numpy", "tokenizers", "pydantic", "jinja2")
UNPINNED = ("pyyaml", "cryptography")
COMPLETE = ".complete"


def host_onnxruntime_version() -> str:
    try:
        return metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return "1.26.0"


def requirements(ort_version: str) -> list[str]:
    reqs = [f"onnxruntime=={ort_version}"]
    for name in PINNED_LIKE_HOST:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs + list(UNPINNED)


def site_dir(ort_version: str) -> Path:
    return cache_root() / "wheels" / f"ort-{ort_version}-cp{TARGET_PYTHON.replace('.', '')}" / "site"


def ensure_site(ort_version: str, progress: Callable[[str], None] = lambda _: None) -> Path:
    """The unzipped aarch64 packages for onnxruntime ``ort_version``, downloaded on first use."""
    site = site_dir(ort_version)
    if (site / COMPLETE).is_file():
        return site
    with cache_lock(f"wheels-{ort_version}"):
        if (site / COMPLETE).is_file():
            return site
        base = site.parent
        dl = base / "download"
        shutil.rmtree(dl, ignore_errors=True)
        dl.mkdir(parents=True)
        reqs = requirements(ort_version)
        progress(f"pip download (aarch64, cp{TARGET_PYTHON}): {' '.join(reqs)}")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--dest", str(dl),
               "--python-version", TARGET_PYTHON, "--implementation", "cp"]  # fmt: skip
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
        proc = subprocess.run(cmd + reqs, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            tail = "\n".join(line for line in proc.stderr.splitlines() if "WARNING" not in line)[-1500:]
            raise WheelDownloadError(
                f"pip could not download the aarch64 wheels for onnxruntime {ort_version} "
                f"(is PyPI reachable? does that version exist for aarch64/cp{TARGET_PYTHON}?): {tail}"
            )
        wheels = sorted(dl.glob("*.whl"))
        tmp = site.with_name("site.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        progress(f"unpacking {len(wheels)} wheels")
        for whl in wheels:
            with zipfile.ZipFile(whl) as zf:
                zf.extractall(tmp)
        for so in tmp.rglob("*.so*"):  # zipfile drops the exec bit; the loader wants it on some libraries
            so.chmod(0o755)
        (tmp / COMPLETE).write_text(json.dumps({"requirements": reqs, "wheels": [w.name for w in wheels]}))
        shutil.rmtree(site, ignore_errors=True)
        tmp.rename(site)
        shutil.rmtree(dl, ignore_errors=True)
    return site
