"""One page for one job: its panels on a shared time axis, its decisions drawn across them,
as a PNG or as a self-contained HTML page (the same figure as inline SVG, plus a table of the
decisions). matplotlib (the `plot` extra) draws; nothing is fetched here."""

from __future__ import annotations

import datetime as dt
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from joule.report.model import LIMITS, Report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLOURS = {
    "power": "#1f77b4",
    "cap": "#d62728",
    "energy": "#2ca02c",
    "budget": "#d62728",
    "desired": "#7f7f7f",
    "target": "#ff7f0e",
    "ready": "#1f77b4",
    "throughput": "#9467bd",
    "limit": "#8c564b",
}
DECISION_COLOUR = "#17becf"
FORMATS = (".png", ".html")
DPI = 100
PANELS_KEY = "Joule-Panels"


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(
            "joule report draws with matplotlib: pip install 'joule[plot]'"
        ) from None
    return plt


def _when(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


def figure(report: Report) -> Figure:
    """The report's figure: one axis per panel, titled as the panel, sharing the time axis."""
    plt = _pyplot()
    from matplotlib import dates

    titles = list(report.panels)
    fig, axes = plt.subplots(
        len(titles), 1, sharex=True, figsize=(11, 2.2 * len(titles) + 1.2), squeeze=False
    )
    fig.suptitle(
        f"TrainingJob {report.namespace}/{report.job}: {_when(report.start):%Y-%m-%d %H:%M:%S} "
        f"to {_when(report.end):%H:%M:%S} UTC ({report.source})",
        fontsize=11,
    )
    for ax, title in zip(axes[:, 0], titles, strict=True):
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(True, alpha=0.3)
        drawn = False
        for line in report.panels[title]:
            if not line.times:
                continue
            drawn = True
            style = {"linestyle": "--", "drawstyle": "steps-post"} if line.name in LIMITS else {}
            if line.name in ("desired", "target", "ready", "limit"):
                style["drawstyle"] = "steps-post"
            ax.plot(
                [_when(t) for t in line.times], line.values, label=line.name,
                color=COLOURS.get(line.name), marker="o" if len(line.times) == 1 else None,
                linewidth=1.6, **style,
            )  # fmt: skip
        if drawn:
            ax.legend(loc="upper left", fontsize=8, frameon=False)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="#888888")
        for d in report.decisions:
            ax.axvline(_when(d.time), color=DECISION_COLOUR, linewidth=1.5, antialiased=False)
    top = axes[0, 0]
    for d in report.decisions:
        label = d.reason if d.count == 1 else f"{d.reason} x{d.count}"
        top.annotate(
            label, (_when(d.time), 1.0), xycoords=("data", "axes fraction"), rotation=90,
            fontsize=7, va="top", ha="right", color="#0b6e7a",
        )  # fmt: skip
    bottom = axes[-1, 0]
    bottom.set_xlim(_when(shown_from(report)), _when(report.end))
    bottom.xaxis.set_major_formatter(dates.DateFormatter("%H:%M:%S", tz=dt.UTC))
    bottom.set_xlabel("time (UTC)")
    if report.notes:
        fig.text(0.01, 0.005, "\n".join(report.notes), fontsize=8, color="#555555", va="bottom")
    fig.tight_layout(rect=(0, 0.02 + 0.015 * len(report.notes), 1, 0.97))
    return fig


def shown_from(report: Report) -> float:
    """Where the time axis starts: the window's start, or just before the first point or
    decision where the job's data begins later (a job younger than --since would otherwise
    be squeezed against the right edge)."""
    times = [t for lines in report.panels.values() for line in lines for t in line.times]
    times += [d.time for d in report.decisions]
    if not times:
        return report.start
    first = min(times)
    margin = max(0.03 * (report.end - first), 5.0)
    return max(report.start, first - margin)


def write(report: Report, path: Path) -> Path:
    """The report as ``path``: .png or .html."""
    if path.suffix not in FORMATS:
        raise ValueError(f"{path}: the report is written as .png or .html")
    fig = figure(report)
    try:
        if path.suffix == ".png":
            fig.canvas.draw()  # the layout is final: the panels' places can be measured
            fig.savefig(
                path,
                dpi=DPI,
                metadata={
                    "Title": f"Joule report: {report.namespace}/{report.job}",
                    PANELS_KEY: json.dumps(panel_boxes(fig, report)),
                },
            )
        else:
            svg = io.StringIO()
            fig.savefig(svg, format="svg")
            path.write_text(page(report, svg.getvalue()))
    finally:
        _pyplot().close(fig)
    return path


def panel_boxes(fig: Figure, report: Report) -> dict[str, list[int]]:
    """Each panel's plot area in the PNG, in pixels: [left, top, right, bottom]. Kept in the
    PNG's text (``PANELS_KEY``), so that a reader (a test) can find each panel."""
    height = fig.get_figheight() * DPI
    boxes = {}
    for ax, title in zip(fig.axes, report.panels, strict=False):
        x0, y0, x1, y1 = ax.get_window_extent().extents * (DPI / fig.dpi)
        boxes[title] = [round(x0), round(height - y1), round(x1), round(height - y0)]
    return boxes


def page(report: Report, svg: str) -> str:
    """A self-contained HTML page: the figure (inline SVG), the data's source and notes, and
    every decision with its message."""
    name = html.escape(f"{report.namespace}/{report.job}")
    rows = "\n".join(
        f"<tr><td>{_when(d.time):%Y-%m-%d %H:%M:%S}</td><td>{html.escape(d.reason)}</td>"
        f"<td>{d.count}</td><td>{html.escape(d.message)}</td></tr>"
        for d in report.decisions
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    body = svg[svg.index("<svg") :]  # the figure without its XML prologue
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Joule report: {name}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }}
.figure svg {{ max-width: 100%; height: auto; }}
</style></head>
<body>
<h1>TrainingJob {name}</h1>
<p>Data: {html.escape(report.source)}. Times in UTC.</p>
<ul>{notes}</ul>
<div class="figure">{body}</div>
<h2>Decisions ({len(report.decisions)})</h2>
<table><tr><th>time</th><th>reason</th><th>count</th><th>message</th></tr>
{rows}
</table>
</body></html>
"""
