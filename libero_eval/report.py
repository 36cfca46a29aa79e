"""The local report of a run directory: `report.html` (self-contained: tables, plots as PNG data URIs,
relative links to the videos) and `summary.md`, both built from results.jsonl alone, so they work on a
finished, partial or resumed sweep and never depend on the sweep process (or W&B) having survived.

Offline fidelity from `libero-eval replay` (replay/replay_summary.json) sits beside closed-loop success
when the run directory has both.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import json
import warnings
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

import numpy as np
import yaml

from libero_eval import plots
from libero_eval.config import LEGACY_VALUES, execution_defaults, expand_variants
from libero_eval.plots import overall_rows
from libero_eval.specs import EpisodeResult, pair_key
from libero_eval.stats import wilson_interval
from libero_eval.store import RESULTS_FILE, ResultStore
from libero_eval.sweep_summary import REUSE_DECISIONS, paired_text, pick_baseline, pick_baselines, policy_rows
from libero_eval.trained_on import overlap_warning
from tasks import registry

REPLAY_SUMMARY = Path("replay") / "replay_summary.json"
PLOTS_DIR = "report"  # PNG copies of the plots, for summary.md


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message says what is missing."""


# -- numbers ----------------------------------------------------------------------------------------

def episode_metrics(result: EpisodeResult) -> dict[str, float | int | None]:
    """What one episode's frames say: reuse rate, modelled cost per frame and realtime delays, the actor's
    wall time per frame (mean, p95: its batch's), shadow deviation."""
    records = result.records
    latency = [rec["latency_ms"]["total"] for rec in records if "total" in rec.get("latency_ms", {})]
    cost = [rec["cost_ms"] for rec in records if rec.get("cost_ms") is not None]
    delay = [rec["delay_steps"] for rec in records if rec.get("delay_steps") is not None]
    cos = [rec["signals"]["shadow_cos"] for rec in records if "shadow_cos" in rec.get("signals", {})]
    l2 = [rec["signals"]["shadow_l2"] for rec in records if "shadow_l2" in rec.get("signals", {})]
    reused = sum(rec.get("decision") in REUSE_DECISIONS for rec in records)
    return {
        "frames": len(records),
        "reuse_rate": reused / len(records) if records else None,
        "cost_mean_ms": mean(cost) if cost and len(cost) == len(records) else None,
        "delay_mean_steps": mean(delay) if delay else None,
        "fallback_actions": sum(rec.get("fallback_actions", 0) for rec in records),
        "latency_mean_ms": mean(latency) if latency else None,
        "latency_p95_ms": float(np.percentile(latency, 95)) if latency else None,
        "shadow_cos_mean": mean(cos) if cos else None,
        "shadow_cos_min": min(cos) if cos else None,
        "shadow_l2_mean": mean(l2) if l2 else None,
    }


def latency_p95(results: list[EpisodeResult]) -> float | None:
    values = [rec["latency_ms"]["total"] for r in results if r.status != "error" for rec in r.records
              if "total" in rec.get("latency_ms", {})]
    return float(np.percentile(values, 95)) if values else None


def task_rows(results: list[EpisodeResult]) -> list[dict[str, Any]]:
    """Success per (policy, suite, task) with 95% Wilson bounds; errors are counted apart."""
    groups: dict[tuple[str, str, int], list[EpisodeResult]] = defaultdict(list)
    for r in results:
        groups[(r.policy_label, r.suite, r.task_id)].append(r)
    rows = []
    for (label, suite, task_id), group in sorted(groups.items()):
        scored = [r for r in group if r.status != "error"]
        n, k = len(scored), sum(r.success for r in scored)
        lo, hi = wilson_interval(k, n)
        rows.append({"policy": label, "suite": suite, "task_id": task_id,
                     "task_name": next((r.task_name for r in group if r.task_name), ""),
                     "n": n, "successes": k, "success_rate": k / n if n else None,
                     "wilson_low": lo, "wilson_high": hi, "errors": len(group) - n})
    return rows


# -- the run directory ------------------------------------------------------------------------------

