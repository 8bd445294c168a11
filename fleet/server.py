"""Running the service: uvicorn in the foreground (``serve``) or in a thread (tests, demo)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import socket
import threading
import time

import uvicorn

from manifests import atomic_write_text

from .config import FleetConfig
from .errors import FleetError
from .http import create_app
from .service import FleetService

INFO_FILE = "service.json"
log = logging.getLogger(__name__)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def bind_listener(config: FleetConfig) -> socket.socket:
    """The API's listening socket, bound before the service starts. With port 0 the kernel's pick is ours
    from then on: picking a free port and letting uvicorn bind it later raced with other processes'
    outgoing connections, which take ports from the same ephemeral range (a server then wrote its
    service.json and died with "address already in use")."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        sock.close()
        message = f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        raise FleetError(message, reason="port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    config.port = sock.getsockname()[1]
    return sock


def prepare(config: FleetConfig) -> tuple[FleetService, socket.socket]:
    sock = bind_listener(config)
    return FleetService(config), sock


def write_info(svc: FleetService) -> None:
    """data_dir/service.json: where this running service is, for the CLI and scripts on this host."""
    info = {
        "url": svc.public_url,
        "mqtt_url": svc.mqtt_url,
        "pid": os.getpid(),
        "data_dir": str(svc.config.data_dir),
    }
    atomic_write_text(svc.config.data_dir / INFO_FILE, json.dumps(info, indent=2))


def startup_line(svc: FleetService) -> str:
    """One line that says where everything is (logged once the service listens)."""
    try:
        version = importlib.metadata.version("nanofleet")
    except importlib.metadata.PackageNotFoundError:
        version = "dev"
    path = svc.config.data_dir.absolute() / "admin.token"
    token = str(path) if path.is_file() else "as set in the config"
    return (
        f"nanofleet fleet {version}: API {svc.public_url}/api/v1, dashboard {svc.public_url}/ "
        f"(admin token: {token}), broker {svc.mqtt_url}, data {svc.config.data_dir.absolute()}"
    )


def serve(config: FleetConfig, log_level: str = "info") -> None:
    svc, sock = prepare(config)

    def started() -> None:
        write_info(svc)
        log.info("%s", startup_line(svc))

    app = create_app(svc, on_started=started)
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, access_log=False)
    )
    server.run(sockets=[sock])


class ServerThread:
    """The whole service in a background thread of this process; ``stop()`` shuts it down cleanly."""

    def __init__(self, config: FleetConfig) -> None:
        self.svc, self.sock = prepare(config)
        self.app = create_app(self.svc)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host=config.host, port=config.port, log_level="warning", access_log=False)
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="fleet-http", daemon=True
        )

    @property
    def url(self) -> str:
        return self.svc.public_url

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fleet service did not start")
            time.sleep(0.05)
        write_info(self.svc)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
