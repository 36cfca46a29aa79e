"""The closed-loop table of one sweep (README "The seeds' methods in closed loop"): per variant, success with
its 95% Wilson interval, the paired test against the run's `none` (-b/+c discordant pairs: only `none` /
only the variant succeeded; exact McNemar p) with the smallest success difference those pairs could detect
(80% power, two-sided 5%, Connor 1987: libero_eval.stats.detectable_difference), modelled cost and speedup
per frame under the run's latency model, reuse rate, the shadow cosine of the executed actions (mean / min)
and the commonest reasons for full frames. Writes <out>.json and <out>.md.

Run: .venv/bin/python -m benchmarks.closed_loop_table runs/small_heldout_seeds [--out benchmarks/results/seeds_closed_loop]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from libero_eval.plots import overall_rows
from libero_eval.report import load_run

ROOT = Path(__file__).resolve().parents[1]


def build(run_dir: Path) -> dict:
    data = load_run(run_dir)
    rows = []
    for r in overall_rows(data.rows):
        reasons = sorted(r["full_by_reason"].items(), key=lambda kv: -kv[1])
        rows.append({k: r.get(k) for k in ("policy", "n", "successes", "success_rate", "wilson_low", "wilson_high",
                                           "errors", "pairs", "base_only", "variant_only", "mcnemar_p", "detectable",
                                           "cost_ms", "speedup", "reuse_rate", "shadow_exec_mean", "shadow_exec_min")}
                    | {"frames": r["frames"], "full_reasons": dict(reasons[:3])})
    latency = (data.config or {}).get("latency", "calibrated")
    return {"run_dir": str(run_dir), "name": data.name, "state": data.state, "latency": latency,
            "baseline": data.baseline, "rows": rows}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown(table: dict) -> str:
    lines = [f"| variant | success [95% CI] | vs {table['baseline']} (-b/+c, p) | detectable | cost ms | speedup | "
             "reuse | shadow cos exec (mean/min) | full frames by reason |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        success = (f"{r['successes']}/{r['n']} {_pct(r['success_rate'])} [{_pct(r['wilson_low'])}-"
                   f"{_pct(r['wilson_high'])}]")
        pair = "(baseline)" if r["pairs"] is None else f"-{r['base_only']}/+{r['variant_only']}, p={r['mcnemar_p']:.2f}"
        detectable = "-" if r["detectable"] is None else f"{100 * r['detectable']:.0f} pt"
        shadow = "-" if r["shadow_exec_mean"] is None else f"{r['shadow_exec_mean']:.3f} / {r['shadow_exec_min']:.3f}"
        reasons = ", ".join(f"{k} {v}" for k, v in r["full_reasons"].items()) or "-"
        lines.append(f"| {r['policy']} | {success} | {pair} | {detectable} | "
                     f"{'-' if r['cost_ms'] is None else format(r['cost_ms'], '.1f')} | "
                     f"{'-' if r['speedup'] is None else format(r['speedup'], '.2f') + 'x'} | {_pct(r['reuse_rate'])} | "
                     f"{shadow} | {reasons} |")
    lines += ["", f"{table['name']} ({table['state']}); latency model: {table['latency']}. detectable: the smallest "
              "success difference the variant's pairs with the baseline could detect (80% power, two-sided 5%, Connor "
              "1987 from the number of pairs and the observed discordance); a difference below it is not a finding."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "seeds_closed_loop")
    args = parser.parse_args()
    table = build(args.run_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(table, indent=1) + "\n")
    text = markdown(table)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
