"""The persisted update record: written atomically (temp file, fsync, os.replace) on every transition."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from manifests import atomic_write_bytes
from manifests.mqtt import BundleRef, SlotInfo

from .errors import StateFileError
from .states import State

SlotName = Literal["a", "b"]
SLOTS: tuple[SlotName, SlotName] = ("a", "b")
MAX_SEEN = 64


def other_slot(slot: SlotName | None) -> SlotName:
    return "b" if slot == "a" else "a"


class UpdateRecord(BaseModel):
    schema_version: int = 1
    state: State = State.IDLE
    active_slot: SlotName | None = None
    # What each slot holds once installed and verified; None while empty or being written.
    slots: dict[str, SlotInfo | None] = Field(default_factory=lambda: {"a": None, "b": None})
    highest_committed: dict[str, int] = Field(default_factory=dict, description="per bundle name")
    deployment_id: str | None = None
    target: BundleRef | None = None
    target_slot: SlotName | None = None
    rollback_authorized: bool = False
    seen_deployments: list[str] = Field(default_factory=list)
    last_result: Literal["committed", "failed", "rolled_back", "refused"] | None = None
    error: str | None = None
    error_reason: str | None = None
    error_state: str | None = None
    updated_at: dt.datetime | None = None

    @property
    def committed(self) -> SlotInfo | None:
        return self.slots.get(self.active_slot) if self.active_slot else None

    def mark_seen(self, deployment_id: str) -> None:
        if deployment_id not in self.seen_deployments:
            self.seen_deployments = [*self.seen_deployments, deployment_id][-MAX_SEEN:]


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> UpdateRecord:
        if not self.path.exists():
            return UpdateRecord()
        try:
            return UpdateRecord.model_validate_json(self.path.read_bytes())
        except (ValidationError, OSError, ValueError) as exc:
            raise StateFileError(f"cannot read the update state {self.path}: {exc}") from exc

    def save(self, record: UpdateRecord) -> None:
        record.updated_at = dt.datetime.now(dt.timezone.utc)
        data = json.dumps(record.model_dump(mode="json"), indent=1).encode()
        atomic_write_bytes(self.path, data)
