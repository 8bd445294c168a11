"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against the running
fleet service, with simulated devices sending telemetry and update results over real MQTT.

Screenshots go to test-artifacts/dashboard/ (look at them: they are the point of a dashboard).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import BUNDLE, DashFleet, wait_for

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}

# Every form control must have a label (or an aria-label); returns the ones that do not.
UNLABELLED_JS = """() => Array.from(document.querySelectorAll('input, select, textarea'))
  .filter(el => el.type !== 'hidden')
  .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
  .map(el => el.outerHTML.slice(0, 120))"""
# Every chart (and wave bar) is an image with a text alternative.
UNNAMED_SVG_JS = """() => Array.from(document.querySelectorAll('svg, .chart'))
  .filter(s => s.getAttribute('role') !== 'img' || !s.getAttribute('aria-label')).length"""
# What Chart.js drew on a chart's canvas: its series (label, colour, points), and the geometry of its
# legend and value axis (is the legend clear of the plot? does the widest tick label fit its axis?).
DRAWN_JS = """el => {
  const c = Chart.getChart(el.querySelector('canvas'));
  if (!c) return null;
  const valueAxis = c.options.indexAxis === 'y' ? c.scales.x : c.scales.y;
  const ctx = c.ctx;
  const tickFont = Chart.helpers.toFont(valueAxis.options.ticks.font);
  ctx.save(); ctx.font = tickFont.string;
  const widest = Math.max(...valueAxis.ticks.map(t => ctx.measureText(String(t.label)).width));
  ctx.restore();
  return {
    series: c.data.datasets.map(d => ({label: d.label, colour: d.borderColor, points: d.data.length})),
    legendFont: Chart.helpers.toFont(c.options.plugins.legend.labels.font).size,
    legendBottom: c.legend.bottom, plotTop: c.chartArea.top,
    axis: {left: valueAxis.left, width: valueAxis.width, widestLabel: widest,
           horizontal: c.options.indexAxis === 'y'},
  };
}"""


class Tab:
    """One signed-in browser page, collecting console errors (a CSP violation shows up there too)."""

    def __init__(self, browser: Any, fleet: DashFleet, artifacts: Path, viewport: dict[str, int]) -> None:
        self.fleet = fleet
        self.artifacts = artifacts
        self.context = browser.new_context(viewport=viewport, base_url=fleet.url)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: self.errors.append(f"unexpected native dialog: {d.message}"))

    def sign_in(self, next_path: str = "/") -> None:
        self.page.goto(next_path)
        assert "/login" in self.page.url
        self.page.get_by_label("Admin token").fill(self.fleet.token)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_url(re.compile(re.escape(next_path.split("?")[0]) + r"(\?.*)?$"))

    def shot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def check_accessible(self) -> None:
        assert self.page.evaluate(UNLABELLED_JS) == [], f"unlabelled form controls on {self.page.url}"
        assert self.page.evaluate(UNNAMED_SVG_JS) == 0, f"charts without a text alternative on {self.page.url}"
        assert self.page.locator("main#main").count() == 1
        assert self.page.locator("h1").count() == 1

    def close(self) -> None:
        self.context.close()
        assert self.errors == [], f"browser console errors: {self.errors}"


@pytest.fixture
def tab(browser: Any, dash_fleet: DashFleet, artifacts: Path) -> Iterator[Tab]:
    t = Tab(browser, dash_fleet, artifacts, DESKTOP)
    t.sign_in("/")
    yield t
    t.close()


def live_ticks(t: Tab) -> int:
    return int(t.page.evaluate("() => Number(document.body.getAttribute('data-live-ticks') || 0)"))


def dep_status(t: Tab) -> str:
    return t.page.locator("#dep-status").inner_text().strip()


def confirm_action(t: Tab, action: str) -> None:
    """Click an action button, check the confirmation dialog, confirm, wait for the result page."""
    t.page.locator(f"#btn-{action}").click()
    dialog = t.page.locator("#confirm-dialog")
    dialog.wait_for(state="visible")
    assert action in t.page.locator("#confirm-text").inner_text().lower()
    with t.page.expect_navigation():
        t.page.locator("#confirm-ok").click()
    assert t.page.locator("#flash-done").inner_text().startswith(f"Done: {action}")


