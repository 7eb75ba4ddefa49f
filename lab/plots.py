"""Charts, described once and drawn two ways. A Chart is a title, two axis labels and its lines (Series:
points (x, y, band lo, band hi), the band a spread over seeds or an interval), one colour per label in every
chart:

    svg_chart(chart, colors)          inline SVG in a <figure>, for the HTML report (lab/report.py); no
                                      dependency
    svg_charts(chart, colors)         the same, at most LEGEND_MAX lines in a legend: the first ones drawn,
                                      the rest in more charts behind a toggle
    write_png(charts, path, colors)   one PNG, a row of panels, with matplotlib (experiments/compare.py's
                                      curves, the profile command's plot); matplotlib is optional: without it
                                      one line says so and no PNG is written

Read top to bottom: 1. the description, 2. SVG, 3. PNG.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from infra.cli import log

# ----------------------------------------------------------------------------------------------
# 1. A chart
# ----------------------------------------------------------------------------------------------
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


@dataclass
class Series:
    """One line: (x, y, band lo, band hi) points; the band is the spread over seeds, or an interval (None,
    None: no band at that point)."""

    label: str
    points: list


@dataclass(frozen=True)
class Chart:
    """One panel: its lines, and how the y axis reads (y_fixed: (lo, hi) or None for the data's range;
    percent: the values are rates, shown in %; note: a line printed under an SVG chart)."""

    title: str
    xlabel: str
    ylabel: str
    series: tuple
    y_fixed: tuple | None = None
    y_log: bool = False
    x_log: bool = False
    percent: bool = False
    note: str = ""


def color_map(labels) -> dict:
    """{label: colour}, one per distinct label in order (the palette repeats after 9; repeats are dashed)."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(dict.fromkeys(labels))}


def add_colors(colors: dict, series) -> dict:
    """`colors` with a colour for each series' label it lacks, the next in the palette."""
    for s in series:
        colors.setdefault(s.label, PALETTE[len(colors) % len(PALETTE)])
    return colors


def dashed(i: int) -> bool:
    """Whether the i-th line of a chart is dashed: past the palette, its colour is another line's."""
    return i >= len(PALETTE)


# ----------------------------------------------------------------------------------------------
# 2. SVG (the HTML report's charts; its CSS styles the classes used here)
# ----------------------------------------------------------------------------------------------
CHART_W, CHART_H, PAD_L, PAD_R, PAD_T, PAD_B = 430, 250, 54, 12, 12, 40


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= m * step)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def axis(lo: float, hi: float, a: float, b: float, log: bool):
    """A linear (or log10) map of [lo, hi] onto [a, b]."""
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    span = (hi - lo) or 1.0

    def f(v):
        return a + ((math.log10(max(v, 1e-300)) if log else v) - lo) / span * (b - a)

    return f


def tick_text(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.0e}"


def y_range(series, fixed, log: bool) -> tuple[float, float]:
    if fixed:
        return fixed
    values = [v for s in series for p in s.points for v in p[1:] if v is not None]
    if log:
        positive = [v for v in values if v > 0] or [1.0]
        return 10 ** math.floor(math.log10(min(positive))), 10 ** math.ceil(math.log10(max(positive)))
    lo, hi = min(values), max(values)
    ticks = nice_ticks(lo, hi if hi > lo else lo + 1)
    return min(ticks[0], lo), max(ticks[-1], hi)


def svg_axes(c: Chart, xs: list, y0: float, y1: float, fx, fy) -> list[str]:
    """The grid, the tick labels, the axis lines and both axis labels of a chart."""
    out = []
    if c.y_log:
        yt = [10**e for e in range(round(math.log10(y0)), round(math.log10(y1)) + 1)]
    else:
        yt = nice_ticks(y0, y1)
    for v in yt:
        y = fy(v)
        out.append(f'<line class="grid" x1="{PAD_L}" x2="{CHART_W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}"/>')
        label = tick_text(v * 100 if c.percent else v)
        out.append(f'<text x="{PAD_L - 5}" y="{y + 3:.1f}" text-anchor="end">{label}</text>')
    for v in xs if len(xs) <= 10 else nice_ticks(xs[0], xs[-1], 6):
        x = fx(v)
        out.append(f'<text x="{x:.1f}" y="{CHART_H - PAD_B + 14}" text-anchor="middle">{tick_text(v)}</text>')
    base = CHART_H - PAD_B
    out.append(f'<path class="ax" d="M{PAD_L} {PAD_T}V{base}H{CHART_W - PAD_R}"/>')
    out.append(
        f'<text x="{(PAD_L + CHART_W) / 2:.0f}" y="{CHART_H - 6}" text-anchor="middle">{esc(c.xlabel)}</text>'
    )
    out.append(
        f'<text transform="translate(13 {(PAD_T + base) / 2:.0f}) rotate(-90)" text-anchor="middle">'
        f"{esc(c.ylabel)}</text>"
    )
    return out


