"""Charts drawn on the server as inline SVG: no chart library, no JavaScript, nothing from a CDN.

Every chart is an ``<svg role="img">`` with a ``<title>`` and an ``aria-label`` that states the numbers
in words, so a screen reader (and a test) can read what the picture shows. Sizes are in the viewBox only;
CSS makes the chart as wide as its container, which keeps the pages usable at phone width.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

from markupsafe import Markup

# Colour-blind-safe palette (Okabe-Ito), one colour per series.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
STATE_COLOURS = {
    "succeeded": "#009E73",
    "in_flight": "#0072B2",
    "rolling_back": "#56B4E9",
    "failed": "#D55E00",
    "rollback_failed": "#A83A00",
    "rolled_back": "#CC79A7",
    "skipped": "#9A9A9A",
    "pending": "#DADADA",
}


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


def _nice_range(lo: float, hi: float) -> tuple[float, float]:
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.08
    lo2 = lo - pad
    if lo >= 0 and lo2 < 0:
        lo2 = 0.0
    return lo2, hi + pad


def _svg_open(width: int, height: int, label: str, title: str, klass: str, extra: str = "") -> str:
    return (
        f'<svg class="chart {klass}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(label)}" preserveAspectRatio="xMidYMid meet"{extra}>'
        f"<title>{escape(title)}</title>"
    )


def empty_chart(title: str, message: str = "no data yet", width: int = 640, height: int = 200) -> Markup:
    svg = _svg_open(width, height, f"{title}: {message}", title, "chart-empty", ' data-points="0"')
    svg += (
        f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" class="frame"/>'
        f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="muted">{escape(message)}</text>'
        "</svg>"
    )
    return Markup(svg)


def line_chart(
    title: str, series: Sequence[Series], unit: str = "", width: int = 640, height: int = 200
) -> Markup:
    """A time-series line chart; one line per series (e.g. one per model version)."""
    pts = [p for s in series for p in s.points if p[1] is not None and not math.isnan(p[1])]
    if not pts:
        return empty_chart(title, width=width, height=height)
    ml, mr, mt, mb = 58, 12, 12, 34
    pw, ph = width - ml - mr, height - mt - mb
    t0 = min(p[0] for p in pts).timestamp()
    t1 = max(p[0] for p in pts).timestamp()
    if t1 == t0:
        t0, t1 = t0 - 1, t1 + 1
    lo, hi = _nice_range(min(p[1] for p in pts), max(p[1] for p in pts))

    def x(t: dt.datetime) -> float:
        return ml + (t.timestamp() - t0) / (t1 - t0) * pw

    def y(v: float) -> float:
        return mt + ph - (v - lo) / (hi - lo) * ph

    latest = max(pts, key=lambda p: p[0])
    label = (
        f"{title}: {len(pts)} samples, min {fmt_num(min(p[1] for p in pts), unit)}, "
        f"max {fmt_num(max(p[1] for p in pts), unit)}, latest {fmt_num(latest[1], unit)}"
    )
    out = [_svg_open(width, height, label, title, "chart-line", f' data-points="{len(pts)}"')]
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" class="frame"/>')
    for frac in (0.0, 0.5, 1.0):
        v = lo + (hi - lo) * frac
        yy = y(v)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{yy:.1f}" y2="{yy:.1f}" class="grid"/>')
        out.append(
            f'<text x="{ml - 6}" y="{yy + 4:.1f}" text-anchor="end" class="tick">{fmt_num(v, unit)}</text>'
        )
    for t, anchor in ((t0, "start"), (t1, "end")):
        label_t = dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%H:%M:%S")
        xx = ml if anchor == "start" else ml + pw
        out.append(f'<text x="{xx}" y="{height - 12}" text-anchor="{anchor}" class="tick">{label_t}</text>')
    for i, s in enumerate(series):
        sp = sorted((p for p in s.points if p[1] is not None and not math.isnan(p[1])), key=lambda p: p[0])
        if not sp:
            continue
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in sp)
        if len(sp) > 1:
            out.append(
                f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2" '
                f'class="series" data-series="{escape(s.label)}" data-count="{len(sp)}"/>'
            )
        # The last point is drawn as a dot, so a single sample still shows.
        t, v = sp[-1]
        out.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>')
    # Legend, top right inside the plot.
    if len(series) > 1 or (series and series[0].label):
        lx = ml + 8
        for i, s in enumerate(series):
            colour = PALETTE[i % len(PALETTE)]
            out.append(f'<rect x="{lx}" y="{mt + 6}" width="10" height="10" fill="{colour}"/>')
            out.append(f'<text x="{lx + 14}" y="{mt + 15}" class="legend">{escape(s.label)}</text>')
            lx += 22 + 7 * len(s.label)
    out.append("</svg>")
    return Markup("".join(out))


def before_after_chart(
    title: str,
    rows: Sequence[tuple[str, float | None, float | None]],
    unit: str = "",
    labels: tuple[str, str] = ("before", "after"),
    width: int = 640,
) -> Markup:
    """Grouped horizontal bars: for each device, its value before and after the update."""
    rows = [r for r in rows if r[1] is not None or r[2] is not None]
    if not rows:
        return empty_chart(title, "no updated device has reported telemetry yet", width=width, height=80)
    bar, gap, ml, mr, mt = 12, 10, 110, 70, 28
    height = mt + len(rows) * (2 * bar + gap) + 8
    vmax = max((v for r in rows for v in r[1:] if v is not None), default=1.0) or 1.0
    pw = width - ml - mr
    words = "; ".join(
        f"{d}: {labels[0]} {fmt_num(b, unit)}, {labels[1]} {fmt_num(a, unit)}" for d, b, a in rows
    )
    out = [
        _svg_open(
            width,
            height,
            f"{title}. {words}",
            title,
            "chart-bars",
            f' data-rows="{len(rows)}" data-points="{len(rows)}"',
        )
    ]
    for i, (name, colour) in enumerate(zip(labels, (PALETTE[4], PALETTE[0]), strict=True)):
        lx = ml + i * 90
        out.append(f'<rect x="{lx}" y="6" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 14}" y="15" class="legend">{escape(name)}</text>')
    for i, (device, before, after) in enumerate(rows):
        y0 = mt + i * (2 * bar + gap)
        out.append(
            f'<text x="{ml - 6}" y="{y0 + bar + 4}" text-anchor="end" class="tick">{escape(device)}</text>'
        )
        for j, (v, colour) in enumerate(((before, PALETTE[4]), (after, PALETTE[0]))):
            yy = y0 + j * bar
            w = 0.0 if v is None else max(1.0, v / vmax * pw)
            out.append(
                f'<rect x="{ml}" y="{yy}" width="{w:.1f}" height="{bar - 2}" fill="{colour}" '
                f'class="bar" data-value="{"" if v is None else f"{v:.4g}"}"/>'
            )
            out.append(
                f'<text x="{ml + w + 4:.1f}" y="{yy + bar - 3}" class="tick">{fmt_num(v, unit)}</text>'
            )
    out.append("</svg>")
    return Markup("".join(out))


ORDER = (
    "succeeded",
    "failed",
    "rollback_failed",
    "rolled_back",
    "rolling_back",
    "in_flight",
    "skipped",
    "pending",
)


def stacked_bar(counts: dict[str, int], label: str, width: int = 400, height: int = 18) -> Markup:
    """One wave's progress: a bar split by target state, with the counts in words for screen readers."""
    total = sum(counts.values())
    done = sum(counts.get(k, 0) for k in ("succeeded", "failed", "skipped", "rolled_back", "rollback_failed"))
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