def check_charts(page: Any) -> dict[str, str]:
    """Every chart on the page is drawn, readable and consistent; returns each series' colour.

    The fixes of issue 17: a value axis wide enough for its widest tick label (no "i6.1" for 46.1), a
    legend in a readable size above the plot (not on the lines), one colour per series label on the page."""
    charts = page.locator(".chart[data-chart]")
    assert charts.count() > 0
    page.locator('.chart[data-chart]:not([data-rendered="1"])').first.wait_for(state="detached", timeout=5_000)
    colours: dict[str, str] = {}
    for i in range(charts.count()):
        drawn = charts.nth(i).evaluate(DRAWN_JS)
        assert drawn, f"chart {i} was not drawn"
        axis = drawn["axis"]
        if not axis["horizontal"]:
            assert axis["left"] >= 0 and axis["widestLabel"] <= axis["width"], drawn
        assert drawn["legendFont"] >= 12 and drawn["legendBottom"] <= drawn["plotTop"], drawn
        for s in drawn["series"]:
            assert colours.setdefault(s["label"], s["colour"]) == s["colour"], (s, colours)
    return colours


# --- tests --------------------------------------------------------------------------------------------


def test_sign_in_and_navigate_with_the_keyboard(browser: Any, dash_fleet: DashFleet, artifacts: Path) -> None:
    t = Tab(browser, dash_fleet, artifacts, DESKTOP)
    page = t.page
    page.goto("/deployments")
    assert page.url.endswith("/login?next=%2Fdeployments")
    t.check_accessible()
    t.shot("00-sign-in")
    # The token field has focus on arrival; typing and Enter signs in and goes where we were headed.
    assert page.evaluate("() => document.activeElement.id") == "token"
    page.keyboard.type("nfa_wrong-token")
    page.keyboard.press("Enter")
    page.wait_for_load_state()
    assert "not the admin token" in page.locator("#login-error").inner_text()
    # The refused sign-in answers 401, which the browser logs; that one is expected.
    assert t.errors == ["Failed to load resource: the server responded with a status of 401 (Unauthorized)"]
    t.errors.clear()
    page.locator("#token").focus()
    page.keyboard.type(dash_fleet.token)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/deployments$"))
    # From the top of a page: Tab reaches the skip link first, then the navigation, in order.
    page.locator("body").focus()
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.textContent.trim()") == "Skip to content"
    order = []
    for _ in range(6):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.textContent.trim()"))
    assert order[:5] == ["nanofleet", "Fleet", "Models", "Deployments", "Audit log"], order
    # Enter on a focused link follows it.
    page.locator("nav a", has_text="Models").focus()
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url.endswith("/models")
    t.close()


