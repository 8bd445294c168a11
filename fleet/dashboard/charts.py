"""Charts: the server renders each chart's numbers and its text alternative; Chart.js (vendored in
``static/chart.umd.min.js``, no CDN, no eval: the strict CSP stays) draws them in the browser
(``static/charts.js``).

Every chart is a ``<div role="img">`` with an ``aria-label`` that states the numbers in words (what a
screen reader, and a test, reads), its data as a JSON block (not executable: the CSP is unaffected) and a
``<details>`` table of the same numbers, so the page says everything without JavaScript too. A model
version has one colour on every chart and page (``version_colour``). The wave progress bars stay
server-drawn SVG: they are progress indicators, not charts.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

from markupsafe import Markup

# Colour-blind-safe palette (Okabe-Ito, without its yellow: too pale on white), indexed by model version.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000")
NO_VERSION_COLOUR = "#9A9A9A"
STATE_COLOURS = {
    "succeeded": "#009E73",
    "in_flight": "#0072B2",
    "rolling_back": "#56B4E9",
    "failed": "#D55E00",
    "rollback_failed": "#A83A00",
    "rolled_back": "#CC79A7",
    "skipped": "#9A9A9A",
    "unfit": "#E69F00",
    "pending": "#DADADA",
}
_VERSION = re.compile(r"@(\d+)$")


def version_colour(label: str | None) -> str:
    """The colour of a model version ("name@3"), the same on every chart: version 1 the first palette
    colour, version 2 the second, and so on; anything without a version is grey."""
    m = _VERSION.search(label or "")
    return PALETTE[(int(m.group(1)) - 1) % len(PALETTE)] if m else NO_VERSION_COLOUR


@dataclass
class Series:
    label: str
    points: list[tuple[dt.datetime, float]] = field(default_factory=list)


def fmt_num(v: float | None, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    a = abs(v)
    if unit == "B":
        for u, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if a >= div:
                return f"{v / div:.1f} {u}"
        return f"{v:.0f} B"
    s = f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"
    return f"{s} {unit}".strip()


def _json_block(doc: object) -> str:
    # Inside <script type="application/json"> no "<" may appear raw ("</script>", "<!--" would end or
    # change the element): JSON's \u escapes keep the same value.
    text = json.dumps(doc, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _chart(kind: str, label: str, title: str, doc: dict[str, object], attrs: str, table: str) -> Markup:
    return Markup(
        f'<div class="chart chart-{kind}" role="img" aria-label="{escape(label)}" data-chart="{kind}"{attrs}>'
        f'<canvas aria-hidden="true"></canvas>'
        f'<script type="application/json" class="chart-data">{_json_block({"title": title, **doc})}</script>'
        f"</div>"
        f'<details class="chart-numbers"><summary>The numbers</summary><div class="scroll">{table}</div></details>'
    )


def empty_chart(title: str, message: str = "no data yet") -> Markup:
    return Markup(
        f'<div class="chart chart-empty" role="img" aria-label="{escape(f"{title}: {message}")}" '
        f'data-points="0"><p class="muted">{escape(message)}</p></div>'
    )


def line_chart(title: str, series: Sequence[Series], unit: str = "") -> Markup:
    """A time-series line chart; one line per series (one per model version, coloured by version)."""
    clean = [
        (s, sorted((p for p in s.points if p[1] is not None and not math.isnan(p[1])), key=lambda p: p[0]))
        for s in series
    ]
    pts = [p for _, sp in clean for p in sp]
    if not pts:
        return empty_chart(title)
    latest = max(pts, key=lambda p: p[0])
    label = (
        f"{title}: {len(pts)} samples, min {fmt_num(min(p[1] for p in pts), unit)}, "
        f"max {fmt_num(max(p[1] for p in pts), unit)}, latest {fmt_num(latest[1], unit)}"
    )
    doc = {
        "unit": unit,
        "series": [
            {
                "label": s.label,
                "colour": version_colour(s.label),
                "points": [[round(t.timestamp() * 1000), v] for t, v in sp],
            }
            for s, sp in clean
            if sp
        ],
    }
    rows = "".join(
        f"<tr><td>{escape(s.label)}</td><td>{len(sp)}</td><td>{fmt_num(min(v for _, v in sp), unit)}</td>"
        f"<td>{fmt_num(max(v for _, v in sp), unit)}</td><td>{fmt_num(sp[-1][1], unit)}</td></tr>"
        for s, sp in clean
        if sp
    )
    table = (
        '<table class="chart-table"><thead><tr><th scope="col">Model</th><th scope="col">Samples</th>'
        f'<th scope="col">Min</th><th scope="col">Max</th><th scope="col">Latest</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )
    return _chart("line", label, title, doc, f' data-points="{len(pts)}"', table)


def before_after_chart(
    title: str,
    rows: Sequence[tuple[str, float | None, float | None]],
    unit: str = "",
    labels: tuple[str, str] = ("before", "after"),
    versions: tuple[str | None, str | None] = (None, None),
) -> Markup:
    """Grouped horizontal bars: for each device, its value before and after the update. ``versions``
    (e.g. ("m@1", "m@2")) colour the bars like that version's lines everywhere else."""
    rows = [r for r in rows if r[1] is not None or r[2] is not None]
    if not rows:
        return empty_chart(title, "no updated device has reported telemetry yet")
    words = "; ".join(f"{d}: {labels[0]} {fmt_num(b, unit)}, {labels[1]} {fmt_num(a, unit)}" for d, b, a in rows)
    colours = [
        version_colour(v) if v else default for v, default in zip(versions, (PALETTE[4], PALETTE[0]), strict=True)
    ]
    doc = {
        "unit": unit,
        "devices": [d for d, _, _ in rows],
        "series": [{"label": labels[i], "colour": colours[i], "values": [r[i + 1] for r in rows]} for i in (0, 1)],
    }

    def cell(v: float | None) -> str:
        return f'<td class="bar" data-value="{"" if v is None else f"{v:.4g}"}">{fmt_num(v, unit)}</td>'

    body = "".join(f'<tr><th scope="row">{escape(d)}</th>{cell(b)}{cell(a)}</tr>' for d, b, a in rows)
    table = (
        f'<table class="chart-table"><thead><tr><th scope="col">Device</th><th scope="col">{escape(labels[0])}</th>'
        f'<th scope="col">{escape(labels[1])}</th></tr></thead><tbody>{body}</tbody></table>'
    )
    attrs = f' data-rows="{len(rows)}" data-points="{len(rows)}"'
    return _chart("bars", f"{title}. {words}", title, doc, attrs, table)


