"""The long-running agent process: runtime + local API, update worker, MQTT link, telemetry, watchdog.

Threads: paho's network thread; the outbox sender; ONE update worker (resume, then desired states in
order of arrival, newest wins); the main thread samples telemetry and pings the watchdog. The local API
serves the committed model whatever the broker or the fleet are doing.

The edges are injected: the broker connection (``link``: MqttLink, a fake in unit tests), the model runtime,
the download edge, the disk. Other packages add their loops as ``extensions`` (device.offline's media
watcher, wired by the composition root ``device/cli.py``), so this package never imports them.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from manifests import atomic_write_bytes
from manifests.errors import SchemaError
from manifests.mqtt import DesiredState, ReportedState, telemetry_topic

from . import sdnotify
from .capabilities import CapabilityProbe, SystemProbe, probe_safely
from .config import AgentConfig
from .datadir import DataDir
from .disk import Disk
from .errors import AgentError
from .fetch import Fetcher
from .mqtt_link import Link, LinkFactory, MqttLink
from .runtime import ModelRuntime, make_runtime
from .states import RESTING
from .store import UpdateRecord
from .telemetry import Sampler
from .updater import Hooks
from .wiring import OutboxEmitter, agent_version, make_fetcher, make_updater, now_utc, open_outbox, reported_state

log = logging.getLogger("nanofleet.agent")


class Extension(Protocol):
    """Something that runs beside the agent's loops (the removable-media watcher of device.offline)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


# Built once the agent serves and its update worker runs; the agent is passed in (its emit, submit, config).
ExtensionFactory = Callable[["Agent"], Extension]


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        runtime: ModelRuntime | None = None,
        fetcher: Fetcher | None = None,
        disk: Disk | None = None,
        hooks: Hooks | None = None,
        link: LinkFactory = MqttLink,
        extensions: Sequence[ExtensionFactory] = (),
        capabilities: CapabilityProbe | None = None,
    ) -> None:
        self.config = config
        # What the board can run, probed once (its hardware and onnxruntime do not change while it runs).
        self.capabilities = probe_safely(capabilities or SystemProbe(config.hardware_class))
        self.version = agent_version()
        self.data_dir = config.data_dir
        self.layout = config.layout.ensure()
        self.trust = config.trust_store()
        self.runtime = runtime or make_runtime(config)
        self.fetcher = fetcher or make_fetcher(config)
        self.outbox = open_outbox(config)
        self._events = OutboxEmitter(self.outbox, config.device_id)
        self.sampler = Sampler(config.device_id, self.version, self.data_dir)
        self.link: Link = link(config.mqtt, config.device_id, self.version, self.outbox, self._on_desired)
        self.updater = make_updater(
            config,
            fetcher=self.fetcher,
            runtime=self.runtime,
            emit=self.emit,
            on_change=self._publish_reported,
            disk=disk,
            hooks=hooks,
            trust=self.trust,
        )
        self._extension_factories = list(extensions)
        self._desired: queue.Queue[DesiredState] = queue.Queue()
        self._stop = threading.Event()
        self._fatal: AgentError | None = None
        self._worker = threading.Thread(target=self._work, name="update-worker", daemon=True)

    # ---- outputs -----------------------------------------------------------------------------------
    def emit(self, kind: str, message: str, **fields: Any) -> None:
        """Queue an event (store and forward)."""
        self._events(kind, message, **fields)

    def reported(self, rec: UpdateRecord | None = None) -> ReportedState:
        rec = rec or self.updater.snapshot()
        problem = self.updater.serving_error
        if problem is not None and rec.error is None and rec.state in RESTING:
            # The committed slot does not serve (e.g. its key was revoked): say so beside the record.
            rec = rec.model_copy(update={"error": f"{problem.reason}: {problem.message}"})
        return reported_state(self.config, rec, version=self.version, ts=now_utc(), capabilities=self.capabilities)

    def _publish_reported(self, rec: UpdateRecord) -> None:
        self.link.publish_reported(self.reported(rec).to_bytes())

    def _write_status(self) -> None:
        serving = self.runtime.serving()
        doc = {
            "pid": os.getpid(),
            "ts": now_utc().isoformat(),
            "broker_connected": self.link.connected.is_set(),
            "broker": f"{self.config.mqtt.host}:{self.config.mqtt.port}",
            "last_connect": self.link.last_connect.isoformat() if self.link.last_connect else None,
            "last_error": self.link.last_error,
            "outbox_pending": len(self.outbox),
            "outbox_dropped": self.outbox.dropped,
            "serving": serving.__dict__ if serving else None,
            "agent_version": self.version,
        }
        atomic_write_bytes(self.layout.status_file, json.dumps(doc, indent=1).encode())

    def telemetry_tick(self) -> None:
        stats = self.runtime.stats()
        serving = self.runtime.serving()
        dropped = self.outbox.dropped

        def build(seq: int) -> bytes:
            return self.sampler.sample(seq, stats, serving, dropped, self.capabilities).to_bytes()

        self.outbox.put(telemetry_topic(self.config.device_id), build)

    # ---- inputs ------------------------------------------------------------------------------------
    def submit(self, desired: DesiredState) -> None:
        """Queue a command from another source than MQTT (removable media, device.offline)."""
        self._desired.put(desired)

    def _on_desired(self, payload: bytes) -> None:
        """A message on our desired topic (paho's thread): checked at the edge, queued or refused.

        A refused one never reaches the update worker, so it never touches state.json; it is logged and
        queued as an ``error`` event with ``details.reason`` (``too_large``, ``schema``,
        ``not_for_this_device``). Whatever the bytes, nothing raises out of here."""
        try:
            desired = check_desired(payload, self.config.device_id)
        except DesiredRefused as exc:
            message = _printable(f"desired state refused: {exc.message}")
            log.warning("%s", message)
            self.emit("error", message, details={"reason": exc.reason})
            return
        self._desired.put(desired)

    def _work(self) -> None:
        try:
            if self.updater.pending_resume():
                self.updater.resume()
            if self.config.bootstrap_bundle is not None:
                self.updater.bootstrap(self.config.bootstrap_bundle)
            while not self._stop.is_set():
                try:
                    desired = self._desired.get(timeout=0.5)
                except queue.Empty:
                    continue
                # Only the newest desired state matters: skip ones a later message superseded.
                while True:
                    try:
                        desired = self._desired.get_nowait()
                    except queue.Empty:
                        break
                outcome = self.updater.handle_desired(desired)
                log.info("deployment %s: %s", desired.deployment_id, outcome)
        except AgentError as exc:
            log.error("update worker stopped: %s", exc.message)
            self.emit("error", exc.message, details={"reason": exc.reason})
            self._fatal = exc
            self._stop.set()
        except Exception as exc:  # e.g. the state file cannot be written: exit, systemd restarts us
            log.exception("update worker crashed")
            self._fatal = AgentError(f"update worker crashed: {type(exc).__name__}: {exc}", reason="internal")
            self._stop.set()

    # ---- main ---------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask ``run`` to return (the CLI calls it on SIGTERM/SIGINT)."""
        self._stop.set()

    def run(self) -> int:
        """Serve, take updates and send telemetry until ``stop``; 1 if the update worker died of an error."""
        self.runtime.start()
        self.updater.startup()
        self._publish_reported(self.updater.snapshot())
        self.link.start()
        self._worker.start()
        sdnotify.notify("READY=1")
        extensions = [make(self) for make in self._extension_factories]
        for ext in extensions:
            ext.start()
        interval = self.config.telemetry.interval_s
        watchdog = sdnotify.watchdog_interval_s()
        tick = min(interval, watchdog) if watchdog else interval
        next_telemetry = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_telemetry:
                self.telemetry_tick()
                next_telemetry = now + interval
            self._write_status()
            sdnotify.notify("WATCHDOG=1")
            self._stop.wait(min(tick, max(0.05, next_telemetry - time.monotonic()), 1.0))
        sdnotify.notify("STOPPING=1")
        for ext in extensions:
            ext.stop()
        self.link.stop()
        self.runtime.stop()
        self._write_status()
        return 1 if self._fatal else 0