def test_overview_models_device_and_audit_pages(tab: Tab, dash_fleet: DashFleet) -> None:
    page = tab.page
    # Fleet overview: every device, online, on v1, with facets.
    page.goto("/")
    rows = page.locator("#devices tbody tr[data-device]")
    assert rows.count() == 4
    assert page.locator("#count-online").inner_text() == "4"
    assert f"{BUNDLE}@1" in page.locator("#facet-models").inner_text()
    tab.check_accessible()
    tab.shot("01-overview")
    # Filter by tag, then by group (a real form submit with real query parameters).
    page.get_by_label("Tag").select_option("site=field")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"tag=site%3Dfield"))
    ids = page.locator("#devices tbody tr[data-device]").evaluate_all("rs => rs.map(r => r.dataset.device)")
    assert sorted(ids) == ["pi-field-01", "pi-field-02"]
    page.goto("/?group=pilot")
    ids = page.locator("#devices tbody tr[data-device]").evaluate_all("rs => rs.map(r => r.dataset.device)")
    assert sorted(ids) == ["pi-lab-01", "pi-lab-02"]
    tab.shot("02-overview-filtered")

    # Device page: five charts drawn from telemetry that came over MQTT, reported vs desired, events.
    page.goto("/devices/pi-lab-01")
    for metric in ("decode_tok_s", "ttft_p95_ms", "rss_bytes", "cpu_temp_c", "disk_free_bytes"):
        chart = page.locator(f'figure[data-metric="{metric}"] .chart[data-rendered="1"]')
        assert int(chart.get_attribute("data-points") or 0) >= 3, metric
        drawn = chart.evaluate(DRAWN_JS)
        assert drawn and sum(s["points"] for s in drawn["series"]) >= 3, (metric, drawn)
        assert "samples" in (chart.get_attribute("aria-label") or "")
    # The decode chart's numbers are the ones the device published (100..104 tok/s on v1).
    label = page.locator('figure[data-metric="decode_tok_s"] .chart').get_attribute("aria-label") or ""
    lo, hi = (float(x) for x in re.search(r"min ([\d.]+) tok/s, max ([\d.]+) tok/s", label).groups())  # type: ignore[union-attr]
    assert 100 <= lo <= hi <= 104
    assert page.locator("#device-model").inner_text() == f"{BUNDLE}@1"
    tab.check_accessible()
    tab.shot("03-device")

    # Models page: each bundle's signed quality report, as signed.
    page.goto("/models")
    from manifests import read_manifest_unverified

    for v, bundle_dir in dash_fleet.bundle_dirs.items():
        m = read_manifest_unverified(bundle_dir)
        card = page.locator(f"#model-{BUNDLE}-{v}")
        assert "signature verified" in card.locator(".sig").inner_text()
        assert card.locator(".ppl-ref").inner_text() == f"{m.quality.ppl_reference:.2f}"  # type: ignore[union-attr]
        assert card.locator(".ppl-q").inner_text() == f"{m.quality.ppl_quantized:.2f}"  # type: ignore[union-attr]
        assert f"{m.quality.greedy_agreement * 100:.1f} %" in card.locator(".greedy").inner_text()  # type: ignore[union-attr]
        assert "cortex-a76" in card.locator(".targets-verif").inner_text()
        assert "matmulnbits" in card.locator(".recipe").inner_text()
        assert m.provenance.source in card.locator(".provenance").inner_text()
    tab.check_accessible()
    tab.shot("04-models")

    page.goto("/audit")
    assert page.locator("#audit tbody tr[data-action='enrolled']").count() == 4
    tab.check_accessible()
    tab.shot("05-audit")