ORDER = (
    "succeeded",
    "failed",
    "rollback_failed",
    "rolled_back",
    "rolling_back",
    "in_flight",
    "skipped",
    "unfit",
    "pending",
)


def stacked_bar(counts: dict[str, int], label: str, width: int = 400, height: int = 18) -> Markup:
    """One wave's progress: a bar split by target state, with the counts in words for screen readers."""
    total = sum(counts.values())
    done = sum(counts.get(k, 0) for k in ("succeeded", "failed", "skipped", "rolled_back", "rollback_failed", "unfit"))
    words = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in ORDER if counts.get(k))
    aria = f"{label}: {done} of {total} finished" + (f" ({words})" if words else "")
    out = [
        f'<svg class="wavebar" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(aria)}" '
        f'preserveAspectRatio="none" data-total="{total}" data-done="{done}">'
        f"<title>{escape(aria)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="{STATE_COLOURS["pending"]}"/>',
    ]
    x = 0.0
    for k in ORDER:
        n = counts.get(k, 0)
        if not n or k == "pending" or not total:
            continue
        w = n / total * width
        out.append(
            f'<rect x="{x:.2f}" y="0" width="{w:.2f}" height="{height}" fill="{STATE_COLOURS[k]}" '
            f'data-state="{k}" data-count="{n}"/>'
        )
        x += w
    out.append("</svg>")
    return Markup("".join(out))
