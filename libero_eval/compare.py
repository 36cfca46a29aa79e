"""`libero-eval report RUN_A RUN_B`: what changed between two run directories (e.g. yesterday's sweep and
today's). Variants are matched by label; episodes are paired by (suite, task, init state), as within a
sweep, so each shared variant gets B against A on the same episodes: discordant pairs, the exact McNemar
p and the smallest difference those pairs could detect. Differences are flagged: outcomes, steps or
decisions of paired episodes, a variant's settings, reuse and modelled cost, and every config key that
differs. Written as a table on the terminal, compare.html + compare.md (videos of the episodes whose
outcome changed, side by side) and, on request, one W&B run.

Everything comes from the two run directories' results.jsonl and config.yaml (report.load_run): neither is
modified.
"""
from __future__ import annotations

import dataclasses
import html
import json
import os
from pathlib import Path
from typing import Any

from libero_eval import plots, tables
from libero_eval.plots import overall_rows
from libero_eval.report import ReportError, RunData, html_table, img_tag, load_run, md_table, video_tag
from libero_eval.specs import EpisodeResult, pair_key
from libero_eval.sweep_summary import paired
from libero_eval.tracking import SECRET_NAME, flatten, flush_wandb, open_wandb_run, wandb_env

VIDEO_PAIRS = 12  # changed episodes shown with both videos in compare.html (all are in the table)
REUSE_FLAG = 0.01  # reuse rates further apart than this are flagged
COST_FLAG = 0.01  # relative change in modelled cost per frame that is flagged


@dataclasses.dataclass
class Comparison:
    a: RunData
    b: RunData
    rows: list[dict[str, Any]]  # one per variant label in either run
    episodes: list[dict[str, Any]]  # paired episodes of shared variants where something differs
    config_diff: list[tuple[str, Any, Any]]  # (dotted key, A's value, B's value); "<absent>" when missing

    @property
    def names(self) -> tuple[str, str]:
        a, b = self.a.run_dir.resolve().name, self.b.run_dir.resolve().name
        return (f"A:{a}", f"B:{b}") if a != b else (f"A:{self.a.run_dir}", f"B:{self.b.run_dir}")


def compare_runs(run_a: str | Path, run_b: str | Path) -> Comparison:
    """Read both run directories and compare them; ReportError if either cannot be read or they are one."""
    if Path(run_a).resolve() == Path(run_b).resolve():
        raise ReportError(f"{run_a} and {run_b} are the same run directory: give two different runs to compare")
    a, b = load_run(run_a), load_run(run_b)
    return Comparison(a, b, _rows(a, b), _changed_episodes(a, b), _config_diff(a, b))


def _outcomes(results: list[EpisodeResult], label: str) -> dict[tuple[str, int, int], EpisodeResult]:
    return {pair_key(r): r for r in results if r.policy_label == label and r.status != "error"}


def _decisions(result: EpisodeResult) -> list[str]:
    return [rec.get("decision", "") for rec in result.records]


def _rows(a: RunData, b: RunData) -> list[dict[str, Any]]:
    rows_a = {r["policy"]: r for r in overall_rows(a.rows)}
    rows_b = {r["policy"]: r for r in overall_rows(b.rows)}
    labels = sorted(set(rows_a) | set(rows_b), key=lambda l: (l not in (a.baseline, b.baseline), l))
    out = []
    for label in labels:
        ra, rb = rows_a.get(label), rows_b.get(label)
        row: dict[str, Any] = {"policy": label, "in": "both" if ra and rb else "A only" if ra else "B only",
                               "a": ra, "b": rb, "flags": []}
        if ra and rb:
            first, second = _outcomes(a.results, label), _outcomes(b.results, label)
            row.update(paired({k: r.success for k, r in first.items()}, {k: r.success for k, r in second.items()}))
            shared = set(first) & set(second)
            row["decisions_differ"] = sum(_decisions(first[k]) != _decisions(second[k]) for k in shared)
            row["flags"] = _flags(row, a.variants.get(label, {}), b.variants.get(label, {}))
        else:
            row["flags"] = [f"only in {row['in'][0]}"]
        out.append(row)
    return out