def test_rollout_from_the_ui_with_live_progress_pause_resume_rollback(tab: Tab, dash_fleet: DashFleet) -> None:
    page = tab.page
    page.goto("/deployments")
    tab.check_accessible()
    # Compose a three-wave rollout of v2 with a soak after each wave, long enough to pause in.
    page.get_by_label("Name").fill("ui-rollout")
    page.get_by_label("Bundle").select_option(f"{BUNDLE}@2")
    page.get_by_label("Strategy").select_option("waves")
    page.get_by_label("Wave sizes").fill("1, 1, 2")
    page.get_by_label("Soak after each wave (s)").fill("8")
    page.get_by_label("Abort at failure rate (%)").fill("50")
    with page.expect_navigation():
        page.get_by_role("button", name="Start rollout").click()
    assert page.url.endswith("/deployments/ui-rollout?applied=created")
    assert page.locator("#live ol.waves li").count() == 3
    tab.shot("06-rollout-started")

    # Progress moves on the page without a reload: a marker set on this window survives the updates.
    page.evaluate("() => { window.__sameDocument = 'yes'; }")
    ticks = live_ticks(tab)
    page.locator("#dep-updated", has_text="2").wait_for(timeout=30_000)
    assert page.evaluate("() => window.__sameDocument") == "yes"
    assert live_ticks(tab) > ticks
    bar = page.locator("ol.waves li[data-wave='1'] svg.wavebar")
    assert bar.get_attribute("data-done") == "1" and bar.get_attribute("data-total") == "1"
    assert dep_status(tab) == "in_progress"

    # Pause: a confirmation first. Escape cancels it (keyboard), and nothing happens.
    page.locator("#btn-pause").focus()
    page.keyboard.press("Enter")
    page.locator("#confirm-dialog").wait_for(state="visible")
    assert page.evaluate("() => document.activeElement.id") == "confirm-cancel"
    page.keyboard.press("Escape")
    page.locator("#confirm-dialog").wait_for(state="hidden")
    assert page.evaluate("() => document.activeElement.id") == "btn-pause"
    with dash_fleet.admin() as admin:
        assert admin.deployment("ui-rollout")["status"] == "in_progress"
    confirm_action(tab, "pause")
    assert dep_status(tab) == "paused"
    assert page.locator("#btn-pause").is_disabled() and page.locator("#btn-resume").is_enabled()
    tab.shot("07-rollout-paused")
    # Paused means paused: the soak runs out, yet the last wave does not start.
    time.sleep(9)
    with dash_fleet.admin() as admin:
        dep = admin.deployment("ui-rollout")
    assert dep["status"] == "paused"
    assert [t["state"] for t in dep["targets"] if t["wave"] == 2] == ["pending", "pending"]

    confirm_action(tab, "resume")
    page.evaluate("() => { window.__sameDocument = 'yes'; }")
    page.locator("#dep-status", has_text="completed").wait_for(timeout=45_000)
    assert page.evaluate("() => window.__sameDocument") == "yes"
    assert page.locator("#dep-updated").inner_text() == "4"
    assert page.locator("#targets tbody tr[data-state='succeeded']").count() == 4

    # Before/after charts from the updated devices' telemetry: v1 ~100 tok/s and 10% errors, v2 ~130 and 0%.
    def charts_full() -> bool:
        return all(page.locator(f"{c} .chart").get_attribute("data-rows") == "4" for c in ("#chart-tok", "#chart-err"))

    wait_for(charts_full, timeout=15, what="before/after charts for 4 devices")
    tok = [float(v) for v in page.locator("#chart-tok td.bar").evaluate_all("rs => rs.map(r => r.dataset.value)")]
    err = [float(v) for v in page.locator("#chart-err td.bar").evaluate_all("rs => rs.map(r => r.dataset.value)")]
    before_tok, after_tok = tok[0::2], tok[1::2]
    assert all(100 <= b <= 104 for b in before_tok), tok
    assert all(130 <= a <= 134 for a in after_tok), tok
    assert err[0::2] == [10.0] * 4 and err[1::2] == [0.0] * 4, err
    summary = page.locator("#ba-summary").inner_text()
    assert summary.startswith("4 updated devices with telemetry") and "10.0 % → 0.00 %" in summary, summary
    tab.check_accessible()
    bars = check_charts(page)
    tab.shot("08-rollout-completed")

    # The device page now shows both model versions in its charts and the update in its history.
    page.goto("/devices/pi-field-02")
    lines = check_charts(page)
    series = [
        s["label"] for s in page.locator('figure[data-metric="decode_tok_s"] .chart').evaluate(DRAWN_JS)["series"]
    ]
    assert f"{BUNDLE}@1" in series and f"{BUNDLE}@2" in series
    # v2 is one colour everywhere: on every line chart of the device, and on the deployment's "after" bars.
    assert lines[f"{BUNDLE}@2"] == bars[f"this one ({BUNDLE}@2)"] != lines[f"{BUNDLE}@1"]
    assert lines[f"{BUNDLE}@1"] == bars[f"previous ({BUNDLE}@1)"]
    assert "ui-rollout" in page.locator("#update-history").inner_text()
    tab.shot("09-device-after-update")

    # Roll back from the UI: every device returns to v1 (signed rollback over MQTT).
    page.goto("/deployments/ui-rollout")
    confirm_action(tab, "rollback")
    page.locator("#dep-status", has_text="rolled_back").wait_for(timeout=45_000)
    with dash_fleet.admin() as admin:
        wait_for(lambda: {d["model"] for d in admin.devices()} == {f"{BUNDLE}@1"}, what="every device back on v1")
    tab.shot("10-rolled-back")

    # The audit log tells the story, actions attributed to the dashboard.
    page.goto("/audit?deployment=ui-rollout")
    mine = page.locator("#audit tbody tr").evaluate_all(
        "rs => rs.filter(r => r.cells[1].textContent === 'admin (dashboard)').map(r => r.dataset.action)"
    )
    assert {"applied", "pause", "resume", "rollback"} <= set(mine), mine
    tab.shot("11-audit-rollout")


