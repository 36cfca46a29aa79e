"""The pictures of a sweep, as PNG bytes (for W&B images and the self-contained report.html).

Built on matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so plotting
works headless, in any thread, and leaves the process's matplotlib state alone.
"""
from __future__ import annotations

import io
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# The HUD's colours (tasks.video), so a timeline and its video read alike.
DECISION_COLOURS = {"full": "#50c878", "reuse": "#f0b428", "partial": "#5aa0f0", "expert": "#be78e6"}
OTHER_COLOUR = "#9a9a9a"
BASELINE_COLOUR = "#4a4a4a"
HIGHLIGHT_COLOUR = "#d0403a"
BAR_COLOUR = "#3a78b8"


def to_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def overall_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per policy: its ALL row when it spans several suites, else its only suite row."""
    by_policy: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["suite"] == "ALL" or row["policy"] not in by_policy:
            by_policy[row["policy"]] = row
    return list(by_policy.values())


def _error_lengths(rate: float, row: dict[str, Any]) -> tuple[float, float]:
    """(below, above) error-bar lengths of a Wilson interval, never negative: a stored summary whose bound
    sits a hair inside the rate (floating point, an older file) still draws instead of failing the report."""
    return max(0.0, rate - row["wilson_low"]), max(0.0, row["wilson_high"] - rate)


def success_by_policy(rows: list[dict[str, Any]], baseline: str | None = None,
                      highlight: str | None = None) -> bytes:
    """Success rate per policy with 95% Wilson interval bars, annotated k/n."""
    data = overall_rows(rows)
    fig = Figure(figsize=(max(4.0, 1.1 * len(data) + 2), 3.6))
    ax = fig.add_subplot()
    xs = range(len(data))
    rates = [r["success_rate"] or 0.0 for r in data]
    bars = [_error_lengths(rate, r) for rate, r in zip(rates, data)]
    colours = [HIGHLIGHT_COLOUR if r["policy"] == highlight else BASELINE_COLOUR if r["policy"] == baseline
               else BAR_COLOUR for r in data]
    ax.bar(xs, rates, color=colours, yerr=[[b[0] for b in bars], [b[1] for b in bars]], capsize=4, ecolor="black")
    for x, rate, r in zip(xs, rates, data):  # inside a bar in white, above an empty one in black
        ax.annotate(f"{r['successes']}/{r['n']}", (x, 0.02), ha="center", fontsize=8,
                    color="white" if rate >= 0.08 else "black")
    ax.set_xticks(list(xs), [r["policy"] for r in data], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (95% Wilson)")
    ax.set_title("Success rate per cache policy")
    ax.grid(axis="y", alpha=0.3)
    return to_png(fig)


def success_a_vs_b(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], name_a: str, name_b: str) -> bytes:
    """Two runs' success per shared variant (rows in the same order, one per variant), A and B side by side
    with 95% Wilson bars, annotated k/n."""
    fig = Figure(figsize=(max(4.5, 1.4 * len(rows_a) + 2), 3.8))
    ax = fig.add_subplot()
    width = 0.38
    for offset, rows, name, colour in ((-width / 2, rows_a, name_a, BASELINE_COLOUR), (width / 2, rows_b, name_b, BAR_COLOUR)):
        xs = [i + offset for i in range(len(rows))]
        rates = [r["success_rate"] or 0.0 for r in rows]
        bars = [_error_lengths(rate, r) for rate, r in zip(rates, rows)]
        ax.bar(xs, rates, width, color=colour, label=name, yerr=[[b[0] for b in bars], [b[1] for b in bars]],
               capsize=3, ecolor="black")
        for x, rate, r in zip(xs, rates, rows):
            ax.annotate(f"{r['successes']}/{r['n']}", (x, 0.02), ha="center", fontsize=7,
                        color="white" if rate >= 0.08 else "black")
    ax.set_xticks(list(range(len(rows_a))), [r["policy"] for r in rows_a], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (95% Wilson)")
    ax.set_title("Success per variant, A vs B")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return to_png(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both speedup and success, sorted by speedup."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def success_vs_speedup(rows: list[dict[str, Any]], highlight: str | None = None) -> bytes:
    """The Pareto picture: success (with Wilson bars) against speedup over the baseline's modelled latency."""
    data = [r for r in overall_rows(rows) if r.get("speedup") is not None]
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot()
    if not data:
        ax.text(0.5, 0.5, "no speedup: the sweep has no baseline (policy 'none') with modelled costs",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_axis_off()
        return to_png(fig)
    for r in data:
        rate = r["success_rate"] or 0.0
        colour = HIGHLIGHT_COLOUR if r["policy"] == highlight else BAR_COLOUR
        below, above = _error_lengths(rate, r)
        ax.errorbar([r["speedup"]], [rate], yerr=[[below], [above]], fmt="o", color=colour, capsize=3)
        ax.annotate(r["policy"], (r["speedup"], rate), textcoords="offset points", xytext=(5, 4), fontsize=7)
    front = pareto_front([(r["speedup"], r["success_rate"] or 0.0) for r in data])
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="grey", lw=1, label="Pareto front")
    ax.axvline(1.0, color=BASELINE_COLOUR, lw=0.8, alpha=0.5)
    ax.set_xlabel("speedup vs baseline (modelled cost per frame)")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Success vs speedup")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    return to_png(fig)