def _flags(row: dict[str, Any], variant_a: dict[str, Any], variant_b: dict[str, Any]) -> list[str]:
    """What differs for one shared variant, most important first."""
    ra, rb = row["a"], row["b"]
    flags = []
    settings = [f"{k} {variant_a.get(k, '-')}->{variant_b.get(k, '-')}"
                for k in sorted(set(variant_a) | set(variant_b)) if variant_a.get(k) != variant_b.get(k)]
    if settings:
        flags.append("settings: " + ", ".join(settings))
    if row["base_only"] + row["variant_only"]:
        flags.append(f"outcome differs in {row['base_only'] + row['variant_only']} of {row['pairs']} pairs"
                     + (f" (p={row['mcnemar_p']:.2f} < 0.05)" if row["mcnemar_p"] < 0.05 else ""))
    if row["decisions_differ"]:
        flags.append(f"decisions differ in {row['decisions_differ']} of {row['pairs']} pairs")
    if ra["reuse_rate"] is not None and rb["reuse_rate"] is not None and abs(ra["reuse_rate"] - rb["reuse_rate"]) > REUSE_FLAG:
        flags.append(f"reuse {ra['reuse_rate']:.0%}->{rb['reuse_rate']:.0%}")
    if ra.get("cost_ms") and rb.get("cost_ms") and abs(rb["cost_ms"] / ra["cost_ms"] - 1) > COST_FLAG:
        flags.append(f"cost {ra['cost_ms']:.1f}->{rb['cost_ms']:.1f} ms")
    errors = (ra["errors"], rb["errors"])
    if any(errors):
        flags.append(f"errors {errors[0]}->{errors[1]}")
    alone = (ra["n"] - row["pairs"], rb["n"] - row["pairs"])
    if any(alone):
        flags.append(f"without a partner: {alone[0]} in A, {alone[1]} in B")
    return flags


def _outcome(r: EpisodeResult | None) -> str:
    if r is None:
        return "-"
    return f"{'success' if r.success else f'{r.status}: {r.reason}'} ({r.steps} steps)"


def _changed_episodes(a: RunData, b: RunData) -> list[dict[str, Any]]:
    """Paired episodes of shared variants whose outcome, length or decisions differ (errors included)."""
    labels = {r.policy_label for r in a.results} & {r.policy_label for r in b.results}
    everything_a = {(r.policy_label, *pair_key(r)): r for r in a.results if r.policy_label in labels}
    everything_b = {(r.policy_label, *pair_key(r)): r for r in b.results if r.policy_label in labels}
    out = []
    for key in sorted(set(everything_a) & set(everything_b)):
        ra, rb = everything_a[key], everything_b[key]
        what = [name for name, differs in (("outcome", (ra.success, ra.status) != (rb.success, rb.status)),
                                           ("steps", ra.steps != rb.steps),
                                           ("decisions", _decisions(ra) != _decisions(rb))) if differs]
        if what:
            out.append({"policy": key[0], "suite": key[1], "task_id": key[2], "trial": key[3], "repeat": key[4],
                        "changed": what,
                        "a": ra, "b": rb})
    return out


def _config_diff(a: RunData, b: RunData) -> list[tuple[str, Any, Any]]:
    """Dotted config keys whose values differ (the variant list aside: that is the rows' business)."""
    def flat(data: RunData) -> dict[str, Any]:
        config = {k: v for k, v in (data.config or {}).items() if k != "policies"}
        return {k: json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict)) else v
                for k, v in flatten(config).items()}

    fa, fb = flat(a), flat(b)
    return [(k, fa.get(k, "<absent>"), fb.get(k, "<absent>")) for k in sorted(set(fa) | set(fb))
            if fa.get(k, "<absent>") != fb.get(k, "<absent>")]


# -- tables -----------------------------------------------------------------------------------------

def _success(r: dict[str, Any] | None) -> str:
    if not r or r.get("success_rate") is None:
        return "-"
    return f"{r['successes']}/{r['n']} {r['success_rate']:.0%}"


def _arrow(ra: dict | None, rb: dict | None, key: str, spec: str, suffix: str = "") -> str:
    left, right = (tables.fmt((r or {}).get(key), spec, suffix) for r in (ra, rb))
    if ra is None or rb is None or left == right:
        return right if ra is None else left
    return f"{left}->{right}"


