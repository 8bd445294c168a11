"""The read side of the dashboard: plain data for the templates, straight from the fleet's database.

Only reads here. Anything that changes state goes through ``actions`` (the fleet service's worker).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Text, and_, case, cast, false, func, or_, select, true, tuple_
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from manifests import BundleManifest, ManifestError, TrustStore, VerificationError, verify_manifest_bytes
from manifests.adapter import AdapterManifest, is_adapter_manifest, verify_adapter_manifest_bytes

from ..adapters import adapter_base_of, adapters_of
from ..db import (
    AuditEntry,
    BundleRecord,
    Deployment,
    DeploymentTarget,
    Device,
    DeviceEvent,
    TelemetryRollup,
    TelemetrySample,
    aware,
)
from ..rollout.states import SETTLED, TargetState
from .charts import Series

ONLINE, OFFLINE = "online", "offline"
OVERVIEW_ROWS = 100  # the overview table's rows; the paginated devices list has the rest


# --- devices ----------------------------------------------------------------------------------------


@dataclass
class DeviceFilters:
    q: str = ""
    tag: str = ""  # "key=value" or just "key"
    group: str = ""
    hardware_class: str = ""
    model: str = ""
    status: str = ""  # online | offline

    def active(self) -> bool:
        return any(vars(self).values())

    def matches(self, d: Device) -> bool:
        if self.q and self.q.lower() not in d.id.lower():
            return False
        if self.tag:
            key, _, value = self.tag.partition("=")
            tags = d.tags or {}
            if key.strip() not in tags:
                return False
            if value and str(tags[key.strip()]) != value.strip():
                return False
        if self.group and self.group not in (d.groups or []):
            return False
        if self.hardware_class and (d.hardware_class or "") != self.hardware_class:
            return False
        if self.model and model_of(d) != self.model:
            return False
        return not (self.status and (ONLINE if d.online else OFFLINE) != self.status)


def model_of(d: Device) -> str:
    return f"{d.current_name}@{d.current_version}" if d.current_name else "none"


def update_state(d: Device) -> str:
    return str((d.reported or {}).get("state") or "unknown")


def in_sync(d: Device) -> bool | None:
    """Does the device run what it was told to? None when it was never told anything."""
    b = (d.desired or {}).get("bundle")
    if not b:
        return None
    return d.current_name == b.get("name") and d.current_version == b.get("version")


@dataclass
class Overview:
    devices: list[Device]  # the first ``limit`` matching devices
    matching: int
    total: int
    by_status: Counter[str]
    by_update_state: Counter[str]
    by_hardware: Counter[str]
    by_model: Counter[str]
    tags: list[str]
    groups: list[str]
    hardware_classes: list[str]
    models: list[str]


def _filter_clause(f: DeviceFilters) -> ColumnElement[bool]:
    """``DeviceFilters`` as one SQL condition, so the database counts and pages the matching devices."""
    conds: list[ColumnElement[bool]] = []
    if f.q:
        conds.append(func.lower(Device.id).contains(f.q.lower(), autoescape=True))
    if f.tag:
        key, _, value = f.tag.partition("=")
        element = Device.tags[key.strip()].as_string()
        conds.append(element == value.strip() if value else element.is_not(None))
    if f.group:
        # groups is a JSON list of strings, stored as json.dumps writes it: the quoted element matches
        # exactly that element (portable to SQLite and PostgreSQL, whose JSON keeps the text as sent).
        conds.append(cast(Device.groups, Text).contains(json.dumps(f.group), autoescape=True))
    if f.hardware_class:
        conds.append(func.coalesce(Device.hardware_class, "") == f.hardware_class)
    if f.model:
        conds.append(_model_is(f.model))
    if f.status:
        conds.append(Device.online.is_(True) if f.status == ONLINE else
                     Device.online.is_not(True) if f.status == OFFLINE else false())  # fmt: skip
    return and_(true(), *conds)


def _model_is(model: str) -> ColumnElement[bool]:
    if model == "none":
        return Device.current_name.is_(None)
    name, _, version = model.rpartition("@")
    if not name or not version.isdigit():
        return false()
    return and_(Device.current_name == name, Device.current_version == int(version))


def overview(session: Session, filters: DeviceFilters, limit: int = OVERVIEW_ROWS) -> Overview:
    """Facet counts over every matching device; the table lists the first ``limit`` of them (by id).

    The database does the counting: one GROUP BY over (matches the filters, online, hardware class,
    model, update state) gives the totals, every facet and the filter choices, a few hundred rows at
    most whatever the fleet's size; tags and groups come from their distinct documents. Only the devices
    the table shows are loaded whole (a 10,000-device overview used to read and count every row here)."""
    where = _filter_clause(filters)
    hit = case((where, 1), else_=0).label("hit")
    state = Device.reported["state"].as_string().label("update_state")
    facets = (hit, Device.online, Device.hardware_class, Device.current_name, Device.current_version, state)
    rows, tag_docs, group_docs = (
        _facets_one_scan(session, facets)
        if session.get_bind().dialect.name == "postgresql"
        else _facets(session, facets)
    )
    total = matching = 0
    by_status: Counter[str] = Counter()
    by_update_state: Counter[str] = Counter()
    by_hardware: Counter[str] = Counter()
    by_model: Counter[str] = Counter()
    hardware: set[str] = set()
    models: set[str] = set()
    for is_hit, online, hw, name, version, upd, n in rows:
        model = f"{name}@{version}" if name else "none"
        total += n
        models.add(model)
        if hw:
            hardware.add(hw)
        if not is_hit:
            continue
        matching += n
        by_status[ONLINE if online else OFFLINE] += n
        by_update_state[upd or "unknown"] += n
        by_hardware[hw or "unknown"] += n
        by_model[model] += n
    devices = list(session.scalars(select(Device).where(where).order_by(Device.id).limit(limit))) if matching else []
    return Overview(
        devices=devices,
        matching=matching,
        total=total,
        by_status=by_status,
        by_update_state=by_update_state,
        by_hardware=by_hardware,
        by_model=by_model,
        tags=sorted({f"{k}={v}" for doc in tag_docs for k, v in (doc or {}).items()}),
        groups=sorted({g for doc in group_docs for g in (doc or [])}),
        hardware_classes=sorted(hardware),
        models=sorted(models),
    )


Facets = tuple[list[Any], list[Any], list[Any]]  # (facet rows with their count, tag documents, group documents)


def _facets(session: Session, facets: tuple[Any, ...]) -> Facets:
    # Grouped over a subquery: PostgreSQL would not see the CASE's bound filter values in the select
    # list and in GROUP BY as one expression.
    per_device = select(*facets).subquery()
    cols = tuple(per_device.c)
    rows = list(session.execute(select(*cols, func.count()).group_by(*cols)).all())
    return rows, _distinct_json(session, Device.tags), _distinct_json(session, Device.groups)


def _facets_one_scan(session: Session, facets: tuple[Any, ...]) -> Facets:
    """PostgreSQL: the facets and the distinct tag and group documents in one pass over the devices
    (``GROUPING SETS``): the table is read once, not three times (each a sequential scan of every row)."""
    per_device = select(
        *facets, cast(Device.tags, Text).label("tags_text"), cast(Device.groups, Text).label("groups_text")
    ).subquery()
    *cols, tags_text, groups_text = per_device.c
    which = func.grouping(tags_text, groups_text)  # 3: a facet row, 1: a tag document, 2: a group document
    sets = func.grouping_sets(tuple_(*cols), tuple_(tags_text), tuple_(groups_text))
    rows: list[Any] = []
    tag_docs: list[Any] = []
    group_docs: list[Any] = []
    for *facet, tags, groups, n, kind in session.execute(
        select(*cols, tags_text, groups_text, func.count(), which).group_by(sets)
    ):
        if kind == 3:
            rows.append((*facet, n))
        elif kind == 1 and tags:
            tag_docs.append(json.loads(tags))
        elif kind == 2 and groups:
            group_docs.append(json.loads(groups))
    return rows, tag_docs, group_docs


def _distinct_json(session: Session, column: Any) -> list[Any]:
    """The distinct documents of a JSON column (a fleet has a handful of tag sets, not one per device)."""
    return [json.loads(text) for text in session.scalars(select(cast(column, Text)).distinct()) if text]


@dataclass
class Metric:
    key: str
    title: str
    unit: str
    series: list[Series]


# payload key -> (title, unit, scale)
TELEMETRY_METRICS: tuple[tuple[str, str, str, float], ...] = (
    ("decode_tok_s", "Decode speed", "tok/s", 1.0),
    ("ttft_p95_ms", "Time to first token, p95", "ms", 1.0),
    ("rss_bytes", "Resident memory (RSS)", "B", 1.0),
    ("cpu_temp_c", "CPU temperature", "°C", 1.0),
    ("disk_free_bytes", "Free disk", "B", 1.0),
)


@dataclass
class DeviceDetail:
    device: Device
    metrics: list[Metric]
    samples: int
    state_history: list[dict[str, Any]]
    targets: list[dict[str, Any]]
    events: list[DeviceEvent]
    reported_vs_desired: list[tuple[str, Any, Any, bool]]


def telemetry_metrics(session: Session, device_id: str, limit: int = 300) -> tuple[list[Metric], int]:
    """Each chart's series, one per model version, oldest first: raw samples, else downsampled rollups."""
    raw = list(
        reversed(
            session.scalars(
                select(TelemetrySample)
                .where(TelemetrySample.device_id == device_id)
                .order_by(TelemetrySample.ts.desc())
                .limit(limit)
            ).all()
        )
    )
    rows: list[tuple[dt.datetime, str, dict[str, Any]]] = []
    for r in raw:
        p = dict(r.payload or {})
        p.setdefault("decode_tok_s", r.decode_tok_s)
        p.setdefault("ttft_p95_ms", r.ttft_p95_ms)
        version = f"{r.model_name}@{r.model_version}" if r.model_name else "no model"
        rows.append((aware(r.ts), version, p))  # type: ignore[arg-type]
    if not rows:
        for roll in reversed(
            session.scalars(
                select(TelemetryRollup)
                .where(TelemetryRollup.device_id == device_id)
                .order_by(TelemetryRollup.bucket_start.desc())
                .limit(limit)
            ).all()
        ):
            version = f"{roll.model_name}@{roll.model_version}" if roll.model_name else "no model"
            rows.append(
                (
                    aware(roll.bucket_start),  # type: ignore[arg-type]
                    version,
                    {"decode_tok_s": roll.decode_tok_s_avg, "ttft_p95_ms": roll.ttft_p95_ms_max},
                )
            )
    metrics = []
    for key, title, unit, scale in TELEMETRY_METRICS:
        by_version: dict[str, Series] = {}
        for ts, version, p in rows:
            v = p.get(key)
            if v is None:
                continue
            by_version.setdefault(version, Series(version)).points.append((ts, float(v) * scale))
        metrics.append(Metric(key, title, unit, list(by_version.values())))
    return metrics, len(rows)


