"""Fixtures for target verification: the cached emulated board (built on first use) and small bundles.

The first run builds ~/.cache/nanofleet/target (Debian arm64 root, aarch64 wheels, qemu 10 from Debian
trixie): a few minutes and network access to the Debian mirror and PyPI. Missing qemu/debootstrap is a
failure with the install command, never a skip (scripts/ensure_services.sh installs them).

Everything the emulation tests share is built once per machine under file locks (the board's pieces by
export/target, the default bundle by tests/export/bundle_cache.py) and started as soon as the session
knows it needs them: right after collection, in background threads, so the default bundle's export and the
download of the second onnxruntime's wheels overlap the first emulated tests instead of waiting for the
test that needs them first.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from export.target.errors import TargetError
from export.target.results import ENV as RESULTS_ENV
from export.target.runner import TargetEnv, prepare_target
from export.target.wheels import host_onnxruntime_version
from manifests import (
    ArchConfig,
    BundleManifest,
    GraphSpec,
    Provenance,
    Recipe,
    Runtime,
    SigningKey,
    describe_file,
    write_keypair,
    write_signed_manifest,
)

REPO = Path(__file__).resolve().parents[2]
# The board's onnxruntime that predates the newest fused kernels (see manifests/onnxruntime_ops.json).
OLD_ORT = "1.26.0"


CPU = "cortex-a76"
T = TypeVar("T")


class Prefetch(Generic[T]):
    """One piece of shared set-up running in a daemon thread; ``result`` waits for it (and re-raises)."""

    def __init__(self, name: str, build: Callable[[], T]) -> None:
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._build = build
        threading.Thread(target=self._run, name=f"prefetch-{name}", daemon=True).start()

    def _run(self) -> None:
        try:
            self._value = self._build()
        except BaseException as exc:  # handed to the test that needs it
            self._error = exc
        finally:
            self._done.set()

    def result(self) -> T:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


_PREFETCH: dict[str, Prefetch[Any]] = {}


def _start(name: str, build: Callable[[], Any]) -> Prefetch[Any]:
    if name not in _PREFETCH:
        _PREFETCH[name] = Prefetch(name, build)
    return _PREFETCH[name]


def _board(ort_version: str) -> Callable[[], TargetEnv]:
    return lambda: prepare_target(CPU, ort_version)


def _default_bundle() -> tuple[Path, Path]:
    from tests.export.bundle_cache import cached_bundle

    bundle, pub, _summary = cached_bundle("int8", [])
    return bundle, pub


def pytest_collection_finish(session: pytest.Session) -> None:
    """After collection and -m/-k selection: start what the selected emulation tests will need."""
    if session.config.option.collectonly:
        return
    here = Path(__file__).parent
    mine = [i for i in session.items if here in Path(str(i.path)).parents]
    if not any(i.get_closest_marker("slow") for i in mine):
        return  # only the fast tests: nothing is emulated
    _start(f"board-{host_onnxruntime_version()}", _board(host_onnxruntime_version()))
    _start(f"board-{OLD_ORT}", _board(OLD_ORT))  # the runtime-incompatibility test's older onnxruntime
    if any("default_bundle" in getattr(i, "fixturenames", ()) for i in mine):
        _start("default-bundle", _default_bundle)


@pytest.fixture(scope="session")
def target_env() -> TargetEnv:
    version = host_onnxruntime_version()
    try:
        return _start(f"board-{version}", _board(version)).result()
    except TargetError as exc:
        pytest.fail(f"cannot build the emulated target: {exc}")


@pytest.fixture(scope="session")
def default_bundle() -> tuple[Path, Path]:
    """tests/conftest.py's default bundle (same cache, same lock), started at collection time."""
    return _start("default-bundle", _default_bundle).result()


@pytest.fixture(scope="session", autouse=True)
def verify_results_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A results cache (export/target/results.py) of this session's own, for the CLI processes and the
    in-process calls alike: every session emulates for real at least once (nothing measured by an earlier
    session, with other code, is reused), and within the session one measurement serves both entry points."""
    folder = tmp_path_factory.mktemp("verify-results")
    old = os.environ.get(RESULTS_ENV)
    os.environ[RESULTS_ENV] = str(folder)
    yield folder
    if old is None:
        os.environ.pop(RESULTS_ENV, None)
    else:
        os.environ[RESULTS_ENV] = old


@pytest.fixture(scope="session")
def a76_cli_run(default_bundle: tuple[Path, Path], verify_results_cache: Path) -> tuple[int, dict[str, Any], str]:
    """`nanofleet verify-target DEFAULT_BUNDLE --cpu cortex-a76 --trust KEY --json` on the gate's own eval text
    (500+ tokens), run once per session: the CLI test checks it, and the export gate's test verifies the same
    files after it, so that one reuses this emulated measurement (the ~9 minutes of the suite's qemu part)."""
    bundle, pub = default_bundle
    return run_cli(str(bundle), "--cpu", CPU, "--trust", str(pub), timeout=2400)


def run_cli(*args: str, timeout: float = 900) -> tuple[int, dict[str, Any], str]:
    """`nanofleet verify-target ... --json` in a real process: (exit code, JSON, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "nanofleet.cli", "verify-target", *args, "--json"],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(
            f"verify-target printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
        )
    return proc.returncode, data, proc.stderr


def tiny_bundle(root: Path, key: SigningKey, nodes: list[Any], ops: list[str]) -> Path:
    """A signed bundle around a tiny graph; ``ops`` is what the build would list for it."""
    import onnx
    from onnx import TensorProto, helper

    root.mkdir(parents=True)
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9
    onnx.save(model, root / "model.onnx")
    manifest = BundleManifest(
        name="tiny",
        version=1,
        created_at=dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
        arch=ArchConfig(
            architecture="llama",
            num_layers=1,
            hidden_size=4,
            num_attention_heads=1,
            num_kv_heads=1,
            head_dim=4,
            vocab_size=4,
            context_length=16,
        ),  # fmt: skip
        graph=GraphSpec(kind="optimum-kv", input_names=["x"], output_names=["y"]),
        runtime=Runtime(target="arm64", min_onnxruntime="1.20", operators=sorted(ops)),
        recipe=Recipe(precision="fp32", method="none"),
        files=[describe_file(root, "model.onnx", "model")],
        provenance=Provenance(source="tests/target", source_kind="folder"),
    )
    write_signed_manifest(root, manifest, key)
    return root


@pytest.fixture
def signing(tmp_path: Path) -> tuple[SigningKey, Path]:
    key = SigningKey.generate()
    _priv, pub = write_keypair(tmp_path / "keys", key)
    return key, pub
