"""One exception tree for the agent. Library errors (httpx, OSError, manifests) are translated at the edge.

Every update failure carries a short machine-readable ``reason`` that goes into events and the reported state.
"""

from __future__ import annotations

from manifests.errors import NanofleetError


class AgentError(NanofleetError):
    """Base of every error raised by ``device.agent``."""

    reason = "agent_error"


class ConfigError(AgentError):
    """The agent configuration file is missing or invalid (the message names the field)."""

    reason = "config"


class StateFileError(AgentError):
    """The persisted update state cannot be read."""

    reason = "state_file"


class InvalidTransitionError(AgentError):
    """An event that the transition table does not allow in the current state (a programming error)."""

    reason = "invalid_transition"


class UpdateError(AgentError):
    """An update failed; the agent rolls back and reports it."""

    reason = "update_failed"


class RefusedError(UpdateError):
    """The update is refused on security grounds (signature, key, anti-rollback, expiry, mismatch)."""

    reason = "refused"


class AntiRollbackError(RefusedError):
    reason = "anti_rollback"


class DownloadError(UpdateError):
    reason = "download"


class TooSlowError(DownloadError):
    """A connection stayed under ``artifacts.min_rate_bytes_s`` for a whole window (cut, then resumed)."""

    reason = "too_slow"


class DownloadTimeoutError(DownloadError):
    """A file was not complete within ``artifacts.max_download_s``: the update fails."""

    reason = "download_timeout"


class DiskFullError(UpdateError):
    reason = "disk_full"


class HealthCheckError(UpdateError):
    reason = "health_check"


class ModelLoadError(UpdateError):
    reason = "model_load"


class InjectedError(UpdateError):
    """Raised by the test hook NANOFLEET_AGENT_FAIL_IN to exercise error_in_<state>."""

    reason = "injected"
