"""The table a sweep ends with: success per policy x suite (95% Wilson), paired against the baseline
(discordant pairs, exact McNemar p), and what differs even when success does not: reuse rate, full frames
by reason, modelled latency, Hz and speedup, shadow deviation.

Latency, Hz and speedup come from each frame's own cost under its variant's latency model (`cost_ms` in
the records; policies/serving/latency.py), never from the batch it was served in: they do not depend on
how many workers ran or what else shared a batch. Each variant is compared with the baseline (`none`) of
the same timing, latency model and realtime execution (naive or rtc)."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from statistics import mean
from typing import Any

from libero_eval import tables
from libero_eval.specs import EpisodeResult, pair_key
from libero_eval.stats import detectable_difference, mcnemar_exact, wilson_interval
from policies.serving.variants import RTCSettings

REUSE_DECISIONS = ("reuse", "partial")
RTC_DEFAULTS = dataclasses.asdict(RTCSettings())  # an rtc variant at these is in the family of its sync run


def policy_rows(results: list[EpisodeResult], baseline: str | dict[str, str | None] | None) -> list[dict[str, Any]]:
    """One row per (policy label, suite) plus an ALL row per label; numbers only (for tables, W&B, JSON).
    `baseline`: one label for all, or {label: its baseline label} (pick_baselines)."""
    scored = [r for r in results if r.status != "error"]
    all_labels = {r.policy_label for r in results}
    base_of = baseline if isinstance(baseline, dict) else {label: baseline for label in all_labels}
    bases = {b for b in base_of.values() if b is not None}
    labels = sorted(all_labels, key=lambda l: (l not in bases, l))
    rows = []
    for label in labels:
        base = base_of.get(label)
        base_by_pair = {pair_key(r): r.success for r in scored if r.policy_label == base}
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
            cost = _mean_field(records, "cost_ms")
            base_cost = _mean_field([rec for r in scored if r.policy_label == base
                                     and (suite == "ALL" or r.suite == suite) for rec in r.records], "cost_ms")
            described = next((r.policy for r in mine if r.policy), {})
            row = {
                "policy": label, "suite": suite, "baseline": base, "n": n, "successes": k,
                "timing": described.get("timing", "sync"), "latency": described.get("latency"),
                "execution": described.get("execution", "naive"),
                # the variant apart from how it executes: its sync, naive and rtc rows share it (plots.sync_vs_realtime)
                "family": json.dumps({k: v for k, v in described.items() if k not in ("label", "timing", "execution")
                                      and not (k in RTC_DEFAULTS and RTC_DEFAULTS[k] == v)},
                                     sort_keys=True, default=str),
                "success_rate": k / n if n else None,
                "wilson_low": lo, "wilson_high": hi, "errors": len(group) - n,
                "frames": len(records),
                "reuse_rate": sum(decisions[d] for d in REUSE_DECISIONS) / len(records) if records else None,
                "full_by_reason": dict(full_reasons),
                "cost_ms": cost,  # modelled latency per frame (None: records from before latency models)
                "hz": 1000 / cost if cost else None,
                "speedup": base_cost / cost if cost and base_cost else None,
                "wall_ms": _latency(ok),  # the actor's wall time per frame: its whole batch's (not comparable)
                "delay_steps": _mean_field(records, "delay_steps") if any(r.policy.get("timing") == "realtime"
                                                                           for r in ok) else None,
                "fallback_actions": sum(rec.get("fallback_actions", 0) for rec in records),
                # shadow mode: cosine vs the full path's chunk on the same frame, over the whole chunk ...
                "shadow_cos_mean": _mean_signal(records, "shadow_cos"),
                "shadow_cos_min": _min_signal(records, "shadow_cos"),
                # ... and over the actions executed (the first replan_steps): what the table shows
                "shadow_exec_mean": _mean_signal(records, "shadow_cos_executed"),
                "shadow_exec_min": _min_signal(records, "shadow_cos_executed"),
                # RTC: max |new - executed| over the actions the robot runs from the old chunk (normalised)
                "rtc_frozen_dev": _mean_signal(records, "rtc_frozen_dev"),
            }
            if base is not None and label != base:
                row.update(paired(base_by_pair, {pair_key(r): r.success for r in ok}))
            rows.append(row)
    return rows


def paired(first: dict, second: dict) -> dict[str, Any]:
    """`second` against `first` ({pair_key: success}) on the episodes both have: the discordant
    pairs (only `first` / only `second` succeeded), the exact McNemar p and the smallest success difference
    those pairs could detect (stats.detectable_difference)."""
    keys = set(first) & set(second)
    b = sum(bool(first[k]) and not second[k] for k in keys)
    c = sum((not first[k]) and bool(second[k]) for k in keys)
    return {"pairs": len(keys), "base_only": b, "variant_only": c, "mcnemar_p": mcnemar_exact(b, c),
            "detectable": detectable_difference(len(keys), b + c)}


def _mean_field(records: list[dict], name: str) -> float | None:
    """The mean of a per-record number; None unless every record has it (old run directories: unknown)."""
    values = [rec.get(name) for rec in records]
    if not values or any(v is None for v in values):
        return None
    return mean(values)


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


SWEEP_HEADERS = ["policy", "suite", "success (95% CI)", "vs {baseline}", "reuse", "lat ms", "Hz", "speedup", "delay",
                 "shadow exec", "full frames by reason"]


def format_table(rows: list[dict[str, Any]], baseline: str | dict[str, str | None] | None) -> str:
    """The final table, with a legend for the paired and the latency columns."""
    several = isinstance(baseline, dict) and len({b for b in baseline.values() if b}) > 1
    name = "baseline" if several else (next(iter({b for b in baseline.values() if b}), None)
                                       if isinstance(baseline, dict) else baseline)
    headers = [h.format(baseline=name or "-") for h in SWEEP_HEADERS]
    table = tables.format_table(headers, [_table_row(r) for r in rows], align="<<<<>>>>>><")
    legend = ["lat ms / Hz / speedup: each frame's modelled cost under its latency model (the stages it ran, "
              "priced at batch 1), not the batch's wall time;", "  delay: env steps a realtime chunk arrives late "
              "(mean); shadow exec: cosine of the executed actions vs the full path's", "  on the same frame "
              "(shadow mode), mean/min over frames."]
    if name is not None and any("pairs" in r for r in rows):
        who = "its baseline (none, same timing, latency model and execution)" if several else name
        legend.insert(0, f"vs {name}: -b/+c = paired episodes (same task, init state, seed) where only {who} "
                         f"succeeded / only the variant did;\n  p = exact McNemar test on those pairs (small p: the "
                         "variants really differ); d>=N: the smallest success difference (points) these pairs\n  "
                         "could detect (80% power, two-sided 5%, Connor 1987): a smaller difference is not a finding. "
                         "Success: k/n, rate, 95% Wilson interval.")
    return table + "\n" + "\n".join(legend)


def _table_row(r: dict[str, Any]) -> list[str]:
    success = "-" if r["success_rate"] is None else (
        f"{r['successes']}/{r['n']} {100 * r['success_rate']:.0f}% [{100 * r['wilson_low']:.0f}-{100 * r['wilson_high']:.0f}]")
    if "pairs" in r:
        paired = paired_text(r)
    else:
        paired = "(baseline)" if r["policy"] == r.get("baseline") else "-"
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["full_by_reason"].items(), key=lambda kv: -kv[1]))
    if r["errors"]:
        reasons = f"{reasons}  [{r['errors']} errors]".lstrip()
    fmt = tables.fmt
    return [r["policy"], r["suite"], success, paired, fmt(r["reuse_rate"], ".0%"), fmt(r.get("cost_ms"), ".1f"),
            fmt(r.get("hz"), ".1f"), fmt(r["speedup"], ".2f", "x"), fmt(r.get("delay_steps"), ".1f"),
            _shadow_exec(r), reasons]


def paired_text(r: dict[str, Any]) -> str:
    """'-b/+c p=0.62 d>=35': the paired test of a row and the smallest difference its pairs could detect."""
    detectable = "" if r.get("detectable") is None else f" d>={100 * r['detectable']:.0f}"
    return f"-{r['base_only']}/+{r['variant_only']} p={r['mcnemar_p']:.2f}{detectable}"


def _shadow_exec(r: dict[str, Any]) -> str:
    if r.get("shadow_exec_mean") is None:
        return "-"
    return f"{r['shadow_exec_mean']:.3f}/{r['shadow_exec_min']:.3f}"


DENOISE_KEYS = ("num_steps", "schedule", "solver")  # a `none` with these is a denoising candidate, not the baseline


def pick_baseline(labels: list[str], names: dict[str, str], infos: dict[str, dict[str, Any]] | None = None) -> str | None:
    """The first variant named `none` (the full path every frame); with `infos` ({label: its parameters}),
    one at the checkpoint's denoising settings first (`none` with num_steps / solver / schedule is a
    denoising candidate compared against it). None when there is no `none`."""
    candidates = [label for label in labels if names.get(label) == "none"]
    if infos:
        plain = [label for label in candidates if not any(k in (infos.get(label) or {}) for k in DENOISE_KEYS)]
        candidates = plain or candidates
    return candidates[0] if candidates else None


def pick_baselines(variants: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """{label: its baseline}: the first `none` variant of the same timing, latency model, execution and RTC
    settings (variants: label -> {"name", "timing", "latency", "execution", "rtc_*", ...}; missing: sync /
    calibrated / naive / RTC defaults)."""
    def key(info: dict[str, Any]) -> tuple:
        rtc = tuple(sorted((k, v) for k, v in info.items() if k in RTC_DEFAULTS and RTC_DEFAULTS[k] != v))
        return info.get("timing") or "sync", info.get("latency") or "calibrated", info.get("execution") or "naive", rtc

    out = {}
    for label, info in variants.items():
        out[label] = pick_baseline([l for l in variants if key(variants[l]) == key(info)],
                                   {l: v["name"] for l, v in variants.items()}, variants)
    return out
