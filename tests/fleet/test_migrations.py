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
    the row's own page (a HOT update: no new index entries, pruned on the page without VACUUM); at the default
    100 the pages are full and nearly no update is HOT (the table grew 2.2x in a 5-minute benchmark run,
    docs/benchmarks.md). Counted by the transaction's own statistics, so concurrent sessions (whose snapshots
    may delay pruning) do not change the figure."""
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
        with eng.begin() as conn:  # one update of every device, as a round of telemetry batches makes
            conn.execute(text("UPDATE devices SET online = NOT online, last_seen = CURRENT_TIMESTAMP"))
            hot, updated = conn.execute(
                text("SELECT n_tup_hot_upd, n_tup_upd FROM pg_stat_xact_user_tables WHERE relid = to_regclass(:t)"),
                {"t": f"{schema}.devices"},
            ).one()
        assert updated == 2000
        assert hot >= 0.8 * updated, (hot, updated)  # 1835 of 2000 measured; fillfactor 100: 0 of 2000
    finally:
        eng.dispose()
