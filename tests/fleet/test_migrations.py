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
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0005"
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
