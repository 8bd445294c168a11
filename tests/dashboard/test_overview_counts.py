"""The overview's counts come from the database (GROUP BY), its table from a bounded page: with more
matching devices than rows shown, every count must still be the one a plain recount of all devices gives,
on SQLite and on PostgreSQL (whose JSON and boolean handling differ)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, insert, text
from sqlalchemy.orm import Session

from fleet.dashboard import queries
from fleet.db import Device, make_engine, run_migrations

N = 250  # more than queries.OVERVIEW_ROWS


def device(i: int) -> Device:
    return Device(
        id=f"ov-{i:04d}",
        secret_hash="x",
        tags={"site": "a" if i % 2 else "b", **({"rack": "r_1"} if i % 7 == 0 else {})},
        groups=["g%1"] if i % 5 == 0 else (["g1", "edge"] if i % 5 == 1 else []),
        hardware_class=None if i % 11 == 0 else ("pi5" if i % 3 else "pi4"),
        online=i % 3 != 0,
        current_name=None if i % 13 == 0 else "m",
        current_version=None if i % 13 == 0 else 1 + i % 4,
        reported=None if i % 17 == 0 else {"state": "committed" if i % 2 else "downloading"},
    )


def recount(devices: list[Device], f: queries.DeviceFilters) -> dict[str, object]:
    """What the overview must say, counted the slow way over every device."""
    hit = [d for d in devices if f.matches(d)]
    return {
        "matching": len(hit),
        "by_status": Counter("online" if d.online else "offline" for d in hit),
        "by_update_state": Counter(queries.update_state(d) for d in hit),
        "by_hardware": Counter(d.hardware_class or "unknown" for d in hit),
        "by_model": Counter(queries.model_of(d) for d in hit),
        "ids": sorted(d.id for d in hit)[: queries.OVERVIEW_ROWS],
    }


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
        schema = None
    else:
        url = request.getfixturevalue("pg_url")
        schema = f"ov_{uuid.uuid4().hex[:10]}"
        with make_engine(url).begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        engine = make_engine(url, schema)
    run_migrations(engine)
    with Session(engine, expire_on_commit=False) as s:
        yield s
    if schema:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


FILTERS = [
    queries.DeviceFilters(),
    queries.DeviceFilters(status="online"),
    queries.DeviceFilters(status="offline", hardware_class="pi5"),
    queries.DeviceFilters(tag="site=a"),
    queries.DeviceFilters(tag="rack"),
    queries.DeviceFilters(group="g%1"),  # LIKE wildcards in a group name are literal
    queries.DeviceFilters(group="g1"),
    queries.DeviceFilters(model="m@2"),
    queries.DeviceFilters(model="none"),
    queries.DeviceFilters(q="OV-00"),
    queries.DeviceFilters(q="%"),
]


def test_overview_counts_every_device_but_shows_one_page(session: Session) -> None:
    session.add_all([device(i) for i in range(N)])
    session.commit()
    devices = list(session.query(Device))
    for f in FILTERS:
        ov = queries.overview(session, f)
        want = recount(devices, f)
        got = {
            "matching": ov.matching,
            "by_status": ov.by_status,
            "by_update_state": ov.by_update_state,
            "by_hardware": ov.by_hardware,
            "by_model": ov.by_model,
            "ids": [d.id for d in ov.devices],
        }
        assert got == want, f
        assert ov.total == N
    ov = queries.overview(session, queries.DeviceFilters())
    assert ov.matching == N and len(ov.devices) == queries.OVERVIEW_ROWS
    assert ov.tags == ["rack=r_1", "site=a", "site=b"] and ov.groups == ["edge", "g%1", "g1"]
    assert ov.hardware_classes == ["pi4", "pi5"] and "none" in ov.models and "m@4" in ov.models


def test_a_large_fleet_is_counted_in_one_pass_and_only_one_page_is_loaded(session: Session) -> None:
    """At a few thousand devices the overview reads the devices table once for every count and filter
    choice (on PostgreSQL one GROUPING SETS statement; SQLite, without them, a statement per part), and
    loads only the page it shows: nothing per device, whatever the fleet's size."""
    n = 3000
    rows = [
        {c.key: getattr(d, c.key) for c in Device.__table__.columns if getattr(d, c.key, None) is not None}
        | {"enrolled_at": dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)}
        for d in (device(i) for i in range(n))
    ]
    session.execute(insert(Device), rows)
    session.commit()
    session.expunge_all()
    statements: list[str] = []
    loaded: list[str] = []
    engine = session.get_bind()

    def executed(*args: object) -> None:
        statements.append(str(args[2]))

    def load(target: Device, _ctx: object) -> None:
        loaded.append(target.id)

    event.listen(engine, "before_cursor_execute", executed)
    event.listen(Device, "load", load)
    try:
        ov = queries.overview(session, queries.DeviceFilters(status="online"))
    finally:
        event.remove(engine, "before_cursor_execute", executed)
        event.remove(Device, "load", load)
    devices = [device(i) for i in range(n)]
    want = recount(devices, queries.DeviceFilters(status="online"))
    assert ov.total == n and ov.matching == want["matching"] and ov.by_model == want["by_model"]
    assert ov.by_update_state == want["by_update_state"] and ov.by_hardware == want["by_hardware"]
    assert ov.tags == ["rack=r_1", "site=a", "site=b"] and ov.groups == ["edge", "g%1", "g1"]
    assert loaded == want["ids"] and len(loaded) == queries.OVERVIEW_ROWS
    expected = 2 if engine.dialect.name == "postgresql" else 4  # the counts (+ tags + groups), the page
    assert len(statements) == expected, statements
    assert sum("devices" in st.lower() for st in statements) == expected