def varying_signals(records: list[dict[str, Any]]) -> list[str]:
    """The signals that take more than one value over these frames, in first-seen order (a constant one, e.g.
    a baseline's shadow cosine of 1, would be a flat line)."""
    values: dict[str, set] = {}
    for rec in records:
        for name, value in (rec.get("signals") or {}).items():
            values.setdefault(name, set()).add(repr(value))  # repr: NaN equals NaN, any value hashes
    return [name for name, seen in values.items() if len(seen) > 1]


def _signal_names(records: list[dict[str, Any]], limit: int) -> list[str]:
    """Varying signals, those with a trigger threshold first (they explain the decisions), then the rest, in
    first-seen order."""
    names = varying_signals(records)
    with_threshold: list[str] = []
    for rec in records:
        thresholds = (rec.get("extra") or {}).get("thresholds") or {}
        for name in rec.get("signals", {}):
            if name in names and name in thresholds and name not in with_threshold:
                with_threshold.append(name)
    ordered = with_threshold + [n for n in names if n not in with_threshold]
    return ordered[:limit]


def timeline(result, max_signals: int = 4) -> bytes | None:
    """Per-episode timeline: each signal over env steps (points coloured by the frame's decision) with its
    trigger threshold (dashed), and a strip of decisions with full frames labelled by their reason code.
    None without frames."""
    records = result.records
    if not records:
        return None
    names = _signal_names(records, max_signals)
    fig = Figure(figsize=(7.5, 1.2 + 1.5 * len(names)))
    axes = fig.subplots(len(names) + 1, 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [3] * len(names) + [1.4]})[:, 0]
    steps = [rec.get("env_step", rec.get("index", i)) for i, rec in enumerate(records)]
    for ax, name in zip(axes, names):
        points = [(s, rec["signals"][name], rec.get("decision", "")) for s, rec in zip(steps, records)
                  if name in rec.get("signals", {})]
        ax.plot([p[0] for p in points], [p[1] for p in points], "-", color="#b0b0b0", lw=1, zorder=1)
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, zorder=2,
                   c=[DECISION_COLOURS.get(p[2], OTHER_COLOUR) for p in points])
        thresholds = [(s, (rec.get("extra") or {}).get("thresholds", {}).get(name)) for s, rec in zip(steps, records)]
        thresholds = [(s, t) for s, t in thresholds if t is not None]
        if thresholds:
            ax.step([s for s, _ in thresholds], [t for _, t in thresholds], "--", where="post",
                    color=HIGHLIGHT_COLOUR, lw=1, label="threshold")
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    strip = axes[-1]
    for s, rec in zip(steps, records):
        decision = rec.get("decision", "")
        strip.axvline(s, color=DECISION_COLOURS.get(decision, OTHER_COLOUR), lw=3)
    full = [(s, rec.get("reason", "")) for s, rec in zip(steps, records) if rec.get("decision") == "full"]
    for s, reason in full[:30]:
        strip.annotate(reason, (s, 0.5), xytext=(3, 0), textcoords="offset points", rotation=90, fontsize=6,
                       ha="left", va="center")
    strip.set_ylim(0, 1)
    strip.set_yticks([])
    strip.set_ylabel("decision", fontsize=8)
    strip.set_xlabel("env step")
    legend = [(k, c) for k, c in DECISION_COLOURS.items() if any(r.get("decision") == k for r in records)]
    for name, colour in legend:
        strip.plot([], [], color=colour, lw=3, label=name.upper())
    if legend:
        strip.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    outcome = "success" if result.success else f"{result.status} ({result.reason})"
    axes[0].set_title(f"{result.policy_label} | {result.suite} task {result.task_id} trial {result.trial} | {outcome}",
                      fontsize=9)
    return to_png(fig)


