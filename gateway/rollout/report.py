"""The rollout report: four panels over time, and one self-contained HTML page holding them.

Panels, all on the same UTC time axis, with the controller's decisions drawn as vertical
lines (green promote, red rollback, grey hold; dashed when not applied):
  1. p50 (dashed) and p99 (solid) latency per arm;
  2. error rate (fallback answers) per arm;
  3. accuracy delta of each challenger against the champion, on joined labels;
  4. traffic share per arm, stacked.

Matplotlib runs headless (Agg, set on the figure, never `pyplot`), with a fixed size and dpi,
so a figure's pixel size is known and the same data draws the same picture. The HTML page
embeds every image as a base64 `data:` URI and has no external reference: it can be mailed,
archived or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from datetime import UTC, datetime

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
from matplotlib.figure import Figure

from gateway.rollout.report_data import ReportData

DPI = 100
PANEL_SIZE = (10.0, 3.2)  # inches: 1000 x 320 px per panel
COMBINED_SIZE = (10.0, 12.0)  # inches: 1000 x 1200 px for --png
_ACTION_COLOURS = {"promote": "tab:green", "rollback": "tab:red", "hold": "tab:gray"}
_ARM_COLOURS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")

Draw = Callable[[Axes, ReportData], None]


def _day(ts: float) -> float:
    """Epoch seconds -> matplotlib's date number (days), UTC."""
    return float(date2num(datetime.fromtimestamp(ts, UTC)))


def _times(data: ReportData) -> list[float]:
    return [_day(t + data.bucket_s / 2) for t in data.starts]  # bucket midpoints


def _colour(data: ReportData, arm: str) -> str:
    names = [a.arm for a in data.arms]
    return _ARM_COLOURS[names.index(arm) % len(_ARM_COLOURS)]


