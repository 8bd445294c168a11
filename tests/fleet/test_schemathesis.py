"""A short property-based run of the real service against its own OpenAPI schema (schemathesis).

Every operation gets generated requests, valid ones (positive) and ones that break the schema (negative),
with the admin token so they reach the handlers: never a 5xx; every answer has a documented status code,
content type, headers and body shape; a method the path does not take answers 405 with an ``Allow``
header. Every 4xx this finds is in the schema: the
common ones (400 for a body that cannot be parsed, 405 with ``Allow``, 413 for a JSON body over the cap)
come from ``fleet/http/errors.py`` ``COMMON_RESPONSES``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

from fleet.config import FleetConfig
from fleet.server import ServerThread

FLEET_TAGS = {"devices", "models", "deployments", "releases", "artifacts", "service", "offline"}
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]
# Negative cases (data that breaks the schema) get the same checks: never a 5xx, and whatever 4xx they get
# is documented. Not schemathesis' negative_data_rejection: it counts unknown query parameters (which
# HTTP APIs ignore, FastAPI included) and a "missing" Authorization header (which the admin token here
# always supplies) as data that must be refused, so it fails on requests that are fine.
NEGATIVE_CHECKS = CHECKS


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, bundle_key):
    data: Path = tmp_path_factory.mktemp("st-fleet")
    server = ServerThread(FleetConfig(data_dir=data, port=0, trusted_keys=[bundle_key[1]])).start()
    yield server
    server.stop()


def _operations(running: ServerThread) -> list:
    schema = schemathesis.openapi.from_url(f"{running.url}/openapi.json")
    # Every operation, the offline package endpoints mounted by fleet/offline included.
    return [op for op in (r.ok() for r in schema.get_all_operations()) if set(op.tags or []) & FLEET_TAGS]


def _property(op: Any, mode: GenerationMode, use: list[Any], headers: dict[str, str]) -> Any:
    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=use)

    return run


def test_api_conforms_to_its_schema(running: ServerThread) -> None:
    headers = {"Authorization": f"Bearer {running.svc.admin_token}"}
    operations = _operations(running)
    assert len(operations) >= 20
    failures = []
    for op in operations:
        for mode, use in ((GenerationMode.POSITIVE, CHECKS), (GenerationMode.NEGATIVE, NEGATIVE_CHECKS)):
            try:
                _property(op, mode, use, headers)()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # no parameter or body to break: nothing to send
            except Exception as exc:  # noqa: BLE001 - collected so one run reports every failing operation
                failures.append(f"{mode.value} {op.method.upper()} {op.path}: {exc}"[:3000])
    assert not failures, "\n\n".join(failures)


def test_common_errors_are_documented_and_answered(running: ServerThread) -> None:
    """The 4xx every route can give (issue 15: 400 "error parsing the body" and 405's Allow were not in
    the schema) are in each operation's responses, and the service answers them as documented."""
    doc = httpx.get(f"{running.url}/openapi.json").json()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if not set(op.get("tags", [])) & FLEET_TAGS:
                continue
            for status in ("400", "405", "413"):
                assert status in op["responses"], (method, path, status)
            assert "Allow" in op["responses"]["405"].get("headers", {}), (method, path)
    admin = {"Authorization": f"Bearer {running.svc.admin_token}"}
    r = httpx.put(f"{running.url}/api/v1/devices", headers=admin)
    assert r.status_code == 405 and "GET" in r.headers["allow"] and r.json()["reason"] == "method_not_allowed"
    r = httpx.post(
        f"{running.url}/api/v1/models",
        headers={**admin, "content-type": "multipart/form-data"},  # no boundary: cannot be parsed
        content=b"broken",
    )
    assert r.status_code == 400 and r.json()["reason"] == "bad_request", r.text
    r = httpx.post(
        f"{running.url}/api/v1/enrollment-tokens",
        headers={**admin, "content-type": "application/json"},
        content=b'{"tags": {"a": "' + b"x" * (2 * 1024 * 1024) + b'"}}',
    )
    assert r.status_code == 413 and r.json()["reason"] == "too_large"
