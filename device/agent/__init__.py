"""The update agent: A/B slots, the OTA state machine, MQTT and telemetry (docs/ota.md).

Public surface (imported lazily so `nanofleet --help` stays fast on a board)::

    from device.agent import Agent, AgentConfig, DataDir, load_config, Updater, State, Event, TRANSITIONS, RESUME_MAP
    from device.agent import ensure_device_key   # the board's own key (identity.py), for enrolment
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent import Agent
    from .config import AgentConfig, load_config
    from .datadir import DataDir
    from .errors import AgentError, ConfigError, RefusedError, UpdateError
    from .identity import ensure_device_key, load_device_key
    from .states import RESUME_MAP, TRANSITIONS, Event, State
    from .updater import Updater

_EXPORTS = {
    "Agent": ".agent",
    "AgentConfig": ".config",
    "load_config": ".config",
    "DataDir": ".datadir",
    "AgentError": ".errors",
    "ConfigError": ".errors",
    "RefusedError": ".errors",
    "UpdateError": ".errors",
    "ensure_device_key": ".identity",
    "load_device_key": ".identity",
    "RESUME_MAP": ".states",
    "TRANSITIONS": ".states",
    "Event": ".states",
    "State": ".states",
    "Updater": ".updater",
}

__all__ = [
    "RESUME_MAP",
    "TRANSITIONS",
    "Agent",
    "AgentConfig",
    "AgentError",
    "ConfigError",
    "DataDir",
    "Event",
    "RefusedError",
    "State",
    "UpdateError",
    "Updater",
    "ensure_device_key",
    "load_config",
    "load_device_key",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(name)