def _mark_decisions(ax: Axes, data: ReportData, labels: bool) -> None:
    for d in data.decisions:
        when = _day(d.ts)
        colour = _ACTION_COLOURS.get(d.action, "black")
        ax.axvline(when, color=colour, linestyle="-" if d.applied else ":", linewidth=1.2)
        if labels:
            text = f"{d.action} {d.from_weight:g}\u2192{d.to_weight:g} %"
            ax.annotate(text, (when, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                        fontsize=7, color=colour, ha="right", va="top")  # fmt: skip


def _none_to_nan(values: tuple[float | None, ...], scale: float = 1.0) -> list[float]:
    return [float("nan") if v is None else v * scale for v in values]


def _legend(ax: Axes) -> None:
    # outside, on the right: the decision labels run along the top of the plot area
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def draw_latency(ax: Axes, data: ReportData) -> None:
    t = _times(data)
    for a in data.arms:
        c = _colour(data, a.arm)
        ax.plot(t, _none_to_nan(a.p99_ms), color=c, marker=".", label=f"{a.arm} p99")
        ax.plot(t, _none_to_nan(a.p50_ms), color=c, linestyle="--", label=f"{a.arm} p50")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{data.model}: p50 and p99 latency per arm", loc="left", fontsize=10)
    _mark_decisions(ax, data, labels=True)
    _legend(ax)


def draw_errors(ax: Axes, data: ReportData) -> None:
    t = _times(data)
    for a in data.arms:
        ax.plot(t, _none_to_nan(a.error_rate, 100), color=_colour(data, a.arm), marker=".",
                label=a.arm)  # fmt: skip
    ax.set_ylabel("error rate (%)")
    ax.set_title("error rate (answered by a fallback)", loc="left", fontsize=10)
    _mark_decisions(ax, data, labels=False)
    _legend(ax)


def draw_accuracy(ax: Axes, data: ReportData) -> None:
    t = _times(data)
    drawn = False
    for a in data.arms:
        if a.arm == "champion":
            continue
        delta = _none_to_nan(data.accuracy_delta(a), 100)
        ax.plot(t, delta, color=_colour(data, a.arm), marker=".", label=f"{a.arm} - champion")
        drawn = True
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_ylabel("accuracy delta (pp)")
    ax.set_title("accuracy delta on joined labels", loc="left", fontsize=10)
    _mark_decisions(ax, data, labels=False)
    if drawn:
        _legend(ax)


def draw_share(ax: Axes, data: ReportData) -> None:
    t = _times(data)
    shares = [[0.0 if v is None else v * 100 for v in a.share] for a in data.arms]
    ax.stackplot(t, *shares, labels=[a.arm for a in data.arms],
                 colors=[_colour(data, a.arm) for a in data.arms], alpha=0.7)  # fmt: skip
    ax.set_ylim(0, 100)
    ax.set_ylabel("traffic share (%)")
    ax.set_title("traffic share per arm", loc="left", fontsize=10)
    _mark_decisions(ax, data, labels=False)
    _legend(ax)


PANELS: tuple[tuple[str, Draw], ...] = (
    ("Latency: champion against challenger, p50 and p99", draw_latency),
    ("Error rate", draw_errors),
    ("Accuracy delta", draw_accuracy),
    ("Traffic share", draw_share),
)


def _axis(ax: Axes) -> None:
    locator = AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.grid(True, alpha=0.3)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No bbox_inches="tight": the pixel size stays figsize x dpi. No Software/date metadata.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def panel_pngs(data: ReportData) -> list[tuple[str, bytes]]:
    out = []
    for title, draw in PANELS:
        fig = Figure(figsize=PANEL_SIZE)
        # fixed margins, not a layout engine: half the render time, and the same geometry
        # whatever the labels (the legend sits in the right-hand margin)
        fig.subplots_adjust(left=0.07, right=0.79, bottom=0.14, top=0.9)
        ax = fig.add_subplot()
        draw(ax, data)
        _axis(ax)
        out.append((title, _png(fig)))
    return out


def combined_png(data: ReportData) -> bytes:
    """Every panel in one picture (`--png`), sharing the time axis."""
    fig = Figure(figsize=COMBINED_SIZE)
    fig.subplots_adjust(left=0.07, right=0.79, bottom=0.04, top=0.94, hspace=0.25)
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    for ax, (_, draw) in zip(axes, PANELS, strict=True):
        draw(ax, data)
        _axis(ax)
    fig.suptitle(f"Rollout report: {data.model} (UTC)", fontsize=12)
    return _png(fig)


def html_page(data: ReportData, images: list[tuple[str, bytes]]) -> str:
    esc = html.escape

    def fmt(v: float | None, spec: str, scale: float = 1.0) -> str:
        return "-" if v is None else format(v * scale, spec)

    def when(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")

    arm_rows = "".join(
        f"<tr><td>{esc(t.arm)}</td><td>{esc(', '.join(t.versions))}</td><td>{t.count}</td>"
        f"<td>{fmt(t.p50_ms, '.2f')}</td><td>{fmt(t.p99_ms, '.2f')}</td>"
        f"<td>{fmt(t.error_rate, '.3f', 100)}</td><td>{t.labelled}</td>"
        f"<td>{fmt(t.accuracy, '.2f', 100)}</td></tr>"
        for t in data.totals
    )
    decision_rows = (
        "".join(
            f"<tr><td>{when(d.ts)}</td><td>{esc(d.action)}</td>"
            f"<td>{d.from_weight:g} \u2192 {d.to_weight:g} %</td>"
            f"<td>{'dry run' if d.dry_run else ('applied' if d.applied else 'not applied')}</td>"
            f"<td>{esc(d.reason)}</td></tr>"
            for d in data.decisions
        )
        or '<tr><td colspan="5">no decision records</td></tr>'
    )
    figures = "".join(
        f'<figure><img alt="{esc(title)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{esc(title)}</figcaption></figure>"
        for title, png in images
    )
    span = f"{when(data.starts[0])} to {when(data.starts[-1] + data.bucket_s)} UTC"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Rollout report: {esc(data.model)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1040px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; }}
</style></head><body>
<h1>Rollout report: {esc(data.model)}</h1>
<p>{span}; buckets of {data.bucket_s:g} s. Error rate counts answers a fallback gave;
accuracy uses joined labels, fallback answers excluded. Decisions are vertical lines: green
promote, red rollback, grey hold, dotted when not applied.</p>
<h2>Arms</h2>
<table><tr><th>arm</th><th>versions</th><th>answers</th><th>p50 ms</th><th>p99 ms</th>
<th>error %</th><th>labelled</th><th>accuracy %</th></tr>{arm_rows}</table>
<h2>Controller decisions</h2>
<table><tr><th>time (UTC)</th><th>action</th><th>weight</th><th>state</th><th>first reason</th>
</tr>{decision_rows}</table>
{figures}
</body></html>
"""
