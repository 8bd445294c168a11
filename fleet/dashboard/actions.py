"""The dashboard's forms: a pasted or composed deployment manifest, parsed and validated with errors
that name each field. The pages then run the same commands as the REST API (``fleet.commands``, on the
service's worker); nothing here writes or decides anything about a rollout.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from manifests import DeploymentManifest

from .. import safe_yaml
from ..errors import InvalidManifestError
from ..rollout import ControlAction

ACTOR = "admin (dashboard)"
CONTROL_ACTIONS = tuple(a.value for a in ControlAction)


class ManifestInputError(InvalidManifestError):
    """A pasted or composed deployment manifest does not parse or validate."""


def parse_manifest_text(text: str) -> DeploymentManifest:
    """YAML or JSON text -> a validated ``DeploymentManifest``; errors name each field's path."""
    if not text.strip():
        raise ManifestInputError("the manifest is empty", [{"path": "<root>", "msg": "empty"}])
    try:
        data = safe_yaml.load(text)  # bounded: no aliases, limited depth and size
    except yaml.YAMLError as exc:
        raise ManifestInputError(
            f"not valid YAML or JSON: {exc}", [{"path": "<root>", "msg": str(exc)}]
        ) from exc
    return validate_manifest(data)


def validate_manifest(data: Any) -> DeploymentManifest:
    if not isinstance(data, dict):
        raise ManifestInputError(
            "a deployment manifest is a mapping", [{"path": "<root>", "msg": "not a mapping"}]
        )
    try:
        return DeploymentManifest.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"path": ".".join(str(p) for p in e["loc"]) or "<root>", "msg": str(e["msg"])}
            for e in exc.errors()
        ]
        raise ManifestInputError(
            "the manifest does not validate: " + "; ".join(f"{e['path']}: {e['msg']}" for e in errors), errors
        ) from exc


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]


def compose_manifest(form: dict[str, str]) -> dict[str, Any]:
    """The 'compose' form's fields -> a deployment manifest document (validated by the caller)."""
    bundle = form.get("bundle", "")
    name, _, version = bundle.rpartition("@")
    strategy_type = form.get("strategy") or "all-at-once"
    strategy: dict[str, Any] = {"type": strategy_type}
    if strategy_type == "canary":
        strategy["canary"] = {"devices": int(form.get("canary_devices") or 1)}
    elif strategy_type == "waves":
        sizes = [int(s) for s in _csv(form.get("wave_sizes", ""))] or [1]
        strategy["waves"] = {"sizes": sizes}
    if form.get("wait_seconds"):
        strategy["wait_seconds"] = float(form["wait_seconds"])
    if form.get("max_in_flight"):
        strategy["max_in_flight"] = int(form["max_in_flight"])
    selector: dict[str, Any] = {}
    tags = {}
    for pair in _csv(form.get("selector_tags", "")):
        k, _, v = pair.partition("=")
        tags[k.strip()] = v.strip()
    if tags:
        selector["tags"] = tags
    if form.get("selector_groups"):
        selector["groups"] = _csv(form["selector_groups"])
    if form.get("selector_devices"):
        selector["device_ids"] = _csv(form["selector_devices"])
    abort: dict[str, Any] = {}
    for key, cast in (
        ("failure_rate_pct", float),
        ("max_decode_drop_pct", float),
        ("convergence_timeout_s", float),
    ):
        if form.get(key):
            abort[key] = cast(form[key])
    if form.get("on_abort"):
        abort["on_abort"] = form["on_abort"]
    return {
        "apiVersion": "nanofleet/v1",
        "kind": "Deployment",
        "metadata": {"name": form.get("name", "").strip()},
        "spec": {
            "bundle": {"name": name, "version": int(version) if version.isdigit() else version},
            "selector": selector,
            "strategy": strategy,
            "abort": abort,
        },
    }


def manifest_yaml(manifest: DeploymentManifest | dict[str, Any]) -> str:
    """A manifest as the YAML someone would write: defaults left out, apiVersion and kind first."""
    m = manifest if isinstance(manifest, DeploymentManifest) else DeploymentManifest.model_validate(manifest)
    data = m.model_dump(mode="json", exclude_defaults=True)
    return yaml.safe_dump({"apiVersion": m.apiVersion, "kind": m.kind, **data}, sort_keys=False)
