"""Health of a device from its telemetry: its baseline on the previous model (taken when the rollout
starts it) and how it does on the new one, measured against the deployment's abort rules."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select, true
from sqlalchemy.orm import Session

from manifests.deployment import AbortRules

from ..db import Deployment, DeploymentTarget, Device, TelemetrySample, aware

BASELINE_SAMPLES = 5


def baseline(session: Session, device: Device) -> dict[str, Any] | None:
    """Mean decode speed and TTFT of the device's last samples on the model it runs now."""
    if device.current_version is None:
        return None
    rows = session.scalars(
        select(TelemetrySample)
        .where(
            TelemetrySample.device_id == device.id,
            TelemetrySample.model_version == device.current_version,
            TelemetrySample.model_name == device.current_name,
        )
        .order_by(TelemetrySample.ts.desc())
        .limit(BASELINE_SAMPLES)
    ).all()
    decode = [r.decode_tok_s for r in rows if r.decode_tok_s]
    ttft = [r.ttft_p95_ms for r in rows if r.ttft_p95_ms]
    if not decode and not ttft:
        return None
    return {
        "decode_tok_s": sum(decode) / len(decode) if decode else None,
        "ttft_p95_ms": sum(ttft) / len(ttft) if ttft else None,
        "samples": len(rows),
    }


def baselines(session: Session, devices: list[Device]) -> dict[str, dict[str, Any] | None]:
    """``baseline`` of many devices: one LATERAL query on PostgreSQL (the newest samples of each device
    through its (device_id, ts) index), one query per device elsewhere (SQLite: a single small fleet)."""
    if session.get_bind().dialect.name != "postgresql" or len(devices) < 2:
        return {d.id: baseline(session, d) for d in devices}
    d = (
        select(Device.id, Device.current_name, Device.current_version)
        .where(Device.id.in_([x.id for x in devices]), Device.current_version.is_not(None))
        .subquery("d")
    )
    s = (
        select(TelemetrySample.decode_tok_s, TelemetrySample.ttft_p95_ms)
        .where(
            TelemetrySample.device_id == d.c.id,
            TelemetrySample.model_name == d.c.current_name,
            TelemetrySample.model_version == d.c.current_version,
        )
        .order_by(TelemetrySample.ts.desc())
        .limit(BASELINE_SAMPLES)
        .lateral("s")
    )
    rows: dict[str, list[tuple[float | None, float | None]]] = {}
    for device_id, decode, ttft in session.execute(select(d.c.id, s.c.decode_tok_s, s.c.ttft_p95_ms).join(s, true())):
        rows.setdefault(device_id, []).append((decode, ttft))
    return {x.id: _mean_of(rows.get(x.id, [])) for x in devices}


def _mean_of(samples: list[tuple[float | None, float | None]]) -> dict[str, Any] | None:
    decode = [a for a, _ in samples if a]
    ttft = [b for _, b in samples if b]
    if not decode and not ttft:
        return None
    return {
        "decode_tok_s": sum(decode) / len(decode) if decode else None,
        "ttft_p95_ms": sum(ttft) / len(ttft) if ttft else None,
        "samples": len(samples),
    }


def has_health_rules(rules: AbortRules) -> bool:
    """Whether the deployment judges devices on their telemetry (else only results and timeouts count)."""
    return bool(rules.max_decode_drop_pct or rules.max_error_rate is not None or rules.ttft_p95_budget_ms)


def health_problem(
    session: Session,
    dep: Deployment,
    t: DeploymentTarget,
    rules: AbortRules,
    *,
    adapter_base: tuple[str, int] | None = None,
) -> str | None:
    """What is wrong with a succeeded device on the new model (None: nothing, or no evidence yet).
    Records what was measured on ``t.health`` (left None while the device has sent no sample on it).

    ``adapter_base``: the deployment rolls out an adapter bound to this base model. The device's model
    stays as it is, so its samples name the base, and only those after the fleet saw the adapter
    committed show the adapter's effect (the base alone ran before)."""
    if not has_health_rules(rules):
        return None
    if adapter_base is not None:
        (name, version), slack = adapter_base, dt.timedelta(0)
    else:
        # a release deployment: the variant this device was sent (variants.py), else the deployment's bundle
        name, version = t.bundle_name or dep.bundle_name, t.bundle_version or dep.bundle_version
        # a device's sample can be stamped just before the fleet collected its commit (its clock, the report lag)
        slack = dt.timedelta(seconds=5)
    q = select(TelemetrySample).where(
        TelemetrySample.device_id == t.device_id,
        TelemetrySample.model_name == name,
        TelemetrySample.model_version == version,
    )
    if t.finished_at is not None:
        q = q.where(TelemetrySample.ts >= aware(t.finished_at) - slack)  # type: ignore[operator]
    latest = session.scalars(q.order_by(TelemetrySample.ts.desc()).limit(BASELINE_SAMPLES)).all()
    if not latest:
        return None
    newest = latest[0]
    health: dict[str, Any] = {"samples": len(latest)}
    problem = None
    decode = [r.decode_tok_s for r in latest if r.decode_tok_s]
    if rules.max_decode_drop_pct and decode and t.baseline and t.baseline.get("decode_tok_s"):
        base = t.baseline["decode_tok_s"]
        now_tps = sum(decode) / len(decode)
        drop = 100.0 * (base - now_tps) / base
        health["decode_drop_pct"] = round(drop, 2)
        if drop > rules.max_decode_drop_pct:
            problem = (
                f"decode {now_tps:.1f} tok/s is {drop:.0f}% below {base:.1f} tok/s on its previous "
                f"model (limit {rules.max_decode_drop_pct:g}%)"
            )
    if problem is None and rules.max_error_rate is not None:
        rate = error_rate(session, t, list(reversed(latest)))
        if rate is not None:
            health["error_rate"] = round(rate, 4)
            if rate > rules.max_error_rate:
                problem = f"error rate {rate:.2%} on the new model, over {rules.max_error_rate:.2%}"
    if problem is None and rules.ttft_p95_budget_ms and newest.ttft_p95_ms is not None:
        health["ttft_p95_ms"] = newest.ttft_p95_ms
        if newest.ttft_p95_ms > rules.ttft_p95_budget_ms:
            problem = f"TTFT p95 {newest.ttft_p95_ms:.0f} ms over the {rules.ttft_p95_budget_ms:g} ms budget"
    t.health = health
    return problem


def error_rate(session: Session, t: DeploymentTarget, new: list[TelemetrySample]) -> float | None:
    """Errors per request on the new model. Agents send counters cumulative since they started; a
    counter that went down (agent restart, or a per-interval sender) falls back to summing samples."""
    anchor = None
    if t.finished_at is not None:
        anchor = session.scalars(
            select(TelemetrySample)
            .where(TelemetrySample.device_id == t.device_id, TelemetrySample.ts < new[0].ts)
            .order_by(TelemetrySample.ts.desc())
            .limit(1)
        ).first()
    series = ([anchor] if anchor is not None else []) + new
    cumulative = all(
        b.requests >= a.requests and b.errors >= a.errors for a, b in zip(series, series[1:], strict=False)
    )
    if cumulative and anchor is not None:
        requests, errors = new[-1].requests - anchor.requests, new[-1].errors - anchor.errors
    elif cumulative:
        requests, errors = new[-1].requests, new[-1].errors
    else:
        requests, errors = sum(x.requests for x in new), sum(x.errors for x in new)
    return errors / requests if requests > 0 else None