@dataclasses.dataclass
class RunData:
    run_dir: Path
    name: str
    config: dict[str, Any] | None  # the resolved config.yaml of a sweep; None for `libero-eval run` dirs
    results: list[EpisodeResult]
    planned: int | None
    retries: int
    variants: dict[str, dict[str, Any]]  # label -> {"name": ..., **params}
    baseline: str | None  # the first `none` variant (colours, order)
    replay: dict[str, Any] | None
    notes: list[str]
    baselines: dict[str, str | None] = dataclasses.field(default_factory=dict)  # label -> its baseline

    @property
    def rows(self) -> list[dict[str, Any]]:
        return policy_rows(self.results, self.baselines or self.baseline)

    @property
    def state(self) -> str:
        if self.planned is None:
            return f"{len(self.results)} episodes stored"
        if len(self.results) >= self.planned:
            return f"complete: {len(self.results)} of {self.planned} planned episodes"
        return (f"partial: {len(self.results)} of {self.planned} planned episodes stored "
                "(rerun the sweep with the same --out to resume)")


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS_FILE).is_file():
        if not run_dir.exists():
            raise ReportError(f"{run_dir} does not exist: expected a run directory made by `libero-eval sweep` "
                              "or `libero-eval run`")
        raise ReportError(f"{run_dir} has no {RESULTS_FILE}: no episode has finished there yet, or it is not a "
                          "run directory of `libero-eval sweep` / `libero-eval run`")
    results = ResultStore(run_dir).load()
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    variants: dict[str, dict[str, Any]] = {}
    planned = None
    if config:
        for v in expand_variants(config.get("policies") or [], execution_defaults(config)):
            variants[v.label] = {"name": v.name, **v.param_dict, "timing": v.execution.timing,
                                 "latency": v.execution.latency, "execution": v.execution.execution}
        planned = _planned(config, len(variants))
    for r in results:
        if r.policy_label not in variants:
            described = {k: v for k, v in (r.policy or {}).items() if k != "label"}
            variants[r.policy_label] = {"name": described.pop("name", r.policy_label), **described}
    attempts = run_dir / "attempts.jsonl"
    retries = sum(1 for line in attempts.read_text().splitlines() if line.strip()) if attempts.is_file() else 0
    replay, notes = None, []
    if (run_dir / REPLAY_SUMMARY).is_file():
        try:
            replay = json.loads((run_dir / REPLAY_SUMMARY).read_text())
        except json.JSONDecodeError as exc:
            notes.append(f"{REPLAY_SUMMARY} is not valid JSON ({exc}); offline fidelity left out")
    labels = sorted(variants)
    baseline = pick_baseline(labels, {k: v["name"] for k, v in variants.items()}, variants)
    baselines = pick_baselines(variants)
    name = (config or {}).get("name") or run_dir.resolve().name
    return RunData(run_dir, name, config, results, planned, retries, variants, baseline, replay, notes, baselines)


def _planned(config: dict[str, Any], n_variants: int) -> int | None:
    try:
        tasks = sum(registry.num_tasks(s) if t == "all" else len(t) for s, t in config["suites"].items())
        trials = config["trials"] if isinstance(config["trials"], int) else len(config["trials"])
        repeats = int(config.get("repeats", 1))
    except (KeyError, TypeError, ValueError) as exc:
        warnings.warn(f"config.yaml: cannot count the planned episodes ({exc})", stacklevel=2)
        return None
    return tasks * trials * repeats * n_variants


TIMELINES_PER_POLICY = 2


def worth_a_timeline(result: EpisodeResult) -> bool:
    """An episode whose timeline says something: a signal that varies, or a decision other than FULL (a
    baseline's all-FULL frames with constant signals would be a flat plot of constants)."""
    return bool(plots.varying_signals(result.records)) or any(
        rec.get("decision") not in (None, "full") for rec in result.records)