def svg_chart(c: Chart, colors: dict) -> str:
    """An SVG line chart in a <figure>: each series a line with a band (its spread) and a dot per point with
    its value as a tooltip; the legend is HTML under it."""
    xs = sorted({p[0] for s in c.series for p in s.points})
    y0, y1 = y_range(c.series, c.y_fixed, c.y_log)
    fx = axis(xs[0], xs[-1], PAD_L, CHART_W - PAD_R, c.x_log)
    fy = axis(y0, y1, CHART_H - PAD_B, PAD_T, c.y_log)
    svg = [
        f'<svg viewBox="0 0 {CHART_W} {CHART_H}" width="{CHART_W}" height="{CHART_H}" role="img" '
        f'aria-label="{esc(c.title)}">'
    ]
    svg += svg_axes(c, xs, y0, y1, fx, fy)
    for i, s in enumerate(c.series):
        svg.append(series_svg(s, colors[s.label], fx, fy, c.percent, dashed=dashed(i)))
    svg.append("</svg>")
    legend = "".join(
        f'<li><span class="sw" style="background:{colors[s.label]}"></span>{esc(s.label)}</li>'
        for s in c.series
    )
    note = f'<p class="note">{esc(c.note)}</p>' if c.note else ""
    caption = f"<figcaption>{esc(c.title)}</figcaption>"
    return f'<figure class="chart">{caption}{"".join(svg)}<ul class="legend">{legend}</ul>{note}</figure>'


LEGEND_MAX = 8  # lines in one chart's legend: more cannot be told apart


def svg_charts(c: Chart, colors: dict, first: int | None = None, most: int = LEGEND_MAX) -> str:
    """svg_chart of the first `first` series (all of them by default), at most `most` (the caller puts the
    ones to show first); the rest, `most` per chart with colours of their own, in a <details> toggle."""
    shown_n = min(len(c.series) if first is None else max(first, 1), most)
    if len(c.series) <= shown_n:
        return svg_chart(c, colors)
    rest = c.series[shown_n:]
    chunks = [rest[i : i + most] for i in range(0, len(rest), most)]
    more = "".join(svg_chart(replace(c, series=chunk), color_map(s.label for s in chunk)) for chunk in chunks)
    shown = svg_chart(replace(c, series=c.series[:shown_n]), colors)
    toggle = f'<details class="more"><summary>{len(rest)} more lines</summary>{more}</details>'
    return shown.removesuffix("</figure>") + toggle + "</figure>"


def series_svg(s: Series, color: str, fx, fy, percent: bool, dashed: bool) -> str:
    pts = sorted(s.points, key=lambda p: p[0])
    out = []
    band = [p for p in pts if p[2] is not None and p[3] is not None]
    if band:
        upper = " ".join(f"{fx(p[0]):.1f},{fy(p[3]):.1f}" for p in band)
        lower = " ".join(f"{fx(p[0]):.1f},{fy(p[2]):.1f}" for p in reversed(band))
        out.append(f'<polygon class="band" points="{upper} {lower}" fill="{color}"/>')
    line = " ".join(f"{fx(p[0]):.1f},{fy(p[1]):.1f}" for p in pts)
    dash = ' stroke-dasharray="5 3"' if dashed else ""
    out.append(f'<polyline points="{line}" stroke="{color}"{dash}><title>{esc(s.label)}</title></polyline>')
    if len(pts) <= 40:
        scale = 100 if percent else 1
        for x, y, lo, hi in pts:
            tip = f"{s.label}, {tick_text(x)}: {y * scale:.3g}"
            if lo is not None and hi is not None:
                tip += f" [{lo * scale:.3g}, {hi * scale:.3g}]"
            out.append(
                f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="2.6" fill="{color}">'
                f"<title>{esc(tip)}</title></circle>"
            )
    return "".join(out)


# ----------------------------------------------------------------------------------------------
# 3. PNG (matplotlib, optional)
# ----------------------------------------------------------------------------------------------
PANEL_SIZE = (4.2, 3.4)  # inches per panel
DPI = 100


def pyplot():
    """matplotlib.pyplot on its file-only backend, or None (and one line saying so) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    return plt


def draw_panel(ax, c: Chart, colors: dict):
    """One chart on a matplotlib axis: a line per series with a dot per point, and its band shaded."""
    scale = 100 if c.percent else 1
    for i, s in enumerate(c.series):
        pts = sorted(s.points, key=lambda p: p[0])
        style = "--" if dashed(i) else "-"
        x = [p[0] for p in pts]
        ax.plot(x, [scale * p[1] for p in pts], marker=".", color=colors[s.label], linestyle=style)
        band = [p for p in pts if p[2] is not None and p[3] is not None]
        if band:
            lo, hi = [scale * p[2] for p in band], [scale * p[3] for p in band]
            ax.fill_between([p[0] for p in band], lo, hi, alpha=0.15, color=colors[s.label])
    ax.set_title(c.title, fontsize=10)
    ax.set_xlabel(c.xlabel)
    ax.set_ylabel(c.ylabel)
    ax.set_xscale("log" if c.x_log else "linear")
    ax.set_yscale("log" if c.y_log else "linear")
    if c.y_fixed:
        ax.set_ylim(scale * c.y_fixed[0], scale * c.y_fixed[1])
    ax.grid(alpha=0.3)


def write_png(charts: list[Chart], path, colors: dict, title: str = "") -> bool:
    """The charts side by side in one PNG at `path` (written atomically), a legend naming every line drawn in
    the last panel; False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(
        1, len(charts), figsize=(PANEL_SIZE[0] * len(charts), PANEL_SIZE[1]), squeeze=False
    )
    for ax, c in zip(axes[0], charts):
        draw_panel(ax, c, colors)
    drawn = dict.fromkeys(s.label for c in charts for s in c.series)
    handles = [Line2D([], [], color=colors[label], marker=".", label=label) for label in drawn]
    if handles:
        axes[0][-1].legend(handles=handles, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return True