def device_detail(session: Session, device_id: str) -> DeviceDetail | None:
    d = session.get(Device, device_id)
    if d is None:
        return None
    metrics, n = telemetry_metrics(session, device_id)
    events = session.scalars(
        select(DeviceEvent).where(DeviceEvent.device_id == device_id).order_by(DeviceEvent.seq.desc()).limit(100)
    ).all()
    history = []
    for e in reversed(events):
        p = e.payload or {}
        if e.kind in ("transition", "result", "refused", "error"):
            history.append(
                {
                    "ts": aware(e.ts),
                    "kind": e.kind,
                    "from": p.get("from_state"),
                    "to": p.get("to_state"),
                    "deployment": e.deployment_id,
                    "message": p.get("message") or "",
                }
            )
    target_rows = session.execute(
        select(DeploymentTarget, Deployment)
        .join(Deployment, Deployment.id == DeploymentTarget.deployment_id)
        .where(DeploymentTarget.device_id == device_id)
        .order_by(DeploymentTarget.assigned_at.desc())
    ).all()
    targets = [
        {
            "deployment": dep.name,
            "bundle": f"{dep.bundle_name}@{dep.bundle_version}",
            "state": t.state,
            "previous": f"{t.previous_name}@{t.previous_version}" if t.previous_name else None,
            "assigned_at": aware(t.assigned_at),
            "finished_at": aware(t.finished_at),
            "error": t.error,
        }
        for t, dep in target_rows
    ]
    rep = d.reported or {}
    des = d.desired or {}
    committed = rep.get("committed") or {}
    rep_bundle = f"{committed.get('name')}@{committed.get('version')}" if committed.get("name") else None
    des_b = des.get("bundle") or {}
    des_bundle = f"{des_b.get('name')}@{des_b.get('version')}" if des_b.get("name") else None
    comparison = [
        ("Model", rep_bundle, des_bundle, des_bundle is None or rep_bundle == des_bundle),
        (
            "Command (deployment id)",
            rep.get("deployment_id"),
            des.get("deployment_id"),
            not des.get("deployment_id") or rep.get("deployment_id") == des.get("deployment_id"),
        ),
        ("Update state", rep.get("state"), "committed" if des_bundle else None, True),
        ("Last result", rep.get("last_result"), "committed" if des_bundle else None, True),
        ("Signed rollback attached", None, "yes" if des.get("rollback") else "no", True),
    ]
    return DeviceDetail(d, metrics, n, history, targets, list(events), comparison)


