"""What this board can run (``manifests.BoardCapabilities``): RAM, CPU features, onnxruntime and its
execution providers. The agent reports it at enrolment, in its retained ``reported`` state and in telemetry;
the fleet picks the board's variant of a release from it.

The probe is an injected interface (``CapabilityProbe``): ``SystemProbe`` reads ``/proc/cpuinfo``,
``/proc/meminfo`` and onnxruntime; ``StaticProbe`` returns what it is given (tests, boards whose /proc says
little). A probe never fails the agent: what cannot be read is reported as ``None`` ("not reported").
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from manifests import BoardCapabilities

log = logging.getLogger("nanofleet.agent")

# /proc/cpuinfo keys naming the CPU, most specific first (x86: 'model name'; a Pi: 'Model'; older arm: 'Hardware').
_MODEL_KEYS = ("model name", "model", "hardware", "cpu model")


class CapabilityProbe(Protocol):
    def probe(self) -> BoardCapabilities: ...


def parse_cpuinfo(text: str) -> tuple[str | None, list[str] | None]:
    """(CPU model, features) from /proc/cpuinfo: the union of every core's 'Features' (arm) or 'flags'
    (x86) line, lower case and sorted; None for what the text does not say."""
    features: set[str] = set()
    seen_features = False
    model: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("features", "flags"):
            seen_features = True
            features.update(w.lower() for w in value.split())
        elif key in _MODEL_KEYS and value.strip():
            model.setdefault(key, value.strip())
    name = next((model[k] for k in _MODEL_KEYS if k in model), None)
    return name, (sorted(features) if seen_features else None)


def parse_meminfo(text: str) -> int | None:
    """MemTotal in bytes from /proc/meminfo (the kernel writes kB, meaning KiB)."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            try:
                return int(parts[1]) * 1024
            except (IndexError, ValueError):
                return None
    return None


def onnxruntime_info() -> tuple[str | None, list[str] | None]:
    """(version, available execution providers) of the onnxruntime this Python would load; (None, None)
    without one (a plug-in runtime may not use it)."""
    try:
        import onnxruntime as ort
    except Exception:  # noqa: BLE001 - not installed, or a broken wheel: not reported
        return None, None
    try:
        return str(ort.__version__), list(ort.get_available_providers())
    except Exception:  # noqa: BLE001
        return str(getattr(ort, "__version__", "")) or None, None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


@dataclass
class SystemProbe:
    """The real board: /proc and the installed onnxruntime. ``runtime_info`` is injectable for tests."""

    hardware_class: str | None = None
    proc: Path = Path("/proc")
    runtime_info: Callable[[], tuple[str | None, list[str] | None]] = field(default=onnxruntime_info)

    def probe(self) -> BoardCapabilities:
        cpuinfo = _read(self.proc / "cpuinfo")
        meminfo = _read(self.proc / "meminfo")
        model, features = parse_cpuinfo(cpuinfo) if cpuinfo is not None else (None, None)
        version, providers = self.runtime_info()
        return BoardCapabilities(
            arch=platform.machine() or None,
            hardware_class=self.hardware_class,
            ram_bytes=parse_meminfo(meminfo) if meminfo is not None else None,
            cpu_model=model[:200] if model else None,
            cpu_features=features,
            onnxruntime_version=version,
            execution_providers=providers,
        )


@dataclass
class StaticProbe:
    """Reports what it was given (tests; a board whose capabilities are set by hand)."""

    capabilities: BoardCapabilities

    def probe(self) -> BoardCapabilities:
        return self.capabilities


def probe_safely(probe: CapabilityProbe) -> BoardCapabilities | None:
    """The probe's answer, or None (logged) if it raised: capabilities are never worth stopping a board for."""
    try:
        return probe.probe()
    except Exception as exc:  # noqa: BLE001
        log.warning("board capabilities could not be read: %s", exc)
        return None