MAX_DESIRED_BYTES = 256 * 1024  # a desired state is a few hundred bytes; with a rollback document, a few KB
MAX_ID_CHARS = 256


class DesiredRefused(AgentError):
    """A desired-state message refused at the edge (the reason says why)."""

    reason = "schema"


def _printable(text: str, limit: int = 1000) -> str:
    """An error message that always serializes: lone surrogates escaped, and cut to a readable length."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "..."


def check_desired(payload: bytes, device_id: str) -> DesiredState:
    """The desired state in ``payload``, or DesiredRefused: over the size cap, not the schema, not
    serializable back (e.g. lone UTF-16 surrogates, which state.json could not hold), ids over the length
    cap, or addressed to another device."""
    if len(payload) > MAX_DESIRED_BYTES:
        raise DesiredRefused(f"{len(payload)} bytes, over the cap of {MAX_DESIRED_BYTES}", reason="too_large")
    try:
        desired = DesiredState.from_bytes(payload)
        desired.to_bytes()  # everything we keep of it must be writable as UTF-8 JSON
    except SchemaError as exc:
        raise DesiredRefused(exc.message) from exc
    except (ValueError, UnicodeError) as exc:  # pydantic's serialization error is a ValueError
        raise DesiredRefused(f"not valid UTF-8 text: {exc}") from exc
    for what, value in (("deployment_id", desired.deployment_id), ("device_id", desired.device_id)):
        if not value or len(value) > MAX_ID_CHARS:
            raise DesiredRefused(f"{what} must have 1 to {MAX_ID_CHARS} characters")
    if desired.device_id != device_id:
        raise DesiredRefused(
            f"addressed to device {desired.device_id!r}, not {device_id!r}", reason="not_for_this_device"
        )
    return desired


def read_status(data_dir: Path) -> dict[str, Any] | None:
    path = DataDir(data_dir).status_file
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