# --- models -----------------------------------------------------------------------------------------


@dataclass
class ModelView:
    record: BundleRecord
    manifest: BundleManifest | None
    verified: bool
    verify_error: str | None
    users: list[str] = field(default_factory=list)
    adapter: AdapterManifest | None = None  # this record is an adapter bundle (fleet/adapters.py)
    adapters: list[BundleRecord] = field(default_factory=list)  # a model's: the adapters built for it


def models(session: Session, trust: TrustStore) -> list[ModelView]:
    """Every bundle, its manifest re-verified against the trusted keys as the page is drawn."""
    out = []
    records = list(session.scalars(select(BundleRecord).order_by(BundleRecord.name, BundleRecord.version.desc())))
    for b in records:
        body = b.manifest_yaml.encode("utf-8")
        if is_adapter_manifest(body):
            out.append(adapter_view(b, body, trust))
            continue
        try:
            m = verify_manifest_bytes(body, b.signature, trust)
            out.append(ModelView(b, m, True, None))
            continue
        except VerificationError as exc:
            err = f"{exc.reason}: {exc.message}"
        except ManifestError as exc:
            err = exc.message
        try:
            m = BundleManifest.from_yaml(body)
        except ManifestError:
            m = None
        out.append(ModelView(b, m, False, err))
    for mv in out:
        mv.adapters = [] if mv.adapter else adapters_of(records, mv.record.manifest_sha256)
    return out


