"""Alembic migrations, up from the first revision, on SQLite and PostgreSQL: rows survive, the unused
service_state table goes, and the migrated schema is exactly what the ORM models declare."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from fleet.db import Base, make_engine, run_migrations


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "postgres":
        url, schema = request.getfixturevalue("pg_schema")
        eng = make_engine(url, schema)
    else:
        eng = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield eng
    eng.dispose()


def test_upgrade_from_0001_keeps_rows_and_drops_service_state(engine) -> None:
    run_migrations(engine, "0001")
    assert "service_state" in inspect(engine).get_table_names()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO devices (id, tags, groups, secret_hash, enrolled_at, online) "
                "VALUES ('old-1', '{}', '[]', 'h', CURRENT_TIMESTAMP, false)"
            )
        )
        conn.execute(text("INSERT INTO service_state (key, value) VALUES ('k', 'v')"))

    run_migrations(engine)
    tables = set(inspect(engine).get_table_names())
    assert "service_state" not in tables and "devices" in tables
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0006"
        assert conn.execute(text("SELECT id FROM devices")).scalars().all() == ["old-1"]
        # 0003: a board enrolled before has no public key (its offline telemetry is refused until re-enrolled)
        assert conn.execute(text("SELECT public_key FROM devices")).scalars().all() == [None]
        # 0005: nor capabilities (its reported state brings them; variants wait for them)
        assert conn.execute(text("SELECT capabilities FROM devices")).scalars().all() == [None]
        # The schema the migrations made is the one the models declare: nothing for autogenerate to add.
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []

    run_migrations(engine)  # on every start: a no-op once at head
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM devices")).scalar_one() == 1


def test_downgrade_restores_service_state(engine) -> None:
    from alembic import command
    from alembic.config import Config

    run_migrations(engine)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parents[2] / "fleet" / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert "service_state" in inspect(engine).get_table_names()


def test_device_rows_updated_per_message_stay_on_their_pages_on_postgresql(pg_schema) -> None:
    """0006: every telemetry message updates its device's row. At fillfactor 50 the new row version fits on
    the same page (a HOT update, pruned without VACUUM), so the table does not grow with the update count;
    at the default 100 it grew 2.2x in a 5-minute benchmark run with autovacuum off (docs/benchmarks.md)."""
    url, schema = pg_schema
    eng = make_engine(url, schema)
    try:
        run_migrations(eng)
        with eng.begin() as conn:
            options = conn.execute(
                text("SELECT reloptions FROM pg_class WHERE oid = to_regclass(:t)"), {"t": f"{schema}.devices"}
            ).scalar_one()
            assert "fillfactor=50" in (options or []), options
            conn.execute(
                text(
                    "INSERT INTO devices (id, tags, groups, secret_hash, enrolled_at, online) "
                    "SELECT 'd-' || i, '{}', '[]', 'h', CURRENT_TIMESTAMP, false FROM generate_series(1, 2000) i"
                )
            )
        size = "SELECT pg_relation_size(to_regclass(:t))"
        with eng.connect() as conn:
            before = conn.execute(text(size), {"t": f"{schema}.devices"}).scalar_one()
        for _ in range(20):  # 40,000 updates, one per device per round, as telemetry batches do
            with eng.begin() as conn:
                conn.execute(text("UPDATE devices SET online = NOT online, last_seen = CURRENT_TIMESTAMP"))
        with eng.connect() as conn:
            after = conn.execute(text(size), {"t": f"{schema}.devices"}).scalar_one()
        # 20 full versions of the table without HOT pruning; with it, at most the page slack is used again.
        assert after <= 2 * before, (before, after)
    finally:
        eng.dispose()
