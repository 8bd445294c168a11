"""A real uvicorn server over the real fp32 engine, on a free port."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from device.api import ApiServer, ApiSettings, ModelHolder, create_app
from device.engine import Engine
from tests.conftest import free_port
from tests.device_engine.conftest import shared_fp32_engine


@pytest.fixture(scope="session")
def engine() -> Engine:
    return shared_fp32_engine()


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