def adapter_view(b: BundleRecord, body: bytes, trust: TrustStore) -> ModelView:
    """An adapter's row: its manifest re-verified like a model's."""
    try:
        return ModelView(b, None, True, None, adapter=verify_adapter_manifest_bytes(body, b.signature.encode(), trust))
    except VerificationError as exc:
        err = f"{exc.reason}: {exc.message}"
    except ManifestError as exc:
        err = exc.message
    try:
        m: AdapterManifest | None = AdapterManifest.from_yaml(body)
    except ManifestError:
        m = None
    return ModelView(b, None, False, err, adapter=m)


def bundle_choices(session: Session) -> list[str]:
    return [
        f"{n}@{v}"
        for n, v in session.execute(
            select(BundleRecord.name, BundleRecord.version).order_by(BundleRecord.name, BundleRecord.version.desc())
        )
    ]


# --- deployments ------------------------------------------------------------------------------------


@dataclass
class WaveView:
    index: int
    counts: dict[str, int]
    total: int
    done: int


@dataclass
class DeploymentView:
    dep: Deployment
    waves: list[WaveView]
    counts: dict[str, int]
    strategy: str
    targets: list[DeploymentTarget]  # the table's rows: problems first, at most TARGET_ROWS


TARGET_ROWS = 300
# Rows that need a look come first in the per-device table.
TARGET_ORDER = {
    TargetState.FAILED.value: 0,
    TargetState.ROLLBACK_FAILED.value: 0,
    TargetState.UNFIT.value: 0,
    TargetState.IN_FLIGHT.value: 1,
    TargetState.ROLLING_BACK.value: 1,
}


