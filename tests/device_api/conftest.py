"""A real uvicorn server over the real default bundle (INT8, verified with its test key), on a free port."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device.api import ApiServer, ApiSettings, ModelHolder, create_app
from device.engine import Engine, EngineOptions
from manifests import TrustStore
from tests.conftest import free_port


@pytest.fixture(scope="session")
def api_bundle(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(bundle, public key): the default bundle, or NANOFLEET_TEST_API_BUNDLE="DIR:PUBKEY"."""
    env = os.environ.get("NANOFLEET_TEST_API_BUNDLE")
    if env:
        bundle, pub = env.split(":", 1)
        return Path(bundle), Path(pub)
    return request.getfixturevalue("default_bundle")


@pytest.fixture(scope="session")
def engine(api_bundle: tuple[Path, Path]) -> Iterator[Engine]:
    bundle, pub = api_bundle
    engine = Engine.from_bundle(
        bundle, TrustStore.from_paths([pub]), EngineOptions(threads=2, spin_wait=False)
    )
    yield engine
    engine.close()


@pytest.fixture
def serve(engine: Engine) -> Iterator[Callable[..., tuple[ApiServer, ModelHolder]]]:
    """serve(**settings) -> (server, holder): a fresh app and holder over the shared engine."""
    started: list[ApiServer] = []

    def start(holder: ModelHolder | None = None, **settings: object) -> tuple[ApiServer, ModelHolder]:
        holder = holder if holder is not None else ModelHolder(engine)
        app = create_app(holder, ApiSettings(port=free_port(), **settings))  # type: ignore[arg-type]
        srv = ApiServer(app, port=app.state.service.settings.port).start()
        started.append(srv)
        return srv, holder

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def server(serve) -> tuple[ApiServer, ModelHolder]:  # noqa: ANN001
    return serve()
