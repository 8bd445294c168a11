"""The deployment manifest: a declarative YAML document that ``nanofleet fleet apply`` makes true.

    apiVersion: nanofleet/v1
    kind: Deployment
    metadata: {name: smollm2-v2}
    spec:
      bundle: {name: smollm2-135m-instruct, version: 2}   # or release: {name: smollm2, version: 1}
      selector: {tags: {site: lab}, groups: [pilot], hardware_class: [pi5]}
      strategy: {type: canary, canary: {devices: 1}, wait_seconds: 30, max_in_flight: 10}
      abort: {failure_rate_pct: 20, min_devices: 2, on_abort: rollback}
"""

from __future__ import annotations

from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .bundle import format_validation_error, load_yaml_mapping
from .errors import SchemaError

API_VERSION = "nanofleet/v1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Metadata(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{0,62}$")
    labels: dict[str, str] = Field(default_factory=dict)
    description: str = ""


class BundleSelector(_Strict):
    name: str
    version: int = Field(ge=1)


class ReleaseSelector(_Strict):
    """A release (manifests/variants.py): each device gets the variant its reported capabilities fit."""

    name: str
    version: int = Field(ge=1)


class Selector(_Strict):
    """A device matches when it has every tag, is in any listed group and any listed hardware class."""

    tags: dict[str, str] = Field(default_factory=dict)
    groups: list[str] = Field(default_factory=list)
    hardware_class: list[str] = Field(default_factory=list)
    device_ids: list[str] = Field(default_factory=list)


class Canary(_Strict):
    devices: int | None = Field(None, ge=1)
    percent: float | None = Field(None, gt=0, le=100)

    @model_validator(mode="after")
    def _one(self) -> Canary:
        if (self.devices is None) == (self.percent is None):
            raise ValueError("give exactly one of canary.devices or canary.percent")
        return self


class Waves(_Strict):
    sizes: list[int] | None = None
    percent_steps: list[float] | None = None

    @model_validator(mode="after")
    def _one(self) -> Waves:
        if (self.sizes is None) == (self.percent_steps is None):
            raise ValueError("give exactly one of waves.sizes or waves.percent_steps")
        if self.sizes is not None and (not self.sizes or any(s < 1 for s in self.sizes)):
            raise ValueError("waves.sizes must be positive integers")
        if self.percent_steps is not None:
            steps = self.percent_steps
            if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(steps):
                raise ValueError("waves.percent_steps must be increasing percentages in (0, 100]")
        return self


class Strategy(_Strict):
    type: Literal["all-at-once", "canary", "waves"] = "all-at-once"
    canary: Canary | None = None
    waves: Waves | None = None
    wait_seconds: float = Field(0, ge=0, description="pause after each wave converges")
    max_in_flight: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _matches_type(self) -> Strategy:
        if self.type == "canary" and self.canary is None:
            raise ValueError("strategy.type canary needs strategy.canary")
        if self.type == "waves" and self.waves is None:
            raise ValueError("strategy.type waves needs strategy.waves")
        return self


class AbortRules(_Strict):
    failure_rate_pct: float | None = Field(None, gt=0, le=100)
    min_devices: int = Field(1, ge=1)
    max_decode_drop_pct: float | None = Field(None, gt=0, le=100)
    max_error_rate: float | None = Field(None, ge=0, le=1)
    ttft_p95_budget_ms: float | None = Field(None, gt=0)
    convergence_timeout_s: float | None = Field(None, gt=0)
    on_abort: Literal["pause", "rollback"] = "pause"


class DeploymentSpec(_Strict):
    bundle: BundleSelector | None = None
    release: ReleaseSelector | None = None
    selector: Selector = Field(default_factory=Selector)
    strategy: Strategy = Field(default_factory=Strategy)
    abort: AbortRules = Field(default_factory=AbortRules)
    rollback: bool = Field(False, description="a deliberate, signed rollback to an older version")

    @model_validator(mode="after")
    def _bundle_or_release(self) -> DeploymentSpec:
        if (self.bundle is None) == (self.release is None):
            raise ValueError("give exactly one of spec.bundle or spec.release")
        return self


class DeploymentManifest(_Strict):
    apiVersion: Literal["nanofleet/v1"] = API_VERSION
    kind: Literal["Deployment"] = "Deployment"
    metadata: Metadata
    spec: DeploymentSpec

    @classmethod
    def from_yaml(cls, text: str | bytes) -> DeploymentManifest:
        return cls.from_obj(load_yaml_mapping(text, "deployment manifest"))

    @classmethod
    def from_obj(cls, data: object) -> DeploymentManifest:
        if not isinstance(data, dict):
            raise SchemaError("deployment manifest must be a YAML mapping")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SchemaError(format_validation_error(exc, "deployment manifest")) from exc

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=False), sort_keys=False)
