"""Session fixtures over the cached artefacts of fixtures.py: the test key, bases per precision, PEFT adapters,
adapter bundles, and a loaded int8 base with two adapters resident."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from device.engine import Engine, EngineOptions
from manifests import TrustStore

from . import fixtures


@pytest.fixture(scope="session")
def adapter_keys() -> tuple[Path, Path]:
    return fixtures.test_keys()


@pytest.fixture(scope="session")
def trust(adapter_keys: tuple[Path, Path]) -> TrustStore:
    return TrustStore.from_paths([adapter_keys[1]])


@pytest.fixture(scope="session")
def base_int8() -> Path:
    return fixtures.base_bundle("int8")


@pytest.fixture(scope="session")
def base_fp32() -> Path:
    return fixtures.base_bundle("fp32")


@pytest.fixture(scope="session")
def qv_int8() -> tuple[Path, dict]:
    return fixtures.adapter_bundle("qv", "int8")


@pytest.fixture(scope="session")
def all_int8() -> tuple[Path, dict]:
    return fixtures.adapter_bundle("all", "int8")


@pytest.fixture(scope="session")
def engine_int8(base_int8: Path, qv_int8: tuple[Path, dict], all_int8: tuple[Path, dict],
                trust: TrustStore) -> Iterator[Engine]:  # fmt: skip
    """The int8 base, verified, with the qv and all adapters resident (tests that unload put them back)."""
    engine = Engine.from_bundle(base_int8, trust, EngineOptions(threads=2, spin_wait=False))
    engine.load_adapter(qv_int8[0], trust)
    engine.load_adapter(all_int8[0], trust)
    yield engine
    engine.close()