def comparison_table(cmp: Comparison) -> tuple[list[str], list[list[str]]]:
    name_a, name_b = cmp.names
    header = ["policy", f"success {name_a}", f"success {name_b}", "delta", "paired -a/+b p", "detectable",
              "reuse", "speedup", "lat ms", "flags"]
    body = []
    for row in cmp.rows:
        ra, rb = row["a"], row["b"]
        delta = (f"{100 * (rb['success_rate'] - ra['success_rate']):+.0f} pts"
                 if ra and rb and ra["success_rate"] is not None and rb["success_rate"] is not None else "-")
        pairs = (f"-{row['base_only']}/+{row['variant_only']} p={row['mcnemar_p']:.2f}" if "pairs" in row else "-")
        detectable = "-" if row.get("detectable") is None else f"{100 * row['detectable']:.0f} pts"
        body.append([row["policy"], _success(ra), _success(rb), delta, pairs, detectable,
                     _arrow(ra, rb, "reuse_rate", ".0%"), _arrow(ra, rb, "speedup", ".2f", "x"),
                     _arrow(ra, rb, "cost_ms", ".1f"), "; ".join(row["flags"]) or "same"])
    return header, body


def episode_table(cmp: Comparison) -> tuple[list[str], list[list[str]]]:
    name_a, name_b = cmp.names
    header = ["policy", "suite", "task", "trial", "changed", name_a, name_b]
    body = [[e["policy"], e["suite"], str(e["task_id"]), str(e["trial"]) + (f" r{e['repeat']}" if e["repeat"] else ""),
             ", ".join(e["changed"]),
             _outcome(e["a"]), _outcome(e["b"])] for e in cmp.episodes]
    return header, body


def legend(cmp: Comparison) -> list[str]:
    name_a, name_b = cmp.names
    return [f"A = {cmp.a.run_dir} ({cmp.a.state}); B = {cmp.b.run_dir} ({cmp.b.state}).",
            f"paired -a/+b: episodes of the same variant, task and init state where only {name_a} / only "
            f"{name_b} succeeded; p = exact McNemar test on those pairs; detectable = the smallest success "
            "difference these pairs could detect (80% power, two-sided 5%, Connor 1987 from the number of pairs "
            "and the observed discordance): a delta below it is not a finding.",
            "reuse / speedup / lat ms: A->B where they differ (modelled cost per frame, see the README's Speed).",
            "Config keys that differ: " + ("; ".join(f"{k}: {'(hidden)' if SECRET_NAME.search(k) else f'{va} -> {vb}'}"
                                                     for k, va, vb in cmp.config_diff)
                                           if cmp.config_diff else "none (the variants' own settings aside).")]


def format_comparison(cmp: Comparison) -> str:
    header, body = comparison_table(cmp)
    text = tables.format_table(header, body, align="<>>>>>>>><")
    changed = sum("outcome" in e["changed"] for e in cmp.episodes)
    return "\n".join([text, *legend(cmp), f"{len(cmp.episodes)} paired episode(s) differ ({changed} in outcome); "
                      "listed in compare.html / compare.md."])


# -- writers ----------------------------------------------------------------------------------------

def _video(out_dir: Path, run: RunData, result: EpisodeResult, name: str) -> str:
    if not result.video or not (run.run_dir / result.video).is_file():
        return f'<p class="novideo">{html.escape(name)}: no video stored</p>'
    src = os.path.relpath((run.run_dir / result.video).resolve(), out_dir.resolve())
    return (f'<figure><figcaption>{html.escape(name)}: {html.escape(_outcome(result))}</figcaption>'
            f'{video_tag(src, result.key)}</figure>')


_CSS = """body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 20px}
th,td{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:left}th{background:#f0f0f0}
.note{background:#fff6d6;padding:6px 10px}img{max-width:100%}.pair{display:flex;gap:10px}
.pair figure{margin:0;width:45%}.pair video{width:100%;border:1px solid #ddd}.novideo{color:#777}"""


