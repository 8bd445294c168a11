"""Telemetry retention: raw samples older than the raw window are folded into per-bucket rollups
(count, mean decode tok/s, max TTFT p95, summed requests/errors), and old rollups are dropped."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from .config import TelemetryConfig
from .db import TelemetryRollup, TelemetrySample, aware

BATCH = 5000


def _bucket(ts: dt.datetime, size_s: int) -> dt.datetime:
    epoch = int(aware(ts).timestamp())  # type: ignore[union-attr]
    return dt.datetime.fromtimestamp(epoch - epoch % size_s, tz=dt.timezone.utc)


def compact(session: Session, cfg: TelemetryConfig, now: dt.datetime) -> int:
    """Downsample and drop old raw samples; returns how many raw samples were folded."""
    cutoff = now - dt.timedelta(seconds=cfg.raw_retention_s)
    folded = 0
    while True:
        rows = session.scalars(
            select(TelemetrySample)
            .where(TelemetrySample.ts < cutoff)
            .order_by(TelemetrySample.id)
            .limit(BATCH)
        ).all()
        if not rows:
            break
        groups: dict[tuple[str, dt.datetime, int], list[TelemetrySample]] = {}
        for r in rows:
            groups.setdefault(
                (r.device_id, _bucket(r.ts, cfg.rollup_bucket_s), r.model_version or 0), []
            ).append(r)
        for (device_id, bucket, version), samples in groups.items():
            roll = session.get(TelemetryRollup, (device_id, bucket, version))
            decode = [s.decode_tok_s for s in samples if s.decode_tok_s is not None]
            ttft = [s.ttft_p95_ms for s in samples if s.ttft_p95_ms is not None]
            add: dict[str, Any] = {
                "samples": len(samples),
                "decode_sum": sum(decode),
                "decode_n": len(decode),
                "ttft_max": max(ttft) if ttft else None,
                "requests": sum(s.requests for s in samples),
                "errors": sum(s.errors for s in samples),
            }
            if roll is None:
                roll = TelemetryRollup(
                    device_id=device_id,
                    bucket_start=bucket,
                    model_version=version,
                    model_name=samples[0].model_name,
                    samples=0,
                    requests=0,
                    errors=0,
                )
                session.add(roll)
            old_n = roll.samples if roll.decode_tok_s_avg is not None else 0
            old_sum = (roll.decode_tok_s_avg or 0.0) * old_n
            n = old_n + add["decode_n"]
            roll.decode_tok_s_avg = (old_sum + add["decode_sum"]) / n if n else roll.decode_tok_s_avg
            if add["ttft_max"] is not None:
                roll.ttft_p95_ms_max = max(roll.ttft_p95_ms_max or 0.0, add["ttft_max"])
            roll.samples += add["samples"]
            roll.requests += add["requests"]
            roll.errors += add["errors"]
        session.execute(
            delete(TelemetrySample)
            .where(TelemetrySample.id.in_([r.id for r in rows]))
            .execution_options(synchronize_session=False)
        )
        for r in rows:
            session.expunge(r)
        session.flush()
        folded += len(rows)
    session.execute(
        delete(TelemetryRollup)
        .where(TelemetryRollup.bucket_start < now - dt.timedelta(seconds=cfg.rollup_retention_s))
        .execution_options(synchronize_session=False)
    )
    session.expire_all()
    return folded