def deployment_view(dep: Deployment) -> DeploymentView:
    waves: dict[int, Counter[str]] = {}
    for w in range(max(dep.waves, 1)):
        waves[w] = Counter()
    for t in dep.targets:
        waves.setdefault(t.wave, Counter())[t.state] += 1
    views = [WaveView(i, dict(c), sum(c.values()), sum(c[k.value] for k in SETTLED)) for i, c in sorted(waves.items())]
    counts = dict(Counter(t.state for t in dep.targets))
    strategy = ((dep.manifest.get("spec") or {}).get("strategy") or {}).get("type", "all-at-once")
    rows = sorted(dep.targets, key=lambda t: (TARGET_ORDER.get(t.state, 2), t.position))[:TARGET_ROWS]
    return DeploymentView(dep, views, counts, strategy, rows)


def deployments(session: Session) -> list[DeploymentView]:
    deps = session.scalars(select(Deployment).order_by(Deployment.created_at.desc())).all()
    return [deployment_view(d) for d in deps]


def get_deployment_view(session: Session, name: str) -> DeploymentView | None:
    dep = session.scalar(select(Deployment).where(Deployment.name == name))
    return None if dep is None else deployment_view(dep)


@dataclass
class BeforeAfter:
    tok_s: list[tuple[str, float | None, float | None]]  # (device, before, after), worst change first
    error_rate: list[tuple[str, float | None, float | None]]  # percent
    devices: int  # updated devices with telemetry (the charts show at most ``limit``)
    tok_s_mean: tuple[float | None, float | None]
    error_rate_overall: tuple[float | None, float | None]


# Devices that were given the deployment's bundle and finished with it (or are being sent back).
UPDATED = tuple(
    s.value
    for s in (TargetState.SUCCEEDED, TargetState.ROLLING_BACK, TargetState.ROLLED_BACK, TargetState.ROLLBACK_FAILED)
)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def counter_increments(device_ids: Any) -> Any:
    """Telemetry samples of ``device_ids`` with the requests and errors served since the device's previous
    sample. Agents send counters cumulative since they started; a counter that went down means the agent
    restarted, so its new value is all since then. A device's first sample adds nothing (unknown start).
    """
    s = TelemetrySample
    window = {"partition_by": s.device_id, "order_by": (s.ts, s.seq)}
    prev_req = func.lag(s.requests).over(**window)
    prev_err = func.lag(s.errors).over(**window)
    return (
        select(
            s.device_id,
            s.ts,
            s.model_name,
            s.model_version,
            s.decode_tok_s,
            case((prev_req.is_(None), 0), (s.requests < prev_req, s.requests), else_=s.requests - prev_req).label(
                "d_requests"
            ),
            case((prev_err.is_(None), 0), (s.errors < prev_err, s.errors), else_=s.errors - prev_err).label("d_errors"),
        )
        .where(s.device_id.in_(device_ids))
        .subquery()
    )


