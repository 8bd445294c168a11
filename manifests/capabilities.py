"""What a board can run, as it reports it: at enrolment, in its retained ``reported`` state and in telemetry.

The fleet picks each board's variant of a release from this (``manifests.variants.resolve_variant``). Every
field is optional: ``None`` means "not reported" (an older agent, a probe that failed), which is not the same
as "none" (an empty list). Readers ignore fields they do not know, so a newer board's report still parses;
the major version is in ``schema``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .bundle import format_validation_error
from .errors import SchemaError

CAPABILITIES_SCHEMA = "nanofleet.capabilities/1"
CPU_PROVIDER = "CPUExecutionProvider"


class BoardCapabilities(BaseModel):
    """A board's hardware and runtime, as its agent measured them (``device/agent/capabilities.py``)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    schema_: Literal["nanofleet.capabilities/1"] = Field(CAPABILITIES_SCHEMA, alias="schema")
    arch: str | None = Field(None, max_length=32, description="platform.machine(): 'aarch64', 'x86_64'")
    hardware_class: str | None = Field(None, max_length=64, description="the agent's configured class, e.g. 'pi5'")
    ram_bytes: int | None = Field(None, ge=0, le=2**50, description="MemTotal from /proc/meminfo")
    cpu_model: str | None = Field(None, max_length=200, description="/proc/cpuinfo 'model name' or 'Model'")
    cpu_features: list[str] | None = Field(
        None,
        max_length=512,
        description="/proc/cpuinfo 'Features' (arm) or 'flags' (x86), lower case, sorted; e.g. asimddp, i8mm",
    )
    onnxruntime_version: str | None = Field(None, max_length=64, description="onnxruntime.__version__")
    execution_providers: list[str] | None = Field(
        None, max_length=32, description="onnxruntime.get_available_providers(), in its order of preference"
    )

    def to_json(self) -> dict[str, object]:
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_obj(cls, data: object) -> BoardCapabilities:
        """Parse a stored or received document; a ``SchemaError`` names what is wrong."""
        if not isinstance(data, dict):
            raise SchemaError("board capabilities must be a JSON object")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SchemaError(format_validation_error(exc, "board capabilities")) from exc


def gib(n: int) -> str:
    """Bytes as GiB with one decimal, for one-line reasons ('7.8 GiB')."""
    return f"{n / 2**30:.1f} GiB"