def test_paste_a_manifest_then_abort(tab: Tab, dash_fleet: DashFleet) -> None:
    page = tab.page
    page.goto("/deployments")
    page.get_by_label(re.compile("^Manifest")).fill(
        "apiVersion: nanofleet/v1\nkind: Deployment\nmetadata: {name: pasted-canary}\n"
        f"spec:\n  bundle: {{name: {BUNDLE}, version: 3}}\n  selector: {{groups: [field]}}\n"
        "  strategy: {type: canary, canary: {devices: 1}, wait_seconds: 600}\n"
    )
    with page.expect_navigation():
        page.get_by_role("button", name="Apply manifest").click()
    assert page.url.endswith("/deployments/pasted-canary?applied=created")
    page.locator("#dep-updated", has_text="1").wait_for(timeout=30_000)
    assert page.locator("#targets tbody tr").count() == 2
    confirm_action(tab, "abort")
    assert dep_status(tab) == "aborted"
    assert page.locator("#abort-reason").inner_text() == "aborted by admin (dashboard)"
    assert page.locator("#targets tbody tr[data-state='skipped']").count() == 1
    for action in ("pause", "resume", "abort"):
        assert page.locator(f"#btn-{action}").is_disabled()
    tab.shot("12-pasted-canary-aborted")
    # Put the canary back on v1 for the tests that follow.
    confirm_action(tab, "rollback")
    page.locator("#dep-status", has_text="rolled_back").wait_for(timeout=30_000)


def test_automatic_abort_shows_its_reason_and_the_regression(tab: Tab, dash_fleet: DashFleet) -> None:
    """v3 decodes at 60 tok/s where v1 did 100: the rollout engine aborts and rolls back by itself, and
    the page shows why, with the drop in the before/after chart."""
    page = tab.page
    page.goto("/deployments")
    page.get_by_label(re.compile("^Manifest")).fill(
        "apiVersion: nanofleet/v1\nkind: Deployment\nmetadata: {name: slow-v3}\n"
        f"spec:\n  bundle: {{name: {BUNDLE}, version: 3}}\n  selector: {{groups: [pilot]}}\n"
        "  strategy: {type: canary, canary: {devices: 1}, wait_seconds: 600}\n"
        "  abort: {max_decode_drop_pct: 20, on_abort: rollback}\n"
    )
    with page.expect_navigation():
        page.get_by_role("button", name="Apply manifest").click()
    page.locator("#abort-reason").wait_for(timeout=30_000)
    reason = page.locator("#abort-reason").inner_text()
    assert re.search(r"decode [\d.]+ tok/s is \d+% below [\d.]+ tok/s on its previous model \(limit 20%\)", reason)
    page.locator("#dep-status", has_text="rolled_back").wait_for(timeout=30_000)
    bars = page.locator("#chart-tok td.bar").evaluate_all("rs => rs.map(r => Number(r.dataset.value))")
    assert len(bars) == 2 and 100 <= bars[0] <= 104 and 60 <= bars[1] <= 64, bars
    tab.shot("14-automatic-abort")
    with dash_fleet.admin() as admin:
        wait_for(lambda: {d["model"] for d in admin.devices()} == {f"{BUNDLE}@1"}, what="all back on v1")


def test_pages_fit_a_phone(browser: Any, dash_fleet: DashFleet, artifacts: Path) -> None:
    t = Tab(browser, dash_fleet, artifacts, PHONE)
    t.sign_in("/")
    paths = ["/", "/devices/pi-lab-01", "/models", "/deployments", "/audit"]
    with dash_fleet.admin() as admin:
        # A deployment page too: the one with the most devices (the rollout test's, when it ran first).
        deps = sorted(admin.deployments(), key=lambda d: -d["counts"]["total"])
    if deps:
        paths.append(f"/deployments/{deps[0]['name']}")
    for i, path in enumerate(paths):
        t.page.goto(path)
        overflow = t.page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} is {overflow}px wider than a phone"
        # The navigation is all on screen, and the main heading is visible without scrolling sideways.
        for link in t.page.locator("nav a").all():
            box = link.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], path
        t.shot(f"20-phone-{i}-{path.strip('/').replace('/', '-') or 'overview'}")
    t.close()


