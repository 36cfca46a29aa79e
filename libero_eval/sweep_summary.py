"""The table a sweep ends with: success per policy x suite (95% Wilson), paired against the baseline
(discordant pairs, exact McNemar p), and what differs even when success does not: reuse rate, full frames
by reason, latency and speedup, shadow deviation."""
from __future__ import annotations

from collections import Counter, defaultdict
from statistics import mean
from typing import Any

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


def _fmt(value, spec, none="-"):
    return none if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]], baseline: str | None) -> str:
    header = (f"{'policy':<32} {'suite':<15} {'success (95% CI)':<22} {'vs ' + (baseline or '-'):<18} "
              f"{'reuse':>6} {'lat ms':>8} {'speedup':>7} {'shadow cos':>10}  full frames by reason")
    lines = [header, "-" * len(header)]
    for r in rows:
        success = "-" if r["success_rate"] is None else (
            f"{r['successes']}/{r['n']} {100 * r['success_rate']:.0f}% [{100 * r['wilson_low']:.0f}-{100 * r['wilson_high']:.0f}]")
        if "pairs" in r:
            paired = f"-{r['base_only']}/+{r['variant_only']} p={r['mcnemar_p']:.2f}"
        else:
            paired = "(baseline)" if r["policy"] == baseline else "-"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["full_by_reason"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"{r['policy']:<32} {r['suite']:<15} {success:<22} {paired:<18} {_fmt(r['reuse_rate'], '6.0%'):>6} "
            f"{_fmt(r['latency_ms'], '8.1f'):>8} {_fmt(r['speedup'], '6.2f') + ('x' if r['speedup'] else ''):>7} "
            f"{_fmt(r['shadow_cos_mean'], '10.3f'):>10}  {reasons}"
            + (f"  [{r['errors']} errors]" if r["errors"] else "")
        )
    return "\n".join(lines)


def pick_baseline(labels: list[str], names: dict[str, str]) -> str | None:
    """The first variant named `none` (the full path every frame), else None."""
    for label in labels:
        if names.get(label) == "none":
            return label
    return None
