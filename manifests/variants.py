"""Releases: several bundles of one model, each with the rules a board must meet to get it, and the one
resolver that picks a board's variant (the fleet calls it for every target; nothing else re-implements it).

    apiVersion: nanofleet/v1
    kind: Release
    metadata: {name: smollm2, version: 1}
    spec:
      variants:                    # tried in this order: the first whose rules the board meets wins
        - name: fp16-cuda
          bundle: {name: smollm2-135m-fp16, version: 1}
          rules: {hardware_class: [jetson-orin], execution_providers: [CUDAExecutionProvider]}
        - name: int8
          bundle: {name: smollm2-135m-int8, version: 3}
          rules: {min_ram: 4GiB, cpu_features: [asimddp]}
        - name: int4
          bundle: {name: smollm2-135m-int4, version: 3}
          rules: {min_ram: 512MiB}

A rule left out does not constrain; a variant without rules fits every board (the catch-all, listed last).
A rule on a capability the board has not reported does not fit it: the fleet never guesses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .bundle import format_validation_error, load_yaml_mapping
from .capabilities import BoardCapabilities, gib
from .deployment import API_VERSION, BundleSelector
from .errors import SchemaError
from .runtime_compat import parse_version, version_at_least

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
MAX_VARIANTS = 16
_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30}
_UNITS |= {"t": 2**40, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as '4GiB', '512MiB', '8G' (binary) or '4GB' (decimal)."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string such as '4GiB'")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d{1,20}(?:\.\d{1,20})?)\s*([a-zA-Z]*)\s*", str(value)[:64])
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {str(value)[:64]!r} (use bytes or e.g. '4GiB', '512MiB')")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class VariantRules(_Strict):
    """What a board must have for this variant. Lists of alternatives match any; cpu_features match all."""

    hardware_class: list[str] = Field(default_factory=list, description="any of these classes")
    arch: list[str] = Field(default_factory=list, description="any of these platform.machine() names")
    min_ram_bytes: int | None = Field(
        None, ge=0, le=2**50, alias="min_ram", description="at least this much RAM: bytes or e.g. '4GiB'"
    )
    cpu_features: list[str] = Field(
        default_factory=list, description="every one of these /proc/cpuinfo features, e.g. asimddp, i8mm"
    )
    execution_providers: list[str] = Field(
        default_factory=list, description="any of these onnxruntime execution providers, e.g. CUDAExecutionProvider"
    )
    min_onnxruntime: str | None = Field(None, description="at least this onnxruntime version, e.g. '1.22'")

    @field_validator("min_ram_bytes", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        return None if v is None else parse_size(v)

    @field_validator("cpu_features")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return sorted({f.strip().lower() for f in v if f.strip()})

    @field_validator("min_onnxruntime")
    @classmethod
    def _version(cls, v: str | None) -> str | None:
        if v is not None:
            parse_version(v)  # ValueError: not a version
        return v


class Variant(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="e.g. 'int8', 'int4', 'fp16-cuda'")
    bundle: BundleSelector
    rules: VariantRules = Field(default_factory=VariantRules)
    description: str = ""


class ReleaseMetadata(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1, le=2_147_483_647)
    description: str = ""


class ReleaseSpec(_Strict):
    variants: list[Variant] = Field(min_length=1, max_length=MAX_VARIANTS)

    @model_validator(mode="after")
    def _unique(self) -> ReleaseSpec:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique: {names}")
        refs = [(v.bundle.name, v.bundle.version) for v in self.variants]
        if len(set(refs)) != len(refs):
            raise ValueError("each variant must name a different bundle")
        return self


class Release(_Strict):
    apiVersion: Literal["nanofleet/v1"] = API_VERSION
    kind: Literal["Release"] = "Release"
    metadata: ReleaseMetadata
    spec: ReleaseSpec

    @property
    def ref(self) -> str:
        return f"{self.metadata.name}@{self.metadata.version}"

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.spec.variants if v.name == name), None)

    @classmethod
    def from_yaml(cls, text: str | bytes) -> Release:
        return cls.from_obj(load_yaml_mapping(text, "release"))

    @classmethod
    def from_obj(cls, data: object) -> Release:
        if not isinstance(data, dict):
            raise SchemaError("a release must be a YAML mapping")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SchemaError(format_validation_error(exc, "release")) from exc

    def to_obj(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_obj(), sort_keys=False)


# Resolution ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantChoice:
    """The variant a board gets, and the bundle that carries it."""

    release: str  # name@version
    variant: str
    bundle_name: str
    bundle_version: int


@dataclass(frozen=True)
class VariantRefusal:
    """No variant fits the board; ``reason`` is one line naming, per variant, what the board lacks."""

    release: str
    reason: str


def misfit(caps: BoardCapabilities | None, rules: VariantRules) -> str | None:
    """Why a board does not meet ``rules`` (the first unmet rule), or None when it does."""
    c = caps or BoardCapabilities()
    if rules.hardware_class and c.hardware_class not in rules.hardware_class:
        return f"needs hardware class {'/'.join(rules.hardware_class)}, board is {c.hardware_class or 'unclassed'}"
    if rules.arch and c.arch not in rules.arch:
        return f"needs arch {'/'.join(rules.arch)}, board is {c.arch or 'not reported'}"
    if rules.min_ram_bytes is not None:
        if c.ram_bytes is None:
            return f"needs {gib(rules.min_ram_bytes)} RAM, board did not report its RAM"
        if c.ram_bytes < rules.min_ram_bytes:
            return f"needs {gib(rules.min_ram_bytes)} RAM, board has {gib(c.ram_bytes)}"
    if rules.cpu_features:
        if c.cpu_features is None:
            return f"needs CPU features {'+'.join(rules.cpu_features)}, board did not report its CPU features"
        missing = [f for f in rules.cpu_features if f not in {x.lower() for x in c.cpu_features}]
        if missing:
            return f"needs CPU features {'+'.join(missing)}, board lacks them"
    if rules.execution_providers:
        if c.execution_providers is None:
            return "needs an execution provider, board did not report its onnxruntime providers"
        if not set(rules.execution_providers) & set(c.execution_providers):
            have = ",".join(c.execution_providers) or "none"
            return f"needs {' or '.join(rules.execution_providers)}, board has {have}"
    if rules.min_onnxruntime is not None:
        if c.onnxruntime_version is None:
            return f"needs onnxruntime >= {rules.min_onnxruntime}, board did not report its onnxruntime"
        try:
            ok = version_at_least(c.onnxruntime_version, rules.min_onnxruntime)
        except ValueError:
            ok = False
        if not ok:
            return f"needs onnxruntime >= {rules.min_onnxruntime}, board has {c.onnxruntime_version}"
    return None


def resolve_variant(caps: BoardCapabilities | None, release: Release) -> VariantChoice | VariantRefusal:
    """The first variant, in the release's order, whose rules ``caps`` meets; or a refusal saying, in one
    line, why each variant does not fit. Pure: the same inputs always give the same answer."""
    why: list[str] = []
    for v in release.spec.variants:
        reason = misfit(caps, v.rules)
        if reason is None:
            return VariantChoice(release.ref, v.name, v.bundle.name, v.bundle.version)
        why.append(f"{v.name} {reason}")
    return VariantRefusal(release.ref, f"no variant of {release.ref} fits: " + "; ".join(why))