def pick_timelines(data: RunData, which: int | str | list[str] = TIMELINES_PER_POLICY) -> list[EpisodeResult]:
    """The episodes to draw timelines for. `which`: a number per policy (the episodes most worth a look:
    ones it failed where its baseline succeeded, the paired cost of caching, then its first episodes by task
    and trial), "all", or a list of episode keys (LABEL/SUITE/taskNN/trialNN; ReportError for an unknown one).
    By number or "all", only episodes worth_a_timeline."""
    if isinstance(which, list):
        by_key = {r.key: r for r in data.results}
        unknown = [k for k in which if k not in by_key]
        if unknown:
            raise ReportError(f"--timelines: no episode {', '.join(map(repr, unknown))} in {data.run_dir}; keys "
                              f"look like {next(iter(by_key), 'LABEL/SUITE/task00/trial00')!r} "
                              "(LABEL/SUITE/taskNN/trialNN, as in the episode table)")
        return [by_key[k] for k in which]
    by_label: dict[str, list[EpisodeResult]] = defaultdict(list)
    for r in sorted(data.results, key=pair_key):
        if worth_a_timeline(r):
            by_label[r.policy_label].append(r)
    chosen = []
    for label in sorted(by_label, key=lambda l: (l != data.baseline, l)):
        base_label = data.baselines.get(label, data.baseline)
        base = {pair_key(r): r.success for r in data.results if r.policy_label == base_label}
        episodes = by_label[label]
        lost = [r for r in episodes if not r.success and base.get(pair_key(r))]
        ranked = lost + [r for r in episodes if r not in lost]
        chosen.extend(ranked if which == "all" else ranked[:which])
    return chosen


def timeline_note(data: RunData, chosen: list[EpisodeResult], which: int | str | list[str]) -> str:
    """What the timelines section shows out of what, why, and how to ask for others."""
    ask = (f"Others: `libero-eval report {data.run_dir} --timelines all`, `--timelines 5` (per policy) or "
           "`--timelines LABEL/SUITE/taskNN/trialNN,...` (keys from the episode table).")
    if isinstance(which, list):
        return f"Timelines for the {len(chosen)} episode(s) asked for with --timelines. {ask}"
    worth = [r for r in data.results if worth_a_timeline(r)]
    flat = sorted({r.policy_label for r in data.results} - {r.policy_label for r in worth})
    why = ("all" if which == "all" else
           f"per policy, up to {which}: first those it failed where its baseline succeeded (the paired cost of "
           "caching), then its first by task and trial")
    left = (f" Not drawn: {', '.join(flat)} (every frame FULL and no signal that varies: a flat plot of "
            "constants says nothing)." if flat else "")
    return (f"Timelines for {len(chosen)} of the {len(data.results)} stored episodes ({why}).{left} Each sits "
            f"beside its video. {ask}")


def parse_timelines(text: str) -> int | str | list[str]:
    """--timelines: N (per policy), all, or comma-separated episode keys."""
    text = text.strip()
    if text == "all":
        return "all"
    if text.isdigit():
        return int(text)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys or any(k.count("/") != 3 for k in keys):
        raise ReportError(f"--timelines: expected a number per policy, all, or episode keys "
                          f"LABEL/SUITE/taskNN/trialNN separated by commas, got {text!r}")
    return keys


# -- formatting -------------------------------------------------------------------------------------

def _num(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _success(row: dict[str, Any]) -> str:
    if row.get("success_rate") is None:
        return "-"
    return f"{row['successes']}/{row['n']} {_pct(row['success_rate'])} [{_pct(row['wilson_low'])}-{_pct(row['wilson_high'])}]"


def policy_table(data: RunData) -> tuple[list[str], list[list[str]]]:
    header = ["policy", "suite", "success [95% CI]", "vs baseline (d>=: detectable pts)", "reuse", "latency ms (model)", "Hz", "speedup",
              "delay steps", "shadow cos, executed actions (mean/min)", "full frames by reason", "errors"]
    body = []
    for r in data.rows:
        paired = (paired_text(r) if "pairs" in r
                  else "(baseline)" if r["policy"] == r.get("baseline") else "-")
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["full_by_reason"].items(), key=lambda kv: -kv[1]))
        shadow = ("-" if r.get("shadow_exec_mean") is None
                  else f"{r['shadow_exec_mean']:.3f} / {r['shadow_exec_min']:.3f}")
        body.append([r["policy"], r["suite"], _success(r), paired, _pct(r["reuse_rate"]), _num(r["cost_ms"]),
                     _num(r["hz"]), _num(r["speedup"], ".2f") + ("x" if r["speedup"] else ""),
                     _num(r["delay_steps"]), shadow, reasons or "-", str(r["errors"])])
    return header, body