def success_vs_latency(rows: list[dict[str, Any]], highlight: str | None = None) -> bytes:
    """Success (Wilson bars) against each variant's modelled latency per frame, one panel per latency model,
    with the Pareto front (no other variant is both faster and more successful); realtime variants hollow."""
    data = [r for r in overall_rows(rows) if r.get("cost_ms")]
    models = sorted({r.get("latency") or "?" for r in data})
    fig = Figure(figsize=(5.5 * max(1, len(models)), 4.0))
    axes = fig.subplots(1, max(1, len(models)), squeeze=False)[0]
    if not data:
        axes[0].text(0.5, 0.5, "no modelled latency: the records carry no cost_ms", ha="center", va="center",
                     transform=axes[0].transAxes, fontsize=9)
        axes[0].set_axis_off()
        return to_png(fig)
    for ax, model in zip(axes, models):
        mine = [r for r in data if (r.get("latency") or "?") == model]
        for r in mine:
            rate = r["success_rate"] or 0.0
            colour = HIGHLIGHT_COLOUR if r["policy"] == highlight else BAR_COLOUR
            below, above = _error_lengths(rate, r)
            hollow = r.get("timing") == "realtime"
            ax.errorbar([r["cost_ms"]], [rate], yerr=[[below], [above]], fmt="o", color=colour, capsize=3,
                        mfc="white" if hollow else colour)
            ax.annotate(r["policy"], (r["cost_ms"], rate), textcoords="offset points", xytext=(5, 4), fontsize=7)
        front = pareto_front([(-r["cost_ms"], r["success_rate"] or 0.0) for r in mine])
        ax.plot([-p[0] for p in front], [p[1] for p in front], "--", color="grey", lw=1, label="Pareto front")
        ax.set_xlabel(f"modelled latency per frame, ms ({model})")
        ax.set_ylabel("success rate")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"Success vs latency: {model}", fontsize=10)
        ax.plot([], [], "o", color=BAR_COLOUR, mfc="white", label="realtime (hollow)")
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3)
    return to_png(fig)


MODES = ("sync", "naive", "rtc")  # how a variant executes: sync, realtime naive, realtime RTC
MODE_LABELS = {"sync": "sync", "naive": "realtime (naive)", "rtc": "realtime (RTC)"}


def execution_mode(row: dict[str, Any]) -> str:
    if row.get("timing", "sync") == "sync":
        return "sync"
    return "rtc" if row.get("execution") == "rtc" else "naive"


def sync_vs_realtime(rows: list[dict[str, Any]]) -> bytes | None:
    """Per variant run more than one way (sync, realtime naive, realtime RTC), success side by side (Wilson
    bars); None when no variant was."""
    by_family: dict[str, dict[str, dict[str, Any]]] = {}
    for r in overall_rows(rows):
        by_family.setdefault(r.get("family", r["policy"]), {})[execution_mode(r)] = r
    pairs = [(f, t) for f, t in by_family.items() if len(t) > 1]
    if not pairs:
        return None
    modes = [m for m in MODES if any(m in t for _, t in pairs)]
    fig = Figure(figsize=(max(4.5, 0.6 * len(modes) * len(pairs) + 2), 3.8))
    ax = fig.add_subplot()
    width = 0.8 / len(modes)
    colours = {"sync": BASELINE_COLOUR, "naive": BAR_COLOUR, "rtc": HIGHLIGHT_COLOUR}
    for j, mode in enumerate(modes):
        present = [(i, t[mode]) for i, (_, t) in enumerate(pairs) if mode in t]
        rates = [r["success_rate"] or 0.0 for _, r in present]
        bars = [_error_lengths(rate, r) for rate, (_, r) in zip(rates, present)]
        xs = [i + (j - (len(modes) - 1) / 2) * width for i, _ in present]
        ax.bar(xs, rates, width, color=colours[mode], label=MODE_LABELS[mode],
               yerr=[[b[0] for b in bars], [b[1] for b in bars]], capsize=3, ecolor="black")
        for x, rate, (_, r) in zip(xs, rates, present):  # inside a bar in white, above an empty one in black
            ax.annotate(f"{r['successes']}/{r['n']}", (x, 0.02), ha="center", fontsize=7,
                        color="white" if rate >= 0.08 else "black")
    labels = [t["sync"]["policy"].replace("_timingsync", "") if "sync" in t
              else min((r["policy"] for r in t.values()), key=len) for _, t in pairs]
    ax.set_xticks(list(range(len(pairs))), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (95% Wilson)")
    ax.set_title("Sync vs realtime (naive, RTC), per variant")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return to_png(fig)

