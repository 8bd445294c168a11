"""A short property-based run of the real service against its own OpenAPI schema (schemathesis).

Every operation gets generated requests (with the admin token, so they reach the handlers): never a
5xx, and every answer has a documented status code, content type and body shape.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from fleet.config import FleetConfig
from fleet.server import ServerThread

FLEET_TAGS = {"devices", "models", "deployments", "artifacts", "service", "offline"}
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, bundle_key):
    data: Path = tmp_path_factory.mktemp("st-fleet")
    server = ServerThread(FleetConfig(data_dir=data, port=0, trusted_keys=[bundle_key[1]])).start()
    yield server
    server.stop()


def test_api_conforms_to_its_schema(running: ServerThread) -> None:
    schema = schemathesis.openapi.from_url(f"{running.url}/openapi.json")
    headers = {"Authorization": f"Bearer {running.svc.admin_token}"}
    # Every operation, the offline package endpoints mounted by fleet/offline included.
    operations = [
        op for op in (r.ok() for r in schema.get_all_operations()) if set(op.tags or []) & FLEET_TAGS
    ]
    assert len(operations) >= 20
    failures = []
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:  # noqa: ANN001
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - collected so one run reports every failing operation
            failures.append(f"{op.method.upper()} {op.path}: {exc}"[:3000])
    assert not failures, "\n\n".join(failures)