def write_comparison(cmp: Comparison, out_dir: str | Path) -> tuple[Path, Path]:
    """compare.html (self-contained but for the videos, linked relative to out_dir) and compare.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name_a, name_b = cmp.names
    shared = [r for r in cmp.rows if r["in"] == "both"]
    png = plots.success_a_vs_b([r["a"] for r in shared], [r["b"] for r in shared], name_a, name_b)
    (out_dir / "success_a_vs_b.png").write_bytes(png)
    table, episodes = comparison_table(cmp), episode_table(cmp)
    outcome_changed = [e for e in cmp.episodes if "outcome" in e["changed"]]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>libero-eval: {html.escape(name_a)} vs "
             f"{html.escape(name_b)}</title><style>{_CSS}</style></head><body>",
             f"<h1>libero-eval comparison: {html.escape(name_a)} vs {html.escape(name_b)}</h1>",
             *(f'<p class="note">{html.escape(line)}</p>' for line in legend(cmp)),
             "<h2>Per variant</h2>", html_table("compare-table", *table), img_tag(png, "success A vs B", "plot-ab"),
             f"<h2>Paired episodes that differ ({len(cmp.episodes)})</h2>", html_table("changed-table", *episodes),
             f"<h2>Episodes whose outcome changed, A and B side by side ({min(len(outcome_changed), VIDEO_PAIRS)} "
             f"of {len(outcome_changed)})</h2><div id='video-pairs'>"]
    for e in outcome_changed[:VIDEO_PAIRS]:
        parts.append(f"<h3>{html.escape(e['policy'])} | {e['suite']} task {e['task_id']} trial {e['trial']}</h3>"
                     f"<div class='pair'>{_video(out_dir, cmp.a, e['a'], name_a)}{_video(out_dir, cmp.b, e['b'], name_b)}</div>")
    parts.append("</div></body></html>")
    html_path = out_dir / "compare.html"
    html_path.write_text("\n".join(parts), encoding="utf-8")
    md = [f"# libero-eval comparison: {name_a} vs {name_b}", "", *(f"- {line}" for line in legend(cmp)), "",
          "## Per variant", "", md_table(*table), "", "![success A vs B](success_a_vs_b.png)", "",
          f"## Paired episodes that differ ({len(cmp.episodes)})", "", md_table(*episodes), ""]
    md_path = out_dir / "compare.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    (out_dir / "compare.json").write_text(json.dumps(comparison_json(cmp), indent=1, default=str))
    return html_path, md_path


def comparison_json(cmp: Comparison) -> dict[str, Any]:
    keep = ("policy", "n", "successes", "success_rate", "wilson_low", "wilson_high", "errors", "reuse_rate",
            "cost_ms", "speedup")
    return {"a": str(cmp.a.run_dir), "b": str(cmp.b.run_dir),
            "rows": [{"policy": r["policy"], "in": r["in"], "flags": r["flags"],
                      **{k: r.get(k) for k in ("pairs", "base_only", "variant_only", "mcnemar_p", "detectable",
                                               "decisions_differ")},
                      "a": {k: (r["a"] or {}).get(k) for k in keep} if r["a"] else None,
                      "b": {k: (r["b"] or {}).get(k) for k in keep} if r["b"] else None} for r in cmp.rows],
            "episodes": [{**{k: e[k] for k in ("policy", "suite", "task_id", "trial", "repeat", "changed")},
                          "a": _outcome(e["a"]), "b": _outcome(e["b"])} for e in cmp.episodes],
            "config_diff": [list(d) for d in cmp.config_diff]}


def log_comparison(cmp: Comparison, out_dir: str | Path, mode: str = "offline", project: str = "libero-eval") -> str:
    """One W&B run (job_type `compare`) holding the comparison table, the changed episodes, the plot and, per
    shared variant, the success of A and B in its summary. Returns the run's name. Raises on failure."""
    import wandb  # ~1 s to import: only when a comparison is logged

    out_dir = Path(out_dir).resolve()
    name_a, name_b = cmp.names
    name = f"compare-{name_a}-vs-{name_b}".replace(":", "_").replace("/", "_")
    config = {"run_a": str(cmp.a.run_dir.resolve()), "run_b": str(cmp.b.run_dir.resolve()),
              **{f"config_diff.{k}": f"{va} -> {vb}" for k, va, vb in cmp.config_diff if not SECRET_NAME.search(k) or k.endswith("_env")}}
    with wandb_env(out_dir, mode):
        run = open_wandb_run(mode, out_dir, project=project, job_type="compare", name=name, config=config,
                             tags=["compare"])
        try:
            header, body = comparison_table(cmp)
            eh, eb = episode_table(cmp)
            run.log({"comparison": wandb.Table(columns=header, data=body),
                     "changed_episodes": wandb.Table(columns=eh, data=eb),
                     "success_a_vs_b": wandb.Image(str(out_dir / "success_a_vs_b.png"))})
            for r in cmp.rows:
                if r["in"] == "both":
                    for side in ("a", "b"):
                        run.summary[f"{r['policy']}/success_{side}"] = r[side]["success_rate"]
                    run.summary[f"{r['policy']}/mcnemar_p"] = r["mcnemar_p"]
                    run.summary[f"{r['policy']}/pairs_differ"] = r["base_only"] + r["variant_only"]
            run.finish()
        except BaseException:
            run.finish(exit_code=1)
            raise
        finally:
            flush_wandb()
    return name