def fidelity_table(data: RunData) -> tuple[list[str], list[list[str]]]:
    """Closed-loop success beside the offline replay's action fidelity, one row per policy in either."""
    header = ["policy", "closed-loop success [95% CI]", "closed-loop reuse", "speedup", "replay frames",
              "cos mean", "cos p5", "cos min", "L2 mean", "replay reuse", "compute skipped"]
    closed = {r["policy"]: r for r in overall_rows(data.rows)}
    offline = {p.get("policy"): p for p in (data.replay or {}).get("policies", [])}
    body = []
    for label in sorted(set(closed) | set(offline), key=lambda l: (l != data.baseline, l)):
        c, o = closed.get(label, {}), offline.get(label, {})
        body.append([label, _success(c) if c else "-", _pct(c.get("reuse_rate")),
                     _num(c.get("speedup"), ".2f") + ("x" if c.get("speedup") else ""),
                     str(o.get("frames", "-")), _num(o.get("cos_mean"), ".4f"), _num(o.get("cos_p5"), ".4f"),
                     _num(o.get("cos_min"), ".4f"), _num(o.get("l2_mean"), ".4f"), _pct(o.get("reuse_rate")),
                     _pct(o.get("compute_skipped"))])
    return header, body


def signal_table(data: RunData) -> tuple[list[str], list[list[str]]]:
    header = ["policy", "signal", "p50", "p75", "p90", "p95"]
    body = []
    for p in (data.replay or {}).get("policies", []):
        for name, q in sorted((p.get("signals") or {}).items()):
            body.append([p.get("policy", "?"), name, *(_num(q.get(k), ".4g") for k in ("p50", "p75", "p90", "p95"))])
    return header, body


def task_table(data: RunData) -> tuple[list[str], list[list[str]]]:
    rows = task_rows(data.results)
    labels = sorted({r["policy"] for r in rows}, key=lambda l: (l != data.baseline, l))
    cells = {(r["suite"], r["task_id"], r["policy"]): r for r in rows}
    tasks = sorted({(r["suite"], r["task_id"], r["task_name"]) for r in rows})
    body = [[suite, str(task_id), name.replace("_", " "),
             *(_success(cells[(suite, task_id, l)]) if (suite, task_id, l) in cells else "-" for l in labels)]
            for suite, task_id, name in tasks]
    return ["suite", "task", "name", *labels], body


def episode_table(data: RunData) -> tuple[list[str], list[list[str]]]:
    """Every episode; the last column holds the video's relative path (linked in HTML)."""
    header = ["policy", "suite", "task", "trial", "outcome", "steps", "wall s", "frames", "reuse",
              "latency ms (mean/p95)", "shadow cos", "video"]
    body = []
    for r in sorted(data.results, key=lambda r: (r.policy_label, *pair_key(r))):
        m = episode_metrics(r)
        outcome = "success" if r.success else f"{r.status}: {r.reason}"
        body.append([r.policy_label, r.suite, str(r.task_id), f"{r.trial}" + (f" r{r.repeat}" if r.repeat else ""),
                     outcome, str(r.steps),
                     _num(r.wall_s), str(m["frames"]), _pct(m["reuse_rate"]),
                     f"{_num(m['latency_mean_ms'])} / {_num(m['latency_p95_ms'])}", _num(m["shadow_cos_mean"], ".3f"),
                     r.video or ""])
    return header, body


# -- writers ----------------------------------------------------------------------------------------

_CSS = """body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 20px}
th,td{border:1px solid #ccc;padding:3px 7px;font-size:13px;text-align:left}th{background:#f0f0f0}
img{max-width:100%;border:1px solid #ddd;margin:4px;vertical-align:top}.note{background:#fff6d6;padding:6px 10px}
.plots img{max-height:420px}.episode{display:flex;gap:10px;align-items:flex-start;margin-bottom:14px}
.episode img{max-width:60%;margin:0}.episode video{width:38%;border:1px solid #ddd}.novideo{color:#777}"""