def test_overview_follows_a_device_going_online_and_offline(tab: Tab, dash_fleet: DashFleet) -> None:
    from manifests import mqtt as c

    page = tab.page
    page.goto("/?tag=site%3Dspare")
    assert page.locator("#devices tbody tr[data-device]").count() == 0
    page.evaluate("() => { window.__sameDocument = 'yes'; }")
    (dev,) = dash_fleet.enroll(["pi-spare-01"], tags={"site": "spare"}, groups=[])
    # The new device appears, online, in the filtered live table without a reload.
    row = page.locator("#devices tbody tr[data-device='pi-spare-01']")
    row.wait_for(timeout=20_000)
    page.locator("#count-online", has_text="1").wait_for(timeout=20_000)
    assert "online" in row.inner_text()
    # It says goodbye over MQTT (as an agent does on shutdown) and the page shows it offline.
    dev.client.publish(
        c.status_topic(dev.id), c.Status(device_id=dev.id, online=False).to_bytes(), qos=1, retain=True
    ).wait_for_publish(5)
    page.locator("#count-offline", has_text="1").wait_for(timeout=20_000)
    assert "offline" in row.inner_text()
    assert page.evaluate("() => window.__sameDocument") == "yes"
    tab.shot("13-overview-device-offline")
    dev.stop()


def test_live_page_goes_to_sign_in_when_the_session_ends(tab: Tab) -> None:
    page = tab.page
    page.goto("/audit?action=enrolled")
    ticks = live_ticks(tab)
    wait_for(lambda: live_ticks(tab) > ticks, timeout=10, what="a live update")
    # The session ends (cookie gone, as after it expires): the next live update takes us to sign-in,
    # and signing in brings us back to the same filtered page.
    tab.context.clear_cookies()
    page.wait_for_url(re.compile(r"/login\?next=%2Faudit%3Faction%3Denrolled$"), timeout=10_000)
    assert tab.errors == ["Failed to load resource: the server responded with a status of 401 (Unauthorized)"]
    tab.errors.clear()
    page.get_by_label("Admin token").fill(tab.fleet.token)
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()
    assert page.url.endswith("/audit?action=enrolled")
    assert page.locator("#audit tbody tr[data-action='enrolled']").count() >= 4


def test_a_transition_is_said_once_on_the_device_page(tab: Tab, dash_fleet: DashFleet) -> None:
    """The agent's transition events carry "idle -> downloading" as their message: the page shows the
    states once ("idle → downloading"), not "idle → downloading idle -> downloading"."""
    import datetime as dt

    from manifests import mqtt as c

    (dev,) = dash_fleet.enroll(["pi-events-01"], tags={"site": "events"}, groups=[])
    # enroll() connects in the background; publishing before CONNACK is refused at once by paho.
    assert dev.connected.wait(20), "the simulated device never connected"
    ts = dt.datetime.now(dt.timezone.utc)
    for seq, (a, b, msg) in enumerate(
        [("idle", "downloading", "idle -> downloading"), ("downloading", "failed", "disk full on slot b")], 1
    ):
        event = c.Event(device_id=dev.id, seq=seq, ts=ts, kind="transition", from_state=a, to_state=b, message=msg)
        dev.client.publish(c.events_topic(dev.id), event.to_bytes(), qos=1).wait_for_publish(5)
    page = tab.page
    page.goto(f"/devices/{dev.id}")
    page.locator("#events tbody tr", has_text="disk full").wait_for(timeout=20_000)
    events = page.locator("#events").inner_text()
    history = page.locator("#state-history").inner_text()
    for text in (events, history):
        assert "idle → downloading" in text and "idle -> downloading" not in text, text
        assert "disk full on slot b" in text, text  # a message that says more is kept
    dev.stop()
