"""Threshold calibration from recorded frames, as the seeds and FlashRT PR #48 did by hand:
`libero-eval replay RUN --policy adaptive:window=3 --calibrate pixel_mae=4,5,6,6.5,7 [--target-reuse 0.5]`.

The policy is replayed at each value of one parameter (any threshold of any threshold-gated policy:
adaptive's pixel_mae, attention_drift's drift_threshold / state_threshold, vla_cache's similarity, ...).
Per value: reuse rate, prefix compute skipped and offline fidelity (cosine of the executed actions vs the
full computation on the same frame and noise: mean / p5 / min). Written to <out>/calibration.json and
calibration.png, printed as a table; with --target-reuse the value whose reuse comes closest to the target
is proposed (ties: the better p5 cosine), with the linear interpolation between the two values that
bracket the target. --target-skipped does the same on the prefix compute skipped: the quantity that moves
for vla_cache, whose frames are nearly all partial whatever its thresholds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from libero_eval import tables

CALIBRATION_FILE = "calibration.json"
CALIBRATION_PLOT = "calibration.png"


def parse_calibrate(text: str) -> tuple[str, list[float]]:
    """'pixel_mae=4,5,6.5' -> ('pixel_mae', [4.0, 5.0, 6.5]); ValueError naming the problem."""
    name, eq, values = text.partition("=")
    try:
        numbers = sorted({float(v) for v in values.split(",") if v.strip()})
    except ValueError:
        numbers = []
    if not eq or not name.strip() or len(numbers) < 2:
        raise ValueError(f"--calibrate {text!r}: expected PARAM=V1,V2,... with at least two numbers, e.g. "
                         "pixel_mae=4,5,6,6.5,7")
    return name.strip(), numbers


def rows(param: str, values: list[float], summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per value (summaries: replay's per-variant summaries, in the order of `values`)."""
    keep = ("reuse_rate", "compute_skipped", "cos_mean", "cos_p5", "cos_min", "frames")
    return [{"param": param, "value": value, **{k: summary[k] for k in keep}, "policy": summary["policy"]}
            for value, summary in zip(values, summaries, strict=True)]


def propose(table: list[dict[str, Any]], target: float, metric: str = "reuse_rate") -> dict[str, Any]:
    """The tested value whose `metric` (reuse_rate or compute_skipped) is closest to `target` (ties: higher
    p5 cosine), and where the curve crosses the target between two tested values (linear), when it does."""
    best = min(table, key=lambda r: (abs(r[metric] - target), -r["cos_p5"]))
    out: dict[str, Any] = {"metric": metric, "target": target, "value": best["value"], metric: best[metric],
                           "reuse_rate": best["reuse_rate"], "cos_mean": best["cos_mean"], "cos_p5": best["cos_p5"],
                           "interpolated": None}
    for lo, hi in zip(table, table[1:]):
        a, b = lo[metric] - target, hi[metric] - target
        if a == 0 or a * b < 0:
            share = 0.0 if a == 0 else a / (a - b)
            out["interpolated"] = lo["value"] + share * (hi["value"] - lo["value"])
            break
    return out


def format_rows(table: list[dict[str, Any]]) -> str:
    cells = [[f"{r['value']:g}", f"{r['reuse_rate']:.0%}", f"{r['compute_skipped']:.1%}", f"{r['cos_mean']:.4f}",
              f"{r['cos_p5']:.4f}", f"{r['cos_min']:.4f}"] for r in table]
    return tables.format_table([table[0]["param"], "reuse", "skipped", "cos mean", "cos p5", "cos min"], cells)


def plot(table: list[dict[str, Any]], proposal: dict[str, Any] | None) -> bytes:
    """Reuse rate and action cosine (mean, p5) against the threshold, the proposal marked."""
    from matplotlib.figure import Figure  # matplotlib: only when a calibration is plotted (the CLI imports us)

    from libero_eval.plots import to_png  # matplotlib too, see above

    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot()
    xs = [r["value"] for r in table]
    ax.plot(xs, [r["reuse_rate"] for r in table], "o-", label="reuse rate", color="#d98c1f")
    ax.plot(xs, [r["cos_mean"] for r in table], "s-", label="cosine mean", color="#2f6fb0")
    ax.plot(xs, [r["cos_p5"] for r in table], "^--", label="cosine p5", color="#2f6fb0")
    if proposal is not None:
        ax.axvline(proposal["value"], color="#444", lw=1, ls=":", label=f"proposed {proposal['value']:g}")
        ax.axhline(proposal["target"], color="#d98c1f", lw=0.8, ls=":")
    ax.set_xlabel(table[0]["param"])
    ax.set_ylim(min(0.0, min(r["cos_min"] for r in table)), 1.05)
    ax.set_title(f"{table[0]['policy'].rsplit('_' + table[0]['param'], 1)[0]}: replay per threshold", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return to_png(fig)


def write(out: Path, table: list[dict[str, Any]], target: float | None,
          metric: str = "reuse_rate") -> dict[str, Any] | None:
    """calibration.json + calibration.png into `out`; returns the proposal (None without a target)."""
    proposal = propose(table, target, metric) if target is not None else None
    (out / CALIBRATION_FILE).write_text(json.dumps({"rows": table, "proposal": proposal}, indent=1))
    (out / CALIBRATION_PLOT).write_bytes(plot(table, proposal))
    return proposal
