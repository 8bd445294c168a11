"""Dashboard sign-in, session cookie and CSRF, over real HTTP against the running fleet service."""

from __future__ import annotations

import re

import httpx
import pytest

from .conftest import BUNDLE, DashFleet, login_csrf, page_csrf, signed_in_client

PAGES = ["/", "/models", "/deployments", "/audit", "/devices/pi-lab-01", "/deployments/nope"]
FRAGMENTS = ["/ui/fragments/overview", "/ui/fragments/deployments", "/ui/fragments/audit"]


@pytest.mark.parametrize("path", PAGES)
def test_unauthenticated_page_redirects_to_sign_in(dash_fleet: DashFleet, path: str) -> None:
    r = httpx.get(dash_fleet.url + path, follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"].startswith("/login?next=")
    assert "nf_session" not in r.headers.get("set-cookie", "")


@pytest.mark.parametrize("path", FRAGMENTS)
def test_unauthenticated_fragment_is_401(dash_fleet: DashFleet, path: str) -> None:
    r = httpx.get(dash_fleet.url + path)
    assert r.status_code == 401
    assert r.json()["login"].startswith("/login")


def test_forged_or_tampered_cookie_is_refused(dash_fleet: DashFleet) -> None:
    with signed_in_client(dash_fleet) as client:
        good = client.cookies["nf_session"]
        sid, exp, mac = good.split(".")
        for bad in (f"{sid}.{int(exp) + 3600}.{mac}", f"{sid}.{exp}.{'0' * len(mac)}", "garbage", ""):
            r = httpx.get(dash_fleet.url + "/", cookies={"nf_session": bad}, follow_redirects=False)
            assert r.status_code == 303, bad
        assert httpx.get(dash_fleet.url + "/", cookies={"nf_session": good}).status_code == 200


def test_sign_in_sets_httponly_samesite_cookie(dash_fleet: DashFleet) -> None:
    with httpx.Client(base_url=dash_fleet.url, follow_redirects=False) as client:
        csrf = login_csrf(client)
        r = client.post("/login", data={"token": dash_fleet.token, "csrf_token": csrf, "next": "/models"})
        assert r.status_code == 303
        assert r.headers["location"] == "/models"
        cookie = next(v for v in r.headers.get_list("set-cookie") if v.startswith("nf_session="))
        low = cookie.lower()
        assert "httponly" in low and "samesite=strict" in low and "path=/" in low
        assert dash_fleet.token not in cookie
        page = client.get("/models")
        assert page.status_code == 200
        assert "default-src 'self'" in page.headers["content-security-policy"]


def test_wrong_token_and_login_without_csrf_are_refused(dash_fleet: DashFleet) -> None:
    with httpx.Client(base_url=dash_fleet.url, follow_redirects=False) as client:
        csrf = login_csrf(client)
        r = client.post("/login", data={"token": "nfa_wrong", "csrf_token": csrf})
        assert r.status_code == 401
        assert "not the admin token" in r.text
        assert "nf_session" not in client.cookies
        # The right token but no login CSRF token (a cross-site login attempt).
        r = client.post("/login", data={"token": dash_fleet.token})
        assert r.status_code == 403
        assert "nf_session" not in client.cookies


def test_open_redirect_after_sign_in_is_refused(dash_fleet: DashFleet) -> None:
    with httpx.Client(base_url=dash_fleet.url, follow_redirects=False) as client:
        csrf = login_csrf(client)
        r = client.post(
            "/login", data={"token": dash_fleet.token, "csrf_token": csrf, "next": "//evil.example/x"}
        )
        assert r.status_code == 303 and r.headers["location"] == "/"


def test_actions_without_csrf_token_are_refused(dash_fleet: DashFleet) -> None:
    name = "csrf-probe"
    with dash_fleet.admin() as admin:
        admin.apply(
            {
                "apiVersion": "nanofleet/v1",
                "kind": "Deployment",
                "metadata": {"name": name},
                # A selector that matches nothing: the deployment exists but touches no device.
                "spec": {"bundle": {"name": BUNDLE, "version": 1}, "selector": {"tags": {"site": "nowhere"}}},
            }
        )
    with signed_in_client(dash_fleet) as client:
        csrf = page_csrf(client.get("/deployments").text)
        before = len(dash_fleet.admin().deployments())
        attempts = [
            ("/deployments", {"mode": "compose", "name": "evil", "bundle": f"{BUNDLE}@1"}),
            (
                "/deployments",
                {"mode": "compose", "name": "evil", "bundle": f"{BUNDLE}@1", "csrf_token": "x" * 64},
            ),
            (f"/deployments/{name}/rollback", {"confirmed": "yes"}),
            (
                f"/deployments/{name}/abort",
                {"confirmed": "yes", "csrf_token": csrf[:-1] + ("1" if csrf[-1] == "0" else "0")},
            ),
            ("/logout", {}),
        ]
        for path, data in attempts:
            r = client.post(path, data=data)
            assert r.status_code == 403, (path, r.status_code, r.text[:200])
            assert "CSRF" in r.text
        with dash_fleet.admin() as admin:
            assert len(admin.deployments()) == before
            assert admin.deployment(name)["status"] == "completed"
            assert not [a for a in admin.audit(deployment=name) if a["actor"] == "admin (dashboard)"]
        # The same action with the token goes through (so the refusals above were about the token).
        r = client.post(f"/deployments/{name}/rollback", data={"confirmed": "yes", "csrf_token": csrf})
        assert r.status_code == 303, r.text[:300]
        with dash_fleet.admin() as admin:
            assert admin.deployment(name)["status"] == "rolled_back"
            assert any(
                a["actor"] == "admin (dashboard)" and a["action"] == "rollback"
                for a in admin.audit(deployment=name)
            )


def test_action_without_confirmation_asks_first(dash_fleet: DashFleet) -> None:
    with signed_in_client(dash_fleet) as client:
        csrf = page_csrf(client.get("/").text)
        r = client.post("/deployments/csrf-probe/abort", data={"csrf_token": csrf})
        assert r.status_code == 200
        assert "Abort deployment csrf-probe?" in r.text and 'name="confirmed" value="yes"' in r.text


def test_sign_out_revokes_the_session(dash_fleet: DashFleet) -> None:
    with signed_in_client(dash_fleet) as client:
        cookie = client.cookies["nf_session"]
        csrf = page_csrf(client.get("/").text)
        r = client.post("/logout", data={"csrf_token": csrf})
        assert r.status_code == 303 and r.headers["location"] == "/login"
    # Replaying the old cookie after sign-out does not work.
    r = httpx.get(dash_fleet.url + "/", cookies={"nf_session": cookie}, follow_redirects=False)
    assert r.status_code == 303


def test_bad_manifest_is_reported_field_by_field(dash_fleet: DashFleet) -> None:
    with signed_in_client(dash_fleet) as client:
        csrf = page_csrf(client.get("/deployments").text)
        r = client.post(
            "/deployments",
            data={
                "csrf_token": csrf,
                "mode": "manifest",
                "manifest": "apiVersion: nanofleet/v1\nkind: Deployment\nmetadata: {name: Bad_Name}\n"
                "spec: {bundle: {name: x, version: 0}}\n",
            },
        )
        assert r.status_code == 422
        assert "metadata.name" in r.text and "spec.bundle.version" in r.text
        # The pasted text is kept so it can be fixed.
        assert "Bad_Name" in r.text
        r = client.post(
            "/deployments",
            data={"csrf_token": csrf, "mode": "compose", "name": "unknown-bundle", "bundle": "no-such@9"},
        )
        assert r.status_code == 422 and "no bundle no-such@9" in r.text


def test_html_in_device_data_is_escaped(dash_fleet: DashFleet) -> None:
    evil = '<img src=x onerror="alert(1)">'
    with dash_fleet.admin() as admin:
        admin.request("PATCH", "/api/v1/devices/pi-lab-02", json={"tags": {"site": "lab", "note": evil}})
    try:
        with signed_in_client(dash_fleet) as client:
            for path in ("/", "/devices/pi-lab-02", "/ui/fragments/overview"):
                html = client.get(path).text
                assert evil not in html, path
                assert "&lt;img src=x onerror=" in html, path
    finally:
        with dash_fleet.admin() as admin:
            admin.request("PATCH", "/api/v1/devices/pi-lab-02", json={"tags": {"site": "lab"}})


def test_edit_prefills_the_manifest_of_a_deployment(dash_fleet: DashFleet) -> None:
    with dash_fleet.admin() as admin:
        admin.apply(
            {
                "metadata": {"name": "edit-probe"},
                "spec": {"bundle": {"name": BUNDLE, "version": 1}, "selector": {"tags": {"site": "nowhere"}}},
            }
        )
    with signed_in_client(dash_fleet) as client:
        html = client.get("/deployments?edit=edit-probe").text
        m = re.search(r'<textarea id="m-text"[^>]*>(.*?)</textarea>', html, re.S)
        assert m is not None
        text = m.group(1).replace("&#34;", '"').replace("&#39;", "'")
        assert "name: edit-probe" in text and "site: nowhere" in text and f"name: {BUNDLE}" in text
        assert client.get("/deployments?edit=no-such").status_code == 200
