"""The table a sweep ends with: success per policy x suite (95% Wilson), paired against the baseline
(discordant pairs, exact McNemar p), and what differs even when success does not: reuse rate, full frames
by reason, latency and speedup, shadow deviation."""
from __future__ import annotations

from collections import Counter
from statistics import mean
from typing import Any

from libero_eval import tables
from libero_eval.specs import EpisodeResult
from libero_eval.stats import mcnemar_exact, wilson_interval

REUSE_DECISIONS = ("reuse", "partial")


def policy_rows(results: list[EpisodeResult], baseline: str | None) -> list[dict[str, Any]]:
    """One row per (policy label, suite) plus an ALL row per label; numbers only (for tables, W&B, JSON)."""
    scored = [r for r in results if r.status != "error"]
    labels = sorted({r.policy_label for r in results}, key=lambda l: (l != baseline, l))
    base_by_pair = {(r.suite, r.task_id, r.trial): r.success for r in scored if r.policy_label == baseline}
    base_latency = _latency([r for r in scored if r.policy_label == baseline])
    rows = []
    for label in labels:
        mine = [r for r in results if r.policy_label == label]
        suites = sorted({r.suite for r in mine})
        for suite in [*suites, "ALL"] if len(suites) > 1 else suites:
            group = [r for r in mine if suite == "ALL" or r.suite == suite]
            ok = [r for r in group if r.status != "error"]
            n, k = len(ok), sum(r.success for r in ok)
            lo, hi = wilson_interval(k, n)
            records = [rec for r in ok for rec in r.records]
            decisions = Counter(rec.get("decision") for rec in records)
            full_reasons = Counter(rec.get("reason") for rec in records if rec.get("decision") == "full")
            latency = _latency(ok)
            row = {
                "policy": label, "suite": suite, "n": n, "successes": k, "success_rate": k / n if n else None,
                "wilson_low": lo, "wilson_high": hi, "errors": len(group) - n,
                "frames": len(records),
                "reuse_rate": sum(decisions[d] for d in REUSE_DECISIONS) / len(records) if records else None,
                "full_by_reason": dict(full_reasons),
                "latency_ms": latency,
                "speedup": base_latency / latency if latency and base_latency else None,
                "shadow_cos_mean": _mean_signal(records, "shadow_cos"),
                "shadow_cos_min": _min_signal(records, "shadow_cos"),
            }
            if baseline is not None and label != baseline:
                b = c = pairs = 0
                for r in ok:
                    key = (r.suite, r.task_id, r.trial)
                    if key in base_by_pair:
                        pairs += 1
                        b += base_by_pair[key] and not r.success
                        c += (not base_by_pair[key]) and r.success
                row.update({"pairs": pairs, "base_only": b, "variant_only": c, "mcnemar_p": mcnemar_exact(b, c)})
            rows.append(row)
    return rows


def _latency(results: list[EpisodeResult]) -> float | None:
    values = [rec["latency_ms"]["total"] for r in results for rec in r.records if "total" in rec.get("latency_ms", {})]
    return mean(values) if values else None


def _signal_values(records, name):
    return [rec["signals"][name] for rec in records if name in rec.get("signals", {})]


def _mean_signal(records, name):
    values = _signal_values(records, name)
    return mean(values) if values else None


def _min_signal(records, name):
    values = _signal_values(records, name)
    return min(values) if values else None


SWEEP_HEADERS = ["policy", "suite", "success (95% CI)", "vs {baseline}", "reuse", "lat ms", "speedup", "shadow cos",
                 "full frames by reason"]


def format_table(rows: list[dict[str, Any]], baseline: str | None) -> str:
    """The final table, with a legend for the paired column when there is a baseline."""
    headers = [h.format(baseline=baseline or "-") for h in SWEEP_HEADERS]
    table = tables.format_table(headers, [_table_row(r, baseline) for r in rows], align="<<<<>>>><")
    if baseline is None or not any("pairs" in r for r in rows):
        return table
    return (f"{table}\nvs {baseline}: -b/+c = paired episodes (same task, init state, seed) where only {baseline} "
            f"succeeded / only the variant did;\n  p = exact McNemar test on those pairs (small p: the variants "
            "really differ). Success: k/n, rate, 95% Wilson interval.")


def _table_row(r: dict[str, Any], baseline: str | None) -> list[str]:
    success = "-" if r["success_rate"] is None else (
        f"{r['successes']}/{r['n']} {100 * r['success_rate']:.0f}% [{100 * r['wilson_low']:.0f}-{100 * r['wilson_high']:.0f}]")
    if "pairs" in r:
        paired = f"-{r['base_only']}/+{r['variant_only']} p={r['mcnemar_p']:.2f}"
    else:
        paired = "(baseline)" if r["policy"] == baseline else "-"
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["full_by_reason"].items(), key=lambda kv: -kv[1]))
    if r["errors"]:
        reasons = f"{reasons}  [{r['errors']} errors]".lstrip()
    fmt = tables.fmt
    return [r["policy"], r["suite"], success, paired, fmt(r["reuse_rate"], ".0%"), fmt(r["latency_ms"], ".1f"),
            fmt(r["speedup"], ".2f", "x"), fmt(r["shadow_cos_mean"], ".3f"), reasons]


def pick_baseline(labels: list[str], names: dict[str, str]) -> str | None:
    """The first variant named `none` (the full path every frame), else None."""
    for label in labels:
        if names.get(label) == "none":
            return label
    return None
