"""Unit tests of the dashboard's pieces that need no server: session signing, redirects, throttling,
manifest composition and the charts (their data, text alternatives and colours)."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest

from fleet.dashboard import actions, charts
from fleet.dashboard.auth import LoginThrottle, SessionSigner, safe_next
from fleet.dashboard.charts import Series


def test_session_cookie_round_trip_expiry_tamper_and_revoke() -> None:
    signer = SessionSigner("nfa_token-one", ttl_s=60)
    cookie, sess = signer.issue(now=1000.0)
    assert signer.check(cookie, now=1001.0) == sess
    assert signer.check(cookie, now=1061.0) is None  # expired
    sid, exp, mac = cookie.split(".")
    assert signer.check(f"{sid}.{int(exp) + 999}.{mac}", now=1001.0) is None  # longer life, same mac
    assert signer.check(f"x{sid}.{exp}.{mac}", now=1001.0) is None
    assert SessionSigner("nfa_token-two").check(cookie, now=1001.0) is None  # admin token changed
    other_cookie, other = signer.issue(now=1000.0)
    assert (
        other.csrf != sess.csrf and signer.csrf_ok(sess, sess.csrf) and not signer.csrf_ok(sess, other.csrf)
    )
    assert not signer.csrf_ok(sess, None) and not signer.csrf_ok(sess, "")
    signer.revoke(sess)
    assert signer.check(cookie, now=1001.0) is None
    assert signer.check(other_cookie, now=1001.0) == other
    assert signer.token_ok(" nfa_token-one\n") and not signer.token_ok("nfa_token-on")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/deployments/x?y=1", "/deployments/x?y=1"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("", "/"),
        (None, "/"),
    ],
)
def test_safe_next(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_login_throttle_blocks_after_the_limit() -> None:
    t = LoginThrottle(limit=3, window_s=60)
    for _ in range(3):
        assert not t.blocked("10.0.0.1")
        t.failed("10.0.0.1")
    assert t.blocked("10.0.0.1") and not t.blocked("10.0.0.2")
    t.succeeded("10.0.0.1")
    assert not t.blocked("10.0.0.1")


def test_compose_manifest_validates() -> None:
    doc = actions.compose_manifest(
        {
            "name": "r1",
            "bundle": "smollm2@3",
            "strategy": "waves",
            "wave_sizes": "1, 2;5",
            "wait_seconds": "30",
            "selector_tags": "site=lab, tier=edge",
            "selector_groups": "pilot",
            "failure_rate_pct": "20",
            "on_abort": "rollback",
        }
    )
    m = actions.validate_manifest(doc)
    assert m.spec.bundle.name == "smollm2" and m.spec.bundle.version == 3
    assert m.spec.strategy.waves is not None and m.spec.strategy.waves.sizes == [1, 2, 5]
    assert m.spec.strategy.wait_seconds == 30
    assert m.spec.selector.tags == {"site": "lab", "tier": "edge"} and m.spec.selector.groups == ["pilot"]
    assert m.spec.abort.failure_rate_pct == 20 and m.spec.abort.on_abort == "rollback"
    canary = actions.validate_manifest(
        actions.compose_manifest({"name": "r2", "bundle": "m@1", "strategy": "canary", "canary_devices": "2"})
    )
    assert canary.spec.strategy.canary is not None and canary.spec.strategy.canary.devices == 2
    with pytest.raises(ValueError):
        actions.compose_manifest({"name": "r3", "bundle": "m@1", "strategy": "waves", "wave_sizes": "two"})


def test_pasted_manifest_errors_name_fields() -> None:
    with pytest.raises(actions.ManifestInputError) as e:
        actions.parse_manifest_text("metadata: {name: ok}\nspec: {bundle: {name: m}}\n")
    paths = {err["path"] for err in e.value.errors}
    assert "spec.bundle.version" in paths
    with pytest.raises(actions.ManifestInputError):
        actions.parse_manifest_text("spec: [unclosed")
    with pytest.raises(actions.ManifestInputError):
        actions.parse_manifest_text("   ")
    ok = actions.parse_manifest_text(
        '{"apiVersion": "nanofleet/v1", "kind": "Deployment", "metadata": {"name": "j"},'
        ' "spec": {"bundle": {"name": "m", "version": 2}}}'
    )
    assert ok.metadata.name == "j"


def _chart_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" class="chart-data">(.*?)</script>', html)
    assert m, html
    return json.loads(m.group(1))


def test_line_chart_carries_each_series_and_escapes_labels() -> None:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    s1 = Series("m@1", [(t0 + dt.timedelta(seconds=i), 100.0 + i) for i in range(5)])
    s2 = Series("<script>x</script>", [(t0 + dt.timedelta(seconds=10 + i), 130.0) for i in range(3)])
    html = str(charts.line_chart("Decode", [s1, s2], "tok/s"))
    doc = _chart_data(html)
    assert [s["label"] for s in doc["series"]] == ["m@1", "<script>x</script>"]
    assert [len(s["points"]) for s in doc["series"]] == [5, 3] and 'data-points="8"' in html
    assert doc["series"][0]["points"][0] == [round(t0.timestamp() * 1000), 100.0]
    # Nothing in the page can end the JSON block or open a tag: labels are escaped everywhere.
    assert "<script>x" not in html and "&lt;script&gt;" in html
    assert 'role="img"' in html and "min 100 tok/s, max 130 tok/s, latest 130 tok/s" in html
    empty = str(charts.line_chart("Decode", [Series("m@1", [])]))
    assert 'data-points="0"' in empty and "no data yet" in empty and "<canvas" not in empty


def test_a_version_has_one_colour_on_every_chart() -> None:
    assert charts.version_colour("a@1") == charts.version_colour("b@1") == charts.PALETTE[0]
    assert charts.version_colour("a@2") == charts.PALETTE[1] != charts.version_colour("a@1")
    assert charts.version_colour("no model") == charts.NO_VERSION_COLOUR
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    # m@2 is the only series of this chart, the second of that one: the same colour in both.
    only = _chart_data(str(charts.line_chart("A", [Series("m@2", [(t0, 1.0)])])))
    both = _chart_data(str(charts.line_chart("B", [Series("m@1", [(t0, 1.0)]), Series("m@2", [(t0, 2.0)])])))
    bars = _chart_data(str(charts.before_after_chart("C", [("d", 1.0, 2.0)], versions=("m@1", "m@2"))))
    assert only["series"][0]["colour"] == both["series"][1]["colour"] == bars["series"][1]["colour"]
    assert both["series"][0]["colour"] == bars["series"][0]["colour"]


def test_before_after_and_wave_bars() -> None:
    html = str(
        charts.before_after_chart("tok/s", [("d1", 100.0, 130.0), ("d2", None, None), ("d3", 90.0, None)])
    )
    assert 'data-rows="2"' in html and html.count('class="bar"') == 4
    assert _chart_data(html)["devices"] == ["d1", "d3"]
    assert _chart_data(html)["series"][1]["values"] == [130.0, None]
    bar = str(charts.stacked_bar({"succeeded": 2, "failed": 1, "pending": 1}, "Wave 1"))
    assert 'data-total="4"' in bar and 'data-done="3"' in bar
    assert "Wave 1: 3 of 4 finished (2 succeeded, 1 failed, 1 pending)" in bar
    assert charts.fmt_num(3 * 2**30, "B") == "3.0 GiB" and charts.fmt_num(None) == "–"


def test_manifest_yaml_round_trips_without_defaults() -> None:
    m = actions.validate_manifest(
        actions.compose_manifest({"name": "r1", "bundle": "m@3", "strategy": "canary", "canary_devices": "2"})
    )
    text = actions.manifest_yaml(m.model_dump(mode="json"))
    assert text.startswith("apiVersion: nanofleet/v1\nkind: Deployment\nmetadata:\n  name: r1\n")
    assert "max_in_flight" not in text and "on_abort" not in text  # defaults left out
    assert actions.parse_manifest_text(text) == m


def test_the_before_after_label_of_an_adapter_the_devices_held_no_version_of() -> None:
    from fleet.dashboard.pages.deployments import version_label

    assert version_label("qv@0") == "without qv"  # an adapter's previous "none": the base served alone
    assert version_label("qv@2") == "qv@2"
    assert version_label("smollm2-135m@10") == "smollm2-135m@10"
