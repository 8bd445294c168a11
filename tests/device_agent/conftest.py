from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from manifests import SigningKey, TrustStore

from .helpers import ArtifactServer


@pytest.fixture(scope="session")
def release_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def trust(release_key: SigningKey) -> TrustStore:
    return TrustStore([release_key.public_key])


@pytest.fixture
def artifacts(tmp_path: Path) -> Iterator[ArtifactServer]:
    root = tmp_path / "artifacts"
    root.mkdir()
    server = ArtifactServer(root)
    yield server
    server.stop()
