"""How the agent's parts are put together from its config, in one place.

Two programs run the update state machine on a board: the long-running agent (agent.py) and an offline
install with no agent running (device.offline.install). Both build the download edge, the store-and-forward
event emitter, the Updater and the reported state here, so an update from a stick is the same update as
one over the network, and the fleet reads the same documents from both.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from manifests import BoardCapabilities, TrustStore
from manifests.mqtt import Event, ReportedState, SlotInfo, events_topic

from .adapters import AdapterStore
from .config import AgentConfig
from .disk import Disk
from .fetch import DownloadLimits, Fetcher, HttpFetcher
from .outbox import Outbox
from .runtime import ModelRuntime
from .store import UpdateRecord
from .telemetry import cpu_arch, ram_bytes
from .updater import EnvHooks, Hooks, Updater


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def agent_version() -> str:
    """The installed nanofleet version: what the agent reports and what telemetry exports carry."""
    try:
        from importlib.metadata import version

        return version("nanofleet")
    except Exception:
        return "0.0.0+unknown"


def make_fetcher(cfg: AgentConfig) -> HttpFetcher:
    a = cfg.artifacts
    limits = DownloadLimits(
        min_rate_bytes_s=a.min_rate_bytes_s, rate_window_s=a.rate_window_s, max_download_s=a.max_download_s
    )
    return HttpFetcher(timeout_s=a.timeout_s, retries=a.retries, ca=a.ca, limits=limits)


def open_outbox(cfg: AgentConfig) -> Outbox:
    """The store-and-forward queue in the data folder (created on first use)."""
    return Outbox(cfg.layout.ensure().outbox_file, cfg.telemetry.queue_max_entries)


class OutboxEmitter:
    """``emit(kind, message, **fields)``: an event queued in the outbox with the next per-device seq."""

    def __init__(self, outbox: Outbox, device_id: str, clock: Callable[[], dt.datetime] = now_utc) -> None:
        self.outbox = outbox
        self.device_id = device_id
        self.clock = clock

    def __call__(self, kind: str, message: str, **fields: Any) -> None:
        def build(seq: int) -> bytes:
            return Event(
                device_id=self.device_id,
                seq=seq,
                ts=self.clock(),
                kind=kind,  # type: ignore[arg-type]
                message=message,
                **fields,
            ).to_bytes()

        self.outbox.put(events_topic(self.device_id), build)


def reported_state(
    cfg: AgentConfig,
    rec: UpdateRecord,
    *,
    version: str,
    ts: dt.datetime,
    capabilities: BoardCapabilities | None = None,
) -> ReportedState:
    """The retained ``reported`` document for an update record (contract: manifests/mqtt.py), with what the
    board can run (device/agent/capabilities.py) when the caller probed it."""
    return ReportedState(
        device_id=cfg.device_id,
        state=rec.state,
        deployment_id=rec.deployment_id,
        active_slot=rec.active_slot,
        slots={k: (v or SlotInfo()) for k, v in rec.slots.items()},
        committed=rec.committed,
        last_result=rec.last_result,
        error=rec.error,
        agent_version=version,
        hardware_class=cfg.hardware_class,
        cpu_arch=cpu_arch(),
        ram_bytes=ram_bytes(),
        capabilities=capabilities,
        adapters=AdapterStore(cfg.data_dir).report(rec.committed.manifest_sha256 if rec.committed else None),
        ts=ts,
    )


def make_updater(
    cfg: AgentConfig,
    *,
    fetcher: Fetcher,
    runtime: ModelRuntime,
    emit: Callable[..., None],
    on_change: Callable[[UpdateRecord], None] | None = None,
    disk: Disk | None = None,
    hooks: Hooks | None = None,
    trust: TrustStore | None = None,
) -> Updater:
    """The Updater over this config's data folder, trusted keys, artifact source and limits."""
    limits = cfg.limits
    return Updater(
        data_dir=cfg.data_dir,
        device_id=cfg.device_id,
        trust=trust or cfg.trust_store(),
        fetcher=fetcher,
        runtime=runtime,
        artifacts_base_url=cfg.artifacts.base_url,
        disk=disk,
        hooks=hooks or EnvHooks(cfg.data_dir),
        emit=emit,
        on_change=on_change,
        max_file_bytes=limits.max_file_bytes,
        disk_margin_bytes=limits.disk_margin_bytes,
        max_memory_bytes=limits.max_memory_bytes,
    )