def html_table(table_id: str, header: list[str], body: list[list[str]], link_last: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = []
    for row in body:
        cells = [f"<td>{html.escape(c)}</td>" for c in row]
        if link_last:
            cells[-1] = (f'<td><a href="{html.escape(row[-1])}">video</a></td>' if row[-1] else "<td>-</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def md_table(header: list[str], body: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines)


def img_tag(png: bytes, alt: str, img_id: str | None = None) -> str:
    ident = f' id="{img_id}"' if img_id else ""
    return f'<img{ident} alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def video_tag(src: str, title: str) -> str:
    """A video player for a relative path (loaded on demand: a report may hold many)."""
    return f'<video controls preload="metadata" src="{html.escape(src)}" title="{html.escape(title)}"></video>'


def _episode_view(run_dir: Path, result: EpisodeResult, timeline_png: bytes) -> str:
    """One episode's timeline with its video as a player beside it (so the frame where a signal spiked can
    be watched), or a word on why there is no video."""
    if result.video and (run_dir / result.video).is_file():
        video = video_tag(result.video, result.key)
    else:
        video = '<p class="novideo">no video stored for this episode (sweep video setting, or an error)</p>'
    return f'<div class="episode" id="episode-{html.escape(result.key)}">{img_tag(timeline_png, result.key)}{video}</div>'


def _notes(data: RunData) -> list[str]:
    notes = [data.state]
    if data.retries:
        notes.append(f"{data.retries} infrastructure failures were retried (attempts.jsonl)")
    # policies.serving imports torch (~2 s, via the cache policies): only this check needs it
    from policies.serving.variants import MODEL_FREE

    model = (data.config or {}).get("model") or {}
    if model.get("kind") == "tiny" and any(v["name"] not in MODEL_FREE for v in data.variants.values()):
        notes.append("the model has random weights (model.kind=tiny): success rates mean nothing here and need a "
                     "real checkpoint; decisions, reuse rate, latency and shadow deviation still differ")
    if data.config:
        warning = overlap_warning(data.config, sorted({(r.suite, r.task_id, r.trial) for r in data.results}))
        if warning:
            notes.append(warning)
    if any((rec.get("extra") or {}).get("remote_noise") for r in data.results for rec in r.records[:1]):
        notes.append("served by a foreign openpi server (model.kind openpi_server): its noise is its own, so episodes "
                     "are not paired by seed with other variants or runs (only libero-eval serve takes the episode's "
                     "seed), and every frame is recorded and priced as a full Pi0.5 frame")
    errors = [r for r in data.results if r.status == "error"]
    if errors:
        notes.append(f"{len(errors)} episode(s) ended in an error and are not counted as task failures")
    unpaired = sorted(label for label, base in data.baselines.items() if base is None)
    if data.baseline is not None and unpaired:
        notes.append(f"no baseline (policy none) with the same timing, latency model and execution for {', '.join(unpaired)}: "
                     "no paired test and no speedup for them")
    records = [rec for r in data.results if r.status != "error" for rec in r.records]
    priced = sum(rec.get("cost_ms") is not None for rec in records)
    if 0 < priced < len(records):
        notes.append(f"{len(records) - priced} of {len(records)} frames carry no modelled cost (stored before "
                     "per-frame costs existed): latency, Hz and speedup are shown as unknown where they mix")
    return notes + data.notes


SEEDING_TEXT = {"openpi": "openpi's evaluation layout for each init state (env.seeding: openpi)",
                "per_episode": "the paired per-episode seed's (env.seeding: per_episode)"}


def scene_text(config: dict[str, Any] | None) -> str | None:
    """Which scene layouts the run's episodes saw (run directories from before the option: per_episode)."""
    if not config:
        return None
    seeding = (config.get("env") or {}).get("seeding", LEGACY_VALUES[("env", "seeding")])
    return f"Scene layouts: {SEEDING_TEXT.get(seeding, seeding)}."


def write_report(run_dir: str | Path, timelines: int | str | list[str] = TIMELINES_PER_POLICY) -> tuple[Path, Path]:
    """Write report.html and summary.md into the run directory (and the plots as PNG under report/).
    `timelines`: which episodes get a timeline and a video player (pick_timelines)."""
    data = load_run(run_dir)
    run_dir = data.run_dir
    rows = data.rows
    figures = {"success_by_policy": plots.success_by_policy(rows, data.baseline),
               "success_vs_speedup": plots.success_vs_speedup(rows),
               "success_vs_latency": plots.success_vs_latency(rows)}
    sync_realtime = plots.sync_vs_realtime(rows)
    if sync_realtime is not None:
        figures["sync_vs_realtime"] = sync_realtime
    chosen = pick_timelines(data, timelines)
    drawn = [(r, png) for r in chosen if (png := plots.timeline(r))]  # an episode without frames has none
    plot_dir = run_dir / PLOTS_DIR
    plot_dir.mkdir(exist_ok=True)
    for name, png in figures.items():
        (plot_dir / f"{name}.png").write_bytes(png)

    tables = {"policies": policy_table(data), "tasks": task_table(data), "episodes": episode_table(data)}
    if data.replay:
        tables["fidelity"] = fidelity_table(data)
        tables["signals"] = signal_table(data)
    notes = _notes(data)
    scene = scene_text(data.config)

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>libero-eval: {html.escape(data.name)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>libero-eval report: {html.escape(data.name)}</h1>",
             *([f"<p>{html.escape(scene)}</p>"] if scene else []),
             *(f'<p class="note">{html.escape(n)}</p>' for n in notes),
             "<h2>Success per cache policy</h2>", html_table("policies-table", *tables["policies"]),
             '<div class="plots">', img_tag(figures["success_by_policy"], "success rate per policy", "plot-success"),
             img_tag(figures["success_vs_speedup"], "success vs speedup", "plot-pareto"), "</div>",
             "<h2>Success vs latency</h2><p>Each variant's modelled latency per frame (its own compute priced by "
             "its latency model, whatever it shared a batch with); realtime variants hollow.</p>",
             '<div class="plots">', img_tag(figures["success_vs_latency"], "success vs latency", "plot-latency"),
             *([img_tag(figures["sync_vs_realtime"], "sync vs realtime", "plot-sync-realtime")]
               if "sync_vs_realtime" in figures else []), "</div>"]
    if data.replay:
        model = data.replay.get("model") or {}
        parts += ["<h2>Offline fidelity beside closed-loop success</h2>",
                  f"<p>replay of {data.replay.get('sequences', '?')} recorded sequences; model: "
                  f"{html.escape(json.dumps(model, sort_keys=True))}</p>",
                  html_table("fidelity-table", *tables["fidelity"]),
                  "<h3>Signal distribution in replay</h3>", html_table("signals-table", *tables["signals"])]
    parts += ["<h2>Per task</h2>", html_table("tasks-table", *tables["tasks"])]
    parts += ["<h2>Timelines</h2><p>Signals that vary over the episode, with their trigger threshold (dashed), and "
              "the decision per frame (green FULL, orange REUSE, blue PARTIAL), beside the episode's video.</p>",
              f'<p class="note" id="timeline-note">{html.escape(timeline_note(data, [r for r, _ in drawn], timelines))}</p>',
              "<div id='timelines'>", *(_episode_view(run_dir, r, png) for r, png in drawn), "</div>"]
    parts += ["<h2>Episodes</h2>", html_table("episodes-table", *tables["episodes"], link_last=True),
              "</body></html>"]
    html_path = run_dir / "report.html"
    html_path.write_text("\n".join(parts), encoding="utf-8")

    md = [f"# libero-eval report: {data.name}", "", *([scene, ""] if scene else []), *(f"- {n}" for n in notes), "",
          "Full report with timelines and video links: [report.html](report.html)", "",
          "## Success per cache policy", "", md_table(*tables["policies"]), "",
          f"![success per policy]({PLOTS_DIR}/success_by_policy.png) "
          f"![success vs speedup]({PLOTS_DIR}/success_vs_speedup.png)",
          f"![success vs latency]({PLOTS_DIR}/success_vs_latency.png)"
          + (f" ![sync vs realtime]({PLOTS_DIR}/sync_vs_realtime.png)" if "sync_vs_realtime" in figures else ""), ""]
    if data.replay:
        md += ["## Offline fidelity beside closed-loop success", "", md_table(*tables["fidelity"]), ""]
    md += ["## Per task", "", md_table(*tables["tasks"]), ""]
    md_path = run_dir / "summary.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    return html_path, md_path
