"""LoRA adapters in the fleet: registered, deployed and rolled back like models.

An adapter bundle (manifests/adapter.py) is uploaded, stored and served exactly as a model bundle is (its own
signed manifest, content-addressed files, the same artifacts route); its registry row says it is one in its
summary (``kind: adapter`` and the base it is bound to). A deployment whose ``spec.bundle`` names an adapter
rolls it out with the same canaries, waves, abort rules and signed rollbacks: the desired state it sends
leaves the device's model alone and names the adapter (``DesiredState.adapter``, with the base's manifest
sha256 for the agent's check before download), and the target's "previous" is the adapter version the device
reported before (``ReportedState.adapters``), so a rollback returns it to that version; a device that held
none gets version 0 (``UNLOADED`` in fleet/rollout/desired.py), which the agent takes as "unload it": the base
serves alone again.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from manifests.adapter import AdapterManifest, AdapterRef

from .db import BundleRecord

ADAPTER_KIND = "adapter"


def summarize_adapter(m: AdapterManifest) -> dict[str, Any]:
    q = m.quality
    return {
        "kind": ADAPTER_KIND,
        "base": {"name": m.base.name, "version": m.base.version, "manifest_sha256": m.base.manifest_sha256},
        "lora": {"rank": m.lora.rank, "alpha": m.lora.alpha, "sites": list(m.lora.sites),
                 "target_modules": list(m.lora.target_modules), "parameters": m.lora.parameters},  # fmt: skip
        "quality": None
        if q is None
        else {
            "passed": q.passed,
            "ppl_base": q.effect.ppl_base,
            "ppl_adapter": q.effect.ppl_adapter,
            "kl_mean_vs_reference": q.vs_reference.kl_mean,
        },
        "expires_at": m.expires_at.isoformat() if m.expires_at else None,
    }


def is_adapter(summary: dict[str, Any] | None) -> bool:
    """Whether a registry row's summary is an adapter's."""
    return bool(summary) and summary.get("kind") == ADAPTER_KIND  # type: ignore[union-attr]


def base_model(summary: dict[str, Any] | None) -> tuple[str, int] | None:
    """The base model (name, version) an adapter's registry row is bound to (None: not an adapter, or a
    manifest that names only the base's sha256)."""
    if not is_adapter(summary):
        return None
    base = summary["base"]  # type: ignore[index]
    if base.get("name") is None or base.get("version") is None:
        return None
    return str(base["name"]), int(base["version"])


def adapter_base_of(session: Session, name: str, version: int) -> tuple[str, int] | None:
    """The base model (name, version) of bundle ``name@version`` when it is an adapter (None: a model, or
    not in the registry). Health rules and the dashboard's before/after read the base's telemetry for it."""
    record = session.scalar(select(BundleRecord).where(BundleRecord.name == name, BundleRecord.version == version))
    return base_model(record.summary if record else None)


def adapter_ref(summary: dict[str, Any], name: str, version: int, manifest_sha256: str, base_url: str) -> AdapterRef:
    """The desired state's ``adapter`` for a registry row (``summary`` from ``summarize_adapter``)."""
    base = summary["base"]
    return AdapterRef(
        name=name,
        version=version,
        manifest_sha256=manifest_sha256,
        base_manifest_sha256=base["manifest_sha256"],
        base_name=base.get("name"),
        base_version=base.get("version"),
        base_url=base_url,
    )


def reported_adapters(reported: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The adapters a device reported (``ReportedState.adapters``), as stored on its row."""
    raw = (reported or {}).get("adapters") or []
    return [a for a in raw if isinstance(a, dict) and "name" in a and "version" in a]


def reported_version(reported: dict[str, Any] | None, name: str) -> int | None:
    """The version of adapter ``name`` the device holds (None: it has none of that name)."""
    return next((int(a["version"]) for a in reported_adapters(reported) if a["name"] == name), None)


def runs_adapter(reported: dict[str, Any] | None, name: str, version: int) -> bool:
    return any(a["name"] == name and int(a["version"]) == version and a.get("resident", True)
               for a in reported_adapters(reported))  # fmt: skip


def adapters_of(records: list[Any], base_manifest_sha256: str) -> list[Any]:
    """The registry rows (``BundleRecord``) of the adapters built for the base with this manifest sha256."""
    sha = base_manifest_sha256
    return [r for r in records if is_adapter(r.summary) and r.summary["base"]["manifest_sha256"] == sha]
