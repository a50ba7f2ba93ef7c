"""Server-rendered HTML for the status page and ``freeal report``: tables and inline SVG plots, no JavaScript,
nothing loaded from another host. Every value from a run or a project is escaped."""
from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Collection, Sequence
from html import escape
from typing import Any

from freeal_backend.status import stage_title

COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
          "#bab0ac"]
FLAGGED_COLOR, CLEAN_COLOR = "#e15759", "#4e79a7"
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:14px;margin:6px 0} th,td{padding:4px 10px;border-bottom:1px solid #eee;
text-align:right;vertical-align:top} th{background:#f6f6f6} td.l,th.l{text-align:left}
.bar{background:#eee;border-radius:4px;height:18px;width:420px;overflow:hidden;display:inline-block;
vertical-align:middle} .bar>span{display:block;background:#4e79a7;height:100%} .muted{color:#777} .err{color:#b00020}
.state{display:inline-block;padding:1px 8px;border-radius:10px;background:#eee;font-weight:600}
.state.running,.state.queued{background:#dbe9f6} .state.done{background:#dff0d8} .state.failed{background:#f8d7da}
.plots{display:flex;flex-wrap:wrap;gap:18px} svg{background:#fff;border:1px solid #eee}
td.text{text-align:left;max-width:560px;white-space:pre-wrap;word-break:break-word}
"""
DASH = "—"


def e(value: Any) -> str:
    """Escaped text of any value; None shows as a dash."""
    return DASH if value is None else escape(str(value), quote=True)


def num(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else e(value)


def pct(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.1f}%"


def duration(seconds: float | None) -> str:
    """``1 h 05 min``, ``4 min 10 s``, ``12 s``."""
    if seconds is None:
        return DASH
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _stage(stage: str | None) -> str:
    return DASH if not stage else e(stage_title(stage))


def when(ts: float | None) -> str:
    return DASH if ts is None else _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# plots ------------------------------------------------------------------------------------------------
def nice_ceiling(value: float) -> float:
    """The smallest 4 x (a round step) at or above ``value``: the axis ticks at quarters stay round numbers."""
    if value <= 0:
        return 1.0
    step = value / 4
    base = 10 ** math.floor(math.log10(step))
    return 4 * next(m * base for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * base >= step - 1e-12)


def _wrapped(text: str, x: float, y: float, width: int = 16) -> str:
    """A category label as up to two centred lines of about ``width`` characters."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    lines = lines[:2] if len(lines) <= 2 else [lines[0], (" ".join(lines[1:]))[: width - 1] + "…"]
    spans = "".join(f'<tspan x="{x:.1f}" dy="{0 if i == 0 else 12}">{e(line[:width + 4])}</tspan>'
                    for i, line in enumerate(lines))
    return f'<text x="{x:.1f}" y="{y}" text-anchor="middle" font-size="10">{spans}</text>'


def bar_chart(categories: Sequence[str], series: Sequence[tuple[str, Sequence[float], str]], *, title: str,
              y_max: float | None = None, percent: bool = False, width: int = 520, height: int = 240) -> str:
    """Grouped bar chart as inline SVG: one group per category, one bar per ``(name, values, color)`` series."""
    left, right, top, bottom = 52, 12, 30, 58
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = y_max if y_max is not None else nice_ceiling(max([v for _, vals, _ in series for v in vals] + [0]))
    fmt = (lambda v: f"{100 * v:.0f}%") if percent else (lambda v: f"{v:,.0f}" if v >= 10 else f"{v:g}")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{e(title)}"><title>{e(title)}</title>',
           f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13" font-weight="600">{e(title)}</text>']
    for i in range(5):
        v = peak * i / 4
        y = top + plot_h - plot_h * i / 4
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{e(fmt(v))}</text>')
    group_w = plot_w / max(1, len(categories))
    bar_w = group_w * 0.8 / max(1, len(series))
    for c, cat in enumerate(categories):
        x0 = left + c * group_w + group_w * 0.1
        for s, (name, vals, color) in enumerate(series):
            v = vals[c] if c < len(vals) else 0
            h = plot_h * min(v, peak) / peak
            out.append(f'<rect x="{x0 + s * bar_w:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                       f'height="{h:.1f}" fill="{color}"><title>{e(name)} · {e(cat)}: {e(fmt(v))}</title></rect>')
        out.append(_wrapped(cat, x0 + group_w * 0.4, top + plot_h + 14))
    x = left
    for name, _, color in series:
        out.append(f'<rect x="{x}" y="{height - 16}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{x + 14}" y="{height - 7}" font-size="11">{e(name[:24])}</text>')
        x += 24 + 7 * min(len(name), 24)
    out.append("</svg>")
    return "".join(out)


def histogram_svg(final: dict[str, Any]) -> str:
    """Final-score histogram of the machine-labelled texts, flagged vs not."""
    hist = final["histogram"]
    bins = len(hist["flagged"])
    cats = [f"{i / bins:.1f}–{(i + 1) / bins:.1f}" for i in range(bins)]
    series = [("not flagged", hist["not_flagged"], CLEAN_COLOR), ("flagged", hist["flagged"], FLAGGED_COLOR)]
    return bar_chart(cats, series,
                     title="Final score (confidence) of machine labels")


def labels_per_round_svg(labels: Sequence[str], rounds: Sequence[dict[str, Any]]) -> str:
    """Texts per class after each round's LLM labels."""
    names = list(labels) + sorted({k for r in rounds for k in r["label_counts"]} - set(labels))
    series = [(f"round {r['round']}", [r["label_counts"].get(lab, 0) for lab in names], COLORS[i % len(COLORS)])
              for i, r in enumerate(rounds)]
    return bar_chart(names, series, title="Texts per label after each round")


def accuracy_svg(accuracy: Sequence[dict[str, Any]]) -> str:
    """Accuracy against gold per stage."""
    rows = [a for a in accuracy if a["accuracy"] is not None]
    return bar_chart([a["title"] for a in rows], [("accuracy", [a["accuracy"] for a in rows], COLORS[2])],
                     title="Accuracy against gold per stage", y_max=1.0, percent=True, width=680)


# sections -----------------------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: Collection[int] = (0,)) -> str:
    """A table of already-escaped cells; the columns in ``left`` (text) are left-aligned, the rest (numbers) right."""
    head = "".join(f'<th class="{"l" if i in left else ""}">{h}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i in left else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def job_section(job: dict[str, Any]) -> str:
    """State, stage, round x of y, progress bar with done/total, rate and ETA, last error."""
    width = min(100.0, job["percent"] or 0.0)
    rnd = f"round {num(job['round'])} of {num(job['rounds'])}" if job.get("rounds") is not None else DASH
    rate = f"{job['rate_per_s']:.2f}/s" if job.get("rate_per_s") else DASH
    share = DASH if job["percent"] is None else f"{job['percent']:.1f}%"
    parts = [f'<p><span class="state {e(job["state"])}" id="job-state">{e(job["state"])}</span> '
             f'<span id="job-stage">{_stage(job["stage"])}</span> · <span id="job-round">{rnd}</span></p>',
             f'<p><span class="bar"><span style="width:{width:.1f}%"></span></span> '
             f'<span id="job-progress">{num(job["done"])} / {num(job["total"])}</span>'
             f' ({share}) · rate {rate} · '
             f'ETA <span id="job-eta">{duration(job["eta_s"])}</span></p>',
             f'<p class="muted">started {when(job["started"])} · elapsed {duration(job["elapsed_s"])}'
             f' · finished {when(job["finished"])} · model version {e(job["model_version"])}'
             f'{" · a rerun is queued" if job.get("rerun") else ""}</p>']
    if job.get("error"):
        parts.append(f'<p class="err" id="job-error">Last error: {e(job["error"])}</p>')
    elif job.get("message") and job["state"] == "done":
        parts.append(f'<p id="job-message">{e(job["message"])}</p>')
    return "".join(parts)


def rounds_section(run: dict[str, Any]) -> str:
    """Round history table: labels changed, re-annotated, flagged, estimated accuracy, LLM cost."""
    rows = []
    for r in run["rounds"]:
        llm = r["llm"]
        tokens = (None if llm["prompt_tokens"] is None and llm["completion_tokens"] is None
                  else (llm["prompt_tokens"] or 0) + (llm["completion_tokens"] or 0))
        est = pct(r["estimated_accuracy"]) + (f' ({e(r["verdict"])})' if r.get("verdict") else "")
        rows.append([num(r["round"]), num(r["labels_changed"]), num(r["reannotated"]), num(r["flagged"]), est,
                     num(llm["calls"]), num(tokens), num(llm["cache_hits"]), e(r.get("health_message"))])
    header = ["round", "labels changed", "texts (re-)annotated", "flagged", "estimated label accuracy",
              "LLM calls", "tokens", "cache hits", "health"]
    return f'<div id="rounds">{_table(header, rows, left=(0, 8))}</div>'


def plots_section(run: dict[str, Any]) -> str:
    plots = []
    if run["final"]["results"]:
        plots.append(histogram_svg(run["final"]))
    if run["rounds"]:
        plots.append(labels_per_round_svg(run["labels"], run["rounds"]))
    if any(a["accuracy"] is not None for a in run["accuracy"]):
        plots.append(accuracy_svg(run["accuracy"]))
    return f'<div class="plots">{"".join(plots)}</div>' if plots else '<p class="muted">no results yet</p>'


def summary_section(run: dict[str, Any]) -> str:
    final = run["final"]
    labels = ", ".join(e(x) for x in run["labels"]) or DASH
    return (f'<p><b id="run-tasks">{num(run["tasks"])}</b> texts · <b>{num(run["human_labelled"])}</b> labelled by '
            f'people · <b id="run-flagged">{num(final["flagged"])}</b> flagged for review · rounds done '
            f'{num(run["rounds_done"])} · version {e(run["version"])}</p><p class="muted">labels: {labels}</p>')


def accuracy_section(run: dict[str, Any]) -> str:
    if not run["accuracy"]:
        return ""
    rows = [[e(a["title"]), pct(a["accuracy"])] for a in run["accuracy"]]
    return f'<h2>Accuracy against gold labels</h2><div id="accuracy">{_table(["stage", "accuracy"], rows)}</div>'


def budget_section(run: dict[str, Any]) -> str:
    """The review budget: one sentence, and the estimated accuracy of all labels after reviewing k tasks."""
    budget = run.get("budget")
    if not budget:
        return ""
    target = budget["target"]
    points = sorted(budget["points"] + ([target] if target else []), key=lambda pt: (pt["k"], pt is not target))
    rows = [[num(pt["k"]) + (" (target)" if pt is target else ""), pct(pt["share"]), pct(pt["accuracy"]),
             f'{pct(pt["low"])} – {pct(pt["high"])}'] for pt in points]
    header = ["tasks reviewed", "share of tasks", "estimated accuracy", f'{100 * budget["level"]:.0f} % interval']
    return ('<h2>Review budget</h2>'
            f'<p id="budget-sentence">{e(budget["sentence"][:1].upper() + budget["sentence"][1:])}.</p>'
            '<p class="muted">Least-confident first: sort the tasks by prediction score, lowest first. Estimated '
            'from the scores (P(label right), calibrated without gold; a reviewed task counts as right); the '
            'interval counts chance and how far the scores\' calibration may be off as a whole.</p>'
            f'<div id="budget">{_table(header, rows, left=())}</div>')


def flagged_section(items: Sequence[dict[str, Any]], total: int) -> str:
    rows = [[e(it["id"]), f'<span class="text">{e(it["text"])}</span>', e(it["label"]),
             DASH if it["confidence"] is None else f'{it["confidence"]:.2f}', e(it["suggested"]),
             e(", ".join(it["reasons"]))] for it in items]
    more = (f'<p class="muted">showing {len(items):,} of {total:,}, least confident first</p>'
            if total > len(items) else "")
    return (f'<h2>Flagged for review ({total:,})</h2>{more}'
            + _table(["id", "text", "label", "score", "suggested", "reasons"], rows, left=(0, 1, 2, 4, 5)))


def page(title: str, body: str, *, refresh_s: int | None = None) -> str:
    """A complete HTML document (UTF-8, inline CSS, optional meta refresh)."""
    meta = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{e(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>")


# pages ------------------------------------------------------------------------------------------------
def index_page(projects: Sequence[dict[str, Any]], *, refresh_s: int | None = None) -> str:
    """``GET /``: every project the backend knows, with its job state and progress."""
    rows = []
    for p in projects:
        job = p["job"]
        progress = f'{num(job["done"])} / {num(job["total"])}' if job["state"] in ("queued", "running") else DASH
        rows.append([f'<a href="projects/{int(p["project"])}">project {int(p["project"])}</a>',
                     f'<span class="state {e(job["state"])}">{e(job["state"])}</span>', _stage(job["stage"]),
                     f'{num(job["round"])} / {num(job["rounds"])}', progress, num(job["tasks"]), num(job["flagged"]),
                     e(job["model_version"]), e(job["error"])])
    header = ["project", "state", "stage", "round", "progress", "tasks", "flagged", "version", "last error"]
    table = (_table(header, rows, left=(0, 1, 2, 7, 8)) if rows
             else '<p class="muted">No project has connected this backend yet.</p>')
    return page("FreeAL backend", f"<h1>FreeAL backend</h1><p class=\"muted\">projects</p>{table}", refresh_s=refresh_s)


def project_page(status: dict[str, Any], flagged: Sequence[dict[str, Any]] = (), *,
                 refresh_s: int | None = None) -> str:
    """``GET /projects/<id>``: the job live, the round history, plots, the link to the review tab and the
    ``flagged`` tasks with the small model's suggestion and the reasons (which Label Studio shows only with
    the review controls in the label config)."""
    pid = int(status["project"])
    job, run, tab = status["job"], status["run"], status["review_tab"]
    link = ""
    if tab.get("url"):
        link = (f'<p><a id="review-link" href="{e(tab["url"])}">Open “{e(tab["title"])}” in Label Studio</a></p>')
    body = [f'<p><a href="../">all projects</a></p><h1>FreeAL · project {pid}</h1>', link,
            '<h2>Job</h2>', job_section(job)]
    if run:
        body += ["<h2>Labels</h2>", summary_section(run), budget_section(run), "<h2>Rounds</h2>",
                 rounds_section(run), "<h2>Plots</h2>", plots_section(run), accuracy_section(run),
                 flagged_section(flagged, run["final"]["flagged"] or 0)]
    else:
        body.append('<p class="muted">No FreeAL state for this project yet.</p>')
    body.append(f'<p class="muted">JSON: <a href="../status/{pid}">/status/{pid}</a></p>')
    return page(f"FreeAL · project {pid}", "".join(body), refresh_s=refresh_s)


def report_page(name: str, run: dict[str, Any], flagged: Sequence[dict[str, Any]]) -> str:
    """``freeal report``: one self-contained file with the run's tables, plots and flagged texts."""
    body = [f"<h1>FreeAL report · {e(name)}</h1>", summary_section(run), budget_section(run), "<h2>Rounds</h2>",
            rounds_section(run), "<h2>Plots</h2>", plots_section(run), accuracy_section(run),
            flagged_section(flagged, run["final"]["flagged"] or 0)]
    return page(f"FreeAL report · {name}", "".join(body))
