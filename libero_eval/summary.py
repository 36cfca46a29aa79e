"""Summary tables of stored results: success per task and overall, per policy label."""
from __future__ import annotations

from collections import defaultdict

from libero_eval.specs import EpisodeResult
from libero_eval.stats import wilson_interval
from libero_eval.tables import format_table


def _rate(results: list[EpisodeResult]) -> str:
    scored = [r for r in results if r.status != "error"]
    n, k = len(scored), sum(r.success for r in scored)
    if n == 0:
        return "-"
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} {100 * k / n:5.1f}% [{100 * lo:.0f}-{100 * hi:.0f}]"


def summary_table(results: list[EpisodeResult]) -> str:
    """Plain-text table. Errors are listed apart and never counted as task failures."""
    if not results:
        return "no results"
    by_label: dict[str, list[EpisodeResult]] = defaultdict(list)
    for r in results:
        by_label[r.policy_label].append(r)
    rows = []
    for label, rs in sorted(by_label.items()):
        by_task: dict[tuple[str, int], list[EpisodeResult]] = defaultdict(list)
        for r in rs:
            by_task[(r.suite, r.task_id)].append(r)
        for (suite, task_id), trs in sorted(by_task.items()):
            errors = sum(r.status == "error" for r in trs)
            steps = sum(r.steps for r in trs) / len(trs)
            wall = sum(r.wall_s for r in trs) / len(trs)
            rows.append([label, suite, task_id, _rate(trs), errors, f"{steps:.0f}", f"{wall:.1f}"])
        rows.append([label, "ALL", "", _rate(rs), sum(r.status == "error" for r in rs), "", ""])
    lines = [format_table(["policy", "suite", "task", "success (95% Wilson)", "errors", "steps", "s/ep"], rows,
                          align="<<><>>>")]
    failed = [r for r in results if r.status == "error"]
    if failed:
        lines.append("")
        lines.append(f"{len(failed)} episode(s) ended in an error (not counted as task failures):")
        for r in failed[:10]:
            first = (r.error or "").splitlines()[0] if r.error else ""
            lines.append(f"  {r.key}: {r.reason}: {first}")
    return "\n".join(lines)
