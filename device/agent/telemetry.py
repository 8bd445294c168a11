"""Telemetry sampling: serving stats from the runtime, process and board health, the model in service."""

from __future__ import annotations

import datetime as dt
import glob
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from manifests import BoardCapabilities
from manifests.mqtt import ModelRef, Telemetry

from .runtime import ServingInfo

THERMAL_GLOB = "/sys/class/thermal/thermal_zone*/temp"


def cpu_temp_c(pattern: str = THERMAL_GLOB) -> float | None:
    """The hottest thermal zone in °C; None where the board exposes none (VMs, containers)."""
    temps = []
    for path in sorted(glob.glob(pattern)):
        try:
            raw = Path(path).read_text().strip()
            temps.append(int(raw) / 1000.0)
        except (OSError, ValueError):
            continue
    return max(temps) if temps else None


def rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        try:  # Linux fallback without psutil
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None


def cpu_load() -> float | None:
    """1-minute load average divided by the number of CPUs (1.0 = all cores busy)."""
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)
    except OSError:
        return None


def ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def cpu_arch() -> str:
    return platform.machine()


class Sampler:
    def __init__(self, device_id: str, agent_version: str, data_dir: Path) -> None:
        self.device_id = device_id
        self.agent_version = agent_version
        self.data_dir = data_dir
        self.started = time.monotonic()
        self._capabilities_sent: BoardCapabilities | None = None

    def sample(
        self,
        seq: int,
        stats: dict[str, Any],
        serving: ServingInfo | None,
        dropped: int,
        capabilities: BoardCapabilities | None = None,
    ) -> Telemetry:
        """One sample; ``capabilities`` ride along only when they differ from the last sample's (the first
        after start, or after a change): the retained reported state carries them always."""
        def num(key: str, cast: type = float) -> Any:
            v = stats.get(key)
            return None if v is None else cast(v)

        try:
            free = shutil.disk_usage(self.data_dir).free
        except OSError:
            free = None
        return Telemetry(
            device_id=self.device_id,
            seq=seq,
            ts=dt.datetime.now(dt.timezone.utc),
            decode_tok_s=num("decode_tok_s"),
            ttft_p50_ms=num("ttft_p50_ms"),
            ttft_p95_ms=num("ttft_p95_ms"),
            requests=int(stats.get("requests") or 0),
            errors=int(stats.get("errors") or 0),
            queue_depth=int(stats.get("queue_depth") or 0),
            rss_bytes=rss_bytes(),
            cpu_load=cpu_load(),
            cpu_temp_c=cpu_temp_c(),
            disk_free_bytes=free,
            model=ModelRef(name=serving.name, version=serving.version, slot=serving.slot)  # type: ignore[arg-type]
            if serving
            else ModelRef(),
            uptime_s=round(time.monotonic() - self.started, 3),
            agent_version=self.agent_version,
            dropped=dropped,
            capabilities=self._fresh(capabilities),
        )

    def _fresh(self, capabilities: BoardCapabilities | None) -> BoardCapabilities | None:
        if capabilities is None or capabilities == self._capabilities_sent:
            return None
        self._capabilities_sent = capabilities
        return capabilities
