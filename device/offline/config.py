"""The agent config's ``offline:`` section (mounted into ``device.agent.config.AgentConfig``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class OfflineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    watch_dirs: list[Path] = Field(
        default_factory=list,
        description="folders where removable media appear (e.g. /media); update packages found up to two "
        "levels below are installed automatically",
    )
    poll_interval_s: float = Field(2.0, gt=0, description="how often the watched folders are scanned")
    export_telemetry_on_pickup: bool = Field(
        True,
        description="when a package for this board is picked up from a stick, also write the telemetry "
        "export onto that stick (after the install finished), so one visit carries both ways",
    )
    archive_exports: int = Field(
        10, ge=0, description="keep this many exported telemetry files in data_dir/offline/exported"
    )