def before_after(session: Session, dep: Deployment, limit: int = 40) -> BeforeAfter:
    """For each device updated so far: decode tok/s and error rate on its previous model (samples before
    it was started) vs on this deployment's model (samples since). One aggregate query for the whole
    deployment, so it stays cheap with thousands of devices."""
    t = DeploymentTarget
    base = adapter_base_of(session, dep.bundle_name, dep.bundle_version)
    # An adapter's samples are told apart only by time, and a rollback overwrites a target's start and finish
    # times with its own: only devices that still run it have the windows below.
    shown = (TargetState.SUCCEEDED.value,) if base is not None else UPDATED
    updated = select(t.device_id).where(t.deployment_id == dep.id, t.state.in_(shown))
    inc = counter_increments(updated)
    if base is not None:
        # An adapter leaves the model as it is: every sample names the base; before is the base (with the
        # adapter's previous version, if any) until the device was started, after is since its commit.
        on_base = (inc.c.model_name == base[0]) & (inc.c.model_version == base[1])
        is_new = on_base & (inc.c.ts >= t.finished_at)
        was_previous = on_base & (inc.c.ts <= t.assigned_at)
    else:
        # A release deployment: each device's own variant (the target's bundle); else the deployment's bundle.
        is_new = (inc.c.model_name == func.coalesce(t.bundle_name, dep.bundle_name)) & (
            inc.c.model_version == func.coalesce(t.bundle_version, dep.bundle_version)
        )
        was_previous = (
            (inc.c.model_name == t.previous_name)
            & (inc.c.model_version == t.previous_version)
            & (inc.c.ts <= t.assigned_at)
        )
    after = case((is_new, 1), else_=0).label("after")
    rows = session.execute(
        select(
            t.device_id,
            after,
            func.avg(inc.c.decode_tok_s),
            func.sum(inc.c.d_requests),
            func.sum(inc.c.d_errors),
        )
        .join(inc, inc.c.device_id == t.device_id)
        .where(
            t.deployment_id == dep.id,
            t.state.in_(shown),
            t.assigned_at.is_not(None),
            or_(is_new & (inc.c.ts >= t.assigned_at), was_previous),
        )
        .group_by(t.device_id, after)
    ).all()
    stats: dict[str, dict[int, tuple[float | None, int, int]]] = {}
    for device_id, is_after, tok, req, errs in rows:
        stats.setdefault(device_id, {})[int(is_after)] = (
            None if tok is None else float(tok),
            int(req or 0),
            int(errs or 0),
        )
    baselines = {t.device_id: t.baseline for t in dep.targets if t.state in shown}
    tok: list[tuple[str, float | None, float | None]] = []
    err: list[tuple[str, float | None, float | None]] = []
    totals = [[0, 0], [0, 0]]  # [before, after] x [requests, errors]
    for device_id, baseline in baselines.items():
        st = stats.get(device_id, {})
        b, a = st.get(0), st.get(1)
        b_tok = b[0] if b else None
        if b_tok is None and baseline:
            b_tok = baseline.get("decode_tok_s")
        a_tok = a[0] if a else None
        if b_tok is None and a_tok is None:
            continue
        tok.append((device_id, b_tok, a_tok))
        err.append(
            (
                device_id,
                None if not b or not b[1] else 100.0 * b[2] / b[1],
                None if not a or not a[1] else 100.0 * a[2] / a[1],
            )
        )
        for i, x in ((0, b), (1, a)):
            if x:
                totals[i][0] += x[1]
                totals[i][1] += x[2]

    def change(row: tuple[str, float | None, float | None]) -> float:
        _, b_, a_ = row
        return (a_ / b_) if a_ is not None and b_ else float("inf")

    # The devices that changed for the worse come first; the chart shows the first ``limit``.
    order = sorted(range(len(tok)), key=lambda i: (change(tok[i]), tok[i][0]))
    return BeforeAfter(
        tok_s=[tok[i] for i in order][:limit],
        error_rate=[err[i] for i in order][:limit],
        devices=len(tok),
        tok_s_mean=(
            _mean([r[1] for r in tok if r[1] is not None]),
            _mean([r[2] for r in tok if r[2] is not None]),
        ),
        error_rate_overall=tuple(  # type: ignore[arg-type]
            None if req == 0 else 100.0 * errs / req for req, errs in totals
        ),
    )


# --- audit ------------------------------------------------------------------------------------------


def audit_entries(
    session: Session, *, deployment: str = "", device: str = "", action: str = "", limit: int = 200
) -> list[AuditEntry]:
    q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if deployment:
        q = q.where(AuditEntry.deployment == deployment)
    if device:
        q = q.where(AuditEntry.device_id == device)
    if action:
        q = q.where(AuditEntry.action == action)
    return list(session.scalars(q))


def audit_actions(session: Session) -> list[str]:
    return sorted(session.scalars(select(AuditEntry.action).distinct()))
