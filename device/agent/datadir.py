"""The agent's data folder (``data_dir`` in the config): every file and folder name in it, in one place.

    <data_dir>/
      state.json              the update record (store.py): written atomically on every transition
      outbox.sqlite           store and forward: telemetry and events not yet acknowledged (outbox.py)
      agent-status.json       what the running agent last saw (pid, broker, outbox), rewritten every second
      slots/a, slots/b        the A/B bundle slots (slots.py)
      weights-cache/          onnxruntime's prepacked weights, built once per model (runtime.py)
      paused-in-<state>       test hook markers (updater.EnvHooks)
      offline/                removable media (device.offline): inbox/, results/, handled.json, exported/
      device.key              this board's own ed25519 private key, mode 0600 (identity.py): signs its
                              offline telemetry exports; its public half is registered at enrolment

The names are part of the board's on-disk format: an agent after an upgrade reads what the previous one
wrote, and `nanofleet device status` / `device install` read them while the agent runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "state.json"
OUTBOX_FILE = "outbox.sqlite"
STATUS_FILE = "agent-status.json"
SLOTS_DIR = "slots"
WEIGHTS_CACHE_DIR = "weights-cache"
OFFLINE_DIR = "offline"
DEVICE_KEY_FILE = "device.key"


@dataclass(frozen=True)
class DataDir:
    """Paths inside one agent data folder. Pure path arithmetic: nothing is created until ``ensure``."""

    root: Path

    def ensure(self) -> DataDir:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def outbox_file(self) -> Path:
        return self.root / OUTBOX_FILE

    @property
    def status_file(self) -> Path:
        return self.root / STATUS_FILE

    @property
    def slots(self) -> Path:
        return self.root / SLOTS_DIR

    @property
    def weights_cache(self) -> Path:
        return self.root / WEIGHTS_CACHE_DIR

    @property
    def device_key(self) -> Path:
        """The board's own private key (identity.py); never leaves the board."""
        return self.root / DEVICE_KEY_FILE

    def paused_marker(self, state: str) -> Path:
        """Written by the test hook NANOFLEET_AGENT_PAUSE_IN when the agent stops in ``state``."""
        return self.root / f"paused-in-{state}"

    # ---- removable media (device.offline) ----------------------------------------------------------
    @property
    def offline(self) -> Path:
        return self.root / OFFLINE_DIR

    @property
    def offline_inbox(self) -> Path:
        """`nanofleet device install` requests for the running agent, one JSON file each."""
        return self.offline / "inbox"

    @property
    def offline_results(self) -> Path:
        """The running agent's answers to those requests (accepted or refused), by request file name."""
        return self.offline / "results"

    @property
    def offline_handled(self) -> Path:
        """sha256 of every package document already acted on (a stick left in does not re-trigger)."""
        return self.offline / "handled.json"

    @property
    def offline_exported(self) -> Path:
        """The last telemetry exports written to media, kept in case a stick is lost."""
        return self.offline / "exported"
