"""Shared fixtures: free ports, a private mosquitto, the test PostgreSQL URL, key pairs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import Phase, settings

from manifests import SigningKey, write_keypair

# Property tests (hypothesis, schemathesis) report a failure with its seed at once: no example database (a
# stale file cannot replay into a clean CI run) and no shrinking (which can take minutes of the CI budget).
settings.register_profile(
    "nanofleet",
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.explain],
)
settings.load_profile("nanofleet")

REPO = Path(__file__).resolve().parents[1]
# `device serve`, `bench` and agents started by tests keep their prepacked-weights cache in the checkout,
# not in the user's ~/.cache (device/engine/weights_cache.py).
os.environ.setdefault("NANOFLEET_WEIGHTS_CACHE", str(REPO / ".cache" / "test-weights-cache"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def mosquitto_bin() -> str:
    path = os.environ.get("NANOFLEET_TEST_MOSQUITTO_BIN") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(path).exists():
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or apt-get install mosquitto")
    return path


class Mosquitto:
    """A private mosquitto on a free port; stop()/start() simulate a broker outage."""

    def __init__(self, workdir: Path, extra_conf: str = "") -> None:
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {workdir}/\n{extra_conf}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [mosquitto_bin(), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "mosquitto.log", "ab"),  # noqa: SIM115
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = Mosquitto(workdir)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def pg_url() -> str:
    url = os.environ.get("NANOFLEET_TEST_PG_URL")
    if not url:
        pytest.fail("NANOFLEET_TEST_PG_URL is not set: run the suite with `make test`, which starts PostgreSQL")
    return url


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[SigningKey, Path, Path]:
    key = SigningKey.generate()
    priv, pub = write_keypair(tmp_path / "keys", key)
    return key, priv, pub


@pytest.fixture(scope="session")
def default_bundle() -> tuple[Path, Path]:
    """(bundle_dir, public_key_path): the real default model (SmolLM2-135M GGUF) exported by
    `nanofleet export` with the default INT8 recipe, signed by a test key stored beside it. Built once and
    cached under .cache/test-bundles/ keyed by a hash of export/ and manifests/; treat it as read-only
    (copy it before changing anything)."""
    from tests.export.bundle_cache import cached_bundle

    bundle, pub, _summary = cached_bundle("int8", [])
    return bundle, pub
