"""Sync vs naive realtime vs RTC realtime, per variant, from one run directory (README "Realtime chunking").

Every variant of the run is grouped with the others that differ only in how they execute (the summary's
`family`: sync, realtime naive, realtime rtc). Per variant and mode: success with its 95% Wilson interval,
modelled cost, speedup and delay; paired comparisons (same task, init state and seed) between modes of a
variant (naive vs sync, rtc vs sync, rtc vs naive) and, within a mode, against that mode's `none`:
-b/+c discordant pairs, the exact McNemar p, and the smallest difference those pairs could detect (80%
power, two-sided 5%, libero_eval.stats.detectable_difference). Writes <out>.json and <out>.md.

Run: .venv/bin/python -m benchmarks.execution_modes runs/small_heldout_rtc [--out benchmarks/results/rtc_modes]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from libero_eval.plots import MODE_LABELS, MODES, execution_mode, overall_rows
from libero_eval.report import load_run
from libero_eval.specs import pair_key
from libero_eval.sweep_summary import paired

ROOT = Path(__file__).resolve().parents[1]


def compare(first: dict, second: dict) -> dict | None:
    """`second` vs `first` on the episodes both have (sweep_summary.paired); None when they share none."""
    p = paired(first, second)
    return p if p["pairs"] else None


def _fmt_pair(p: dict | None) -> str:
    if p is None:
        return "-"
    detectable = "none detectable" if p["detectable"] is None else f">= {100 * p['detectable']:.0f} pt"
    return f"-{p['base_only']}/+{p['variant_only']} p={p['mcnemar_p']:.2f} ({detectable})"


def _fmt_success(r: dict) -> str:
    return f"{r['successes']}/{r['n']} {100 * r['success_rate']:.0f}% [{100 * r['wilson_low']:.0f}-{100 * r['wilson_high']:.0f}]"


def build(run_dir: Path) -> dict:
    data = load_run(run_dir)
    rows = {r["policy"]: r for r in overall_rows(data.rows)}
    outcomes: dict[str, dict] = {}
    for r in data.results:
        if r.status != "error":
            outcomes.setdefault(r.policy_label, {})[pair_key(r)] = bool(r.success)
    families: dict[str, dict[str, str]] = {}
    for label, row in rows.items():
        families.setdefault(row["family"], {})[execution_mode(row)] = label
    none_family = families.get(rows[data.baseline]["family"], {}) if data.baseline in rows else {}
    out = []
    for family, modes in families.items():
        name = modes["sync"].replace("_timingsync", "") if "sync" in modes else min(modes.values(), key=len)
        entry = {"variant": name, "modes": {}}
        for mode in MODES:
            if mode not in modes:
                continue
            label = modes[mode]
            row = rows[label]
            base = data.baselines.get(label)
            if base == label:  # a `none` with other RTC settings (e.g. the VJP): against the default none
                base = none_family.get(mode)
            entry["modes"][mode] = {
                "label": label, "successes": row["successes"], "n": row["n"], "success_rate": row["success_rate"],
                "wilson_low": row["wilson_low"], "wilson_high": row["wilson_high"], "cost_ms": row["cost_ms"],
                "speedup": (rows[base]["cost_ms"] / row["cost_ms"] if base in rows and row["cost_ms"]
                            and rows[base]["cost_ms"] else row["speedup"]),  # vs the none of its mode
                "delay_steps": row["delay_steps"], "reuse_rate": row["reuse_rate"],
                "rtc_frozen_dev": row.get("rtc_frozen_dev"),
                "vs_none": compare(outcomes.get(base, {}), outcomes.get(label, {})) if base and base != label else None}
        for first, second in (("sync", "naive"), ("sync", "rtc"), ("naive", "rtc")):
            if first in modes and second in modes:
                entry[f"{second}_vs_{first}"] = compare(outcomes[modes[first]], outcomes[modes[second]])
        out.append(entry)
    return {"run_dir": str(run_dir), "name": data.name, "state": data.state, "variants": out}


def markdown(result: dict) -> str:
    head = ["variant", *[MODE_LABELS[m] for m in MODES], "naive vs sync", "RTC vs sync", "RTC vs naive",
            "RTC vs RTC none", "RTC ms (speedup)", "RTC delay"]
    body = []
    for v in result["variants"]:
        modes = v["modes"]
        rtc = modes.get("rtc", {})
        body.append([v["variant"], *[_fmt_success(modes[m]) if m in modes else "-" for m in MODES],
                     _fmt_pair(v.get("naive_vs_sync")), _fmt_pair(v.get("rtc_vs_sync")),
                     _fmt_pair(v.get("rtc_vs_naive")), _fmt_pair(rtc.get("vs_none")),
                     f"{rtc['cost_ms']:.1f} ({rtc['speedup']:.2f}x)" if rtc.get("cost_ms") and rtc.get("speedup") else "-",
                     f"{rtc['delay_steps']:.1f}" if rtc.get("delay_steps") is not None else "-"])
    return "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n" + "\n".join(
        "| " + " | ".join(row) + " |" for row in body) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rtc_modes")
    args = parser.parse_args()
    result = build(args.run_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    args.out.with_suffix(".md").write_text(f"{result['name']} ({result['state']})\n\n{md}")
    print(md)
    print(f"-b/+c: pairs where only the first / only the second succeeded; p: exact McNemar; (>= d pt): the smallest "
          f"difference those pairs could detect. Wrote {args.out.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
