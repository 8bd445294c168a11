"""The read side at scale: the devices list pages with a keyset cursor (``?limit=&cursor=``, a Link
header to the next page) while the unpaginated list keeps its shape; the dashboard overview's facets,
computed from a narrow read, match what the full device rows say."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx

from fleet.client import FleetClient
from fleet.config import FleetConfig
from fleet.dashboard import queries
from fleet.server import ServerThread


def test_devices_pages_and_overview_facets(tmp_path: Path, release_key) -> None:
    srv = ServerThread(FleetConfig(data_dir=tmp_path / "fleet", port=0, trusted_keys=[release_key[1]])).start()
    try:
        with FleetClient(srv.url, srv.svc.admin_token) as admin:
            token = admin.enrollment_token(uses=7, tags={"site": "lab"})["token"]
            for i in range(7):
                admin.enroll(token, device_id=f"page-{i}", hardware_class="pi5" if i % 2 else "pi4")
            everything = admin.devices()
        assert [d["id"] for d in everything] == [f"page-{i}" for i in range(7)]  # enrolment order, as before

        headers = {"Authorization": f"Bearer {srv.svc.admin_token}"}
        seen: list[str] = []
        url: str | None = f"{srv.url}/api/v1/devices?limit=3"
        pages = 0
        while url:
            r = httpx.get(url, headers=headers)
            assert r.status_code == 200
            seen += [d["id"] for d in r.json()]
            url = r.links.get("next", {}).get("url")
            pages += 1
            assert (url is None) == ("x-next-cursor" not in r.headers)
        assert seen == [d["id"] for d in everything] and pages == 3
        bad = httpx.get(f"{srv.url}/api/v1/devices?limit=3&cursor=not-a-cursor", headers=headers)
        assert bad.status_code == 400 and bad.json()["reason"] == "bad_cursor"

        with srv.svc.sessions() as s:
            ov = queries.overview(s, queries.DeviceFilters(hardware_class="pi5"), limit=2)
        assert ov.total == 7 and ov.matching == 3 and len(ov.devices) == 2
        assert ov.by_hardware == Counter({"pi5": 3}) and ov.by_status == Counter({"offline": 3})
        assert ov.by_update_state == Counter({"unknown": 3}) and ov.tags == ["site=lab"]
        assert [d.id for d in ov.devices] == ["page-1", "page-3"] and ov.devices[0].secret_hash
    finally:
        srv.stop()
