"""Every dashboard page and fragment against a fleet service on PostgreSQL (the production database)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from .conftest import BUNDLE, DashFleet, page_csrf, running_dash_fleet, signed_in_client, wait_for


@pytest.fixture
def pg_fleet(pg_url: str, tmp_path: Path) -> Iterator[DashFleet]:
    schema = f"dash_{uuid.uuid4().hex[:10]}"
    eng = create_engine(pg_url)
    with eng.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        with running_dash_fleet(tmp_path, database_url=pg_url, schema=schema) as fleet:
            yield fleet
    finally:
        with eng.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        eng.dispose()


@pytest.mark.postgres
def test_every_page_on_postgres(pg_fleet: DashFleet) -> None:
    with signed_in_client(pg_fleet) as client:
        csrf = page_csrf(client.get("/deployments").text)
        r = client.post(
            "/deployments",
            data={
                "csrf_token": csrf,
                "mode": "compose",
                "name": "pg-rollout",
                "bundle": f"{BUNDLE}@2",
                "strategy": "canary",
                "canary_devices": "1",
            },
        )
        assert r.status_code == 303 and r.headers["location"] == "/deployments/pg-rollout?applied=created"
        with pg_fleet.admin() as admin:
            wait_for(lambda: admin.deployment("pg-rollout")["status"] == "completed", what="completed on PG")

        def rows_with_values() -> bool:
            html = client.get("/ui/fragments/deployment/pg-rollout").text
            return html.count('class="bar" data-value="1') >= 8  # 4 devices x (before, after), 1xx tok/s

        wait_for(rows_with_values, what="before/after values for 4 devices")
        pages = {
            "/": "pi-field-02",
            "/?tag=site%3Dlab&status=online": "pi-lab-01",
            "/devices/pi-lab-01": "pg-rollout",
            "/models": "signature verified",
            "/deployments": "pg-rollout",
            "/deployments/pg-rollout": "completed",
            "/audit?deployment=pg-rollout": "admin (dashboard)",
            "/ui/fragments/overview": "pi-lab-02",
            "/ui/fragments/device/pi-field-01": "data-metric",
            "/ui/fragments/deployments": "pg-rollout",
            "/ui/fragments/deployment/pg-rollout": "succeeded",
            "/ui/fragments/audit": "enrolled",
        }
        for path, needle in pages.items():
            r = client.get(path)
            assert r.status_code == 200, (path, r.text[:300])
            assert needle in r.text, path
        device = client.get("/devices/pi-lab-01").text
        for metric in ("decode_tok_s", "ttft_p95_ms", "rss_bytes", "cpu_temp_c", "disk_free_bytes"):
            m = re.search(rf'data-metric="{metric}".*?data-points="(\d+)"', device, re.S)
            assert m and int(m.group(1)) >= 3, metric
        r = client.post("/deployments/pg-rollout/rollback", data={"csrf_token": csrf, "confirmed": "yes"})
        assert r.status_code == 303
        with pg_fleet.admin() as admin:
            wait_for(
                lambda: admin.deployment("pg-rollout")["status"] == "rolled_back", what="rolled back on PG"
            )
