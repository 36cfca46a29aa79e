"""Experiment tracking behind `Tracker`, whose hooks do nothing by default; W&B is one implementation.

Order of trust: the sweep appends each result to results.jsonl before any tracker hears of it, and
`make_tracker` wraps the tracker in `GuardedTracker`, which logs an exception and switches tracking off for
the rest of the sweep. A W&B failure (no disk, bad mode, no login) never loses a result or sinks a sweep,
and `libero-eval report <run_dir> --wandb` logs a run directory again at any time.

W&B layout: one run per (sweep, policy variant), group = sweep name, job_type = the variant's label, the
resolved config as flat keys (`policy.<param>`, `model.kind`, ...). History: one row per episode
(`episode/*`, step metric `episode`) with the rollout video (capped per task by `wandb.videos`) and its
signal timeline. At the end: the per-frame table `frames`, the summary (success with 95% Wilson bounds
overall / per suite / per task, latency, Hz, reuse rate, speedup, paired test) and the cross-policy plots.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from PIL import Image

from libero_eval import plots
from libero_eval.config import ConfigError, SweepConfig, WandbConfig
from libero_eval.dispatch import utilisation_values
from libero_eval.plots import overall_rows
from libero_eval.report import REPLAY_SUMMARY, episode_metrics, latency_p95, load_run, task_rows, worth_a_timeline
from libero_eval.specs import EpisodeResult
from libero_eval.store import RESULTS_FILE, ResultStore
from libero_eval.execution import stored_latencies
from libero_eval.sweep_summary import pick_baseline

log = logging.getLogger("libero_eval")

LOGGED_MARKER = "logged.json"  # under <run_dir>/wandb: labels whose runs finished, with the keys they hold
MAX_FRAME_ROWS = 200_000  # wandb.Table's own row limit
FRAME_COLUMNS = ["episode", "suite", "task_id", "trial", "episode_success", "frame", "env_step", "decision",
                 "reason", "cost_ms", "delay_steps", "fallback_actions", "shadow_cos"]
EPISODE_IDS = ("episode/key", "episode/suite", "episode/reason", "episode/task_id", "episode/trial", "episode/repeat",
               "episode/error")
SECRET_NAME = re.compile(r"api[_-]?key|token|secret|password|credential", re.IGNORECASE)


class Tracker:
    """Hooks a sweep calls; each does nothing unless a subclass says otherwise."""

    failure: str | None = None

    def on_result(self, result: EpisodeResult) -> None:
        """After `result` was stored."""

    def finish(self, results: list[EpisodeResult], rows: list[dict[str, Any]], baseline: str | None) -> None:
        """Once at the end, with every stored result of the sweep and its summary rows (policy_rows)."""

    def close(self) -> None:
        """Release whatever is open without finishing it properly (an interrupted sweep, a failure)."""


class GuardedTracker(Tracker):
    """Calls the inner tracker; its first exception is logged and switches tracking off, the sweep goes on."""

    def __init__(self, inner: Tracker, run_dir: str | Path):
        self.inner = inner
        self.run_dir = Path(run_dir)
        self.failure = None

    def on_result(self, result):
        self._call("on_result", result)

    def finish(self, results, rows, baseline):
        self._call("finish", results, rows, baseline)

    def close(self):
        self._call("close")

    def _call(self, hook: str, *args) -> None:
        if self.failure is not None:
            return
        try:
            getattr(self.inner, hook)(*args)
        except Exception as exc:
            self.failure = f"{type(self.inner).__name__}.{hook}: {type(exc).__name__}: {exc}"
            log.warning("tracking failed and is off for the rest of this sweep (%s). Every result is still stored "
                        "in %s; log them again with `libero-eval report %s --wandb`.", self.failure,
                        self.run_dir / RESULTS_FILE, self.run_dir, exc_info=True)
            try:
                self.inner.close()
            except Exception:
                log.debug("closing the failed tracker failed too", exc_info=True)


# -- what a sweep is, for a tracker -----------------------------------------------------------------

@dataclasses.dataclass
class SweepInfo:
    name: str
    config: dict[str, Any]  # the resolved config (config.yaml); {} for `libero-eval run` directories
    variants: dict[str, dict[str, Any]]  # label -> {"name": ..., **params}
    trials: list[int]
    baseline: str | None

    @classmethod
    def from_config(cls, config: SweepConfig) -> "SweepInfo":
        variants = {v.label: {"name": v.name, **v.param_dict, "timing": v.execution.timing,
                              "latency": v.execution.latency, "execution": v.execution.execution}
                    for v in config.variants()}
        return cls(config.name, config.to_dict(), variants, config.trial_list(),
                   pick_baseline(list(variants), {k: v["name"] for k, v in variants.items()}, variants))

    @classmethod
    def from_run(cls, data) -> "SweepInfo":
        """From a report.RunData (a run directory read back)."""
        trials = (data.config or {}).get("trials")
        if isinstance(trials, int):
            trial_list = list(range(trials))
        elif isinstance(trials, list):
            trial_list = [int(t) for t in trials]
        else:
            trial_list = sorted({r.trial for r in data.results})
        return cls(data.name, data.config or {}, data.variants, trial_list, data.baseline)


def flat_config(sweep: SweepInfo, label: str) -> dict[str, Any]:
    """The run config: the variant's parameters as `policy.<key>` and the resolved config as dotted keys,
    so W&B's run table can sort and filter on each. Keys whose name looks secret are never logged."""
    flat: dict[str, Any] = {"sweep": sweep.name, "baseline": sweep.baseline, "policy.label": label}
    flat.update(flatten({"policy": dict(sweep.variants.get(label, {"name": label}))}))
    flat.update(flatten({k: v for k, v in sweep.config.items() if k not in ("policies", "wandb", "name")}))
    if "wandb" in sweep.config:
        flat["wandb.videos"] = sweep.config["wandb"].get("videos")
    dropped = sorted(k for k in flat if SECRET_NAME.search(k) and not k.endswith("_env"))  # *_env: a variable's name
    if dropped:
        log.warning("not logging config keys that look secret: %s", dropped)
    return {k: v for k, v in flat.items() if k not in dropped}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as dotted keys ({"a": {"b": 1}} -> {"a.b": 1}); lists and empty dicts are leaves."""
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: node}


def parse_video_cap(text: str) -> tuple[str, int | None]:
    """`wandb.videos`: all | failures | none | first:<k> (the first k trials of each task)."""
    if text in ("all", "failures", "none"):
        return text, None
    match = re.fullmatch(r"first:(\d+)", text or "")
    if match and int(match.group(1)) >= 1:
        return "first", int(match.group(1))
    raise ConfigError(f"wandb.videos: expected all, failures, none or first:<k> with k >= 1, got {text!r}")


def wants_video(result: EpisodeResult, cap: tuple[str, int | None], trials: list[int]) -> bool:
    mode, k = cap
    if not result.video or mode == "none":
        return False
    if mode == "failures":
        return not result.success
    if mode == "first":
        return result.trial in sorted(trials)[:k]
    return True


def frame_rows(result: EpisodeResult) -> list[dict[str, Any]]:
    """One row per inference of the episode: decision, reason, every signal, latency per stage, thresholds,
    what the frame computed (`compute`: vision images, prefix token-layers, velocity evaluations) and numeric
    extras, keyed by column name (signals unprefixed, so `reason == "x" and shadow_cos < 0.9`
    reads as written)."""
    rows = []
    for rec in result.records:
        row: dict[str, Any] = {"episode": result.key, "suite": result.suite, "task_id": result.task_id,
                               "trial": result.trial, "episode_success": result.success,
                               "frame": rec.get("index"), "env_step": rec.get("env_step"),
                               "decision": rec.get("decision"), "reason": rec.get("reason"),
                               "cost_ms": rec.get("cost_ms"), "delay_steps": rec.get("delay_steps"),
                               "fallback_actions": rec.get("fallback_actions")}
        for name, value in (rec.get("signals") or {}).items():
            row[f"signal_{name}" if name in row else name] = value
        for stage, ms in (rec.get("latency_ms") or {}).items():
            row[f"latency_{stage}_ms"] = ms
        extra = rec.get("extra") or {}
        for name, value in (extra.get("thresholds") or {}).items():
            row[f"threshold_{name}"] = value
        for name, value in (extra.get("compute") or {}).items():  # what the frame ran (vision, prefix, loop)
            row[name] = value
        for name, value in extra.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[name] = value
        rows.append(row)
    return rows


def frame_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The fixed columns first, then signals, latencies and thresholds as they appear."""
    extra: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in FRAME_COLUMNS:
                extra.setdefault(key)
    return FRAME_COLUMNS + sorted(extra, key=lambda k: (k.startswith("latency_"), k.startswith("threshold_"), k))


def caption(result: EpisodeResult) -> str:
    task = result.task_name.replace("_", " ") if result.task_name else f"{result.suite} task {result.task_id}"
    outcome = "SUCCESS" if result.success else f"{result.status.upper()} ({result.reason})"
    return f"{task} | {result.suite} task {result.task_id} trial {result.trial} | {outcome}"


# -- W&B --------------------------------------------------------------------------------------------

class WandbTracker(Tracker):
    """One W&B run per policy variant, opened at the variant's first result (after logging the variant's
    results stored by an earlier, interrupted process) and finished in `finish`."""

    def __init__(self, run_dir: str | Path, sweep: SweepInfo, settings: WandbConfig,
                 stored: list[EpisodeResult] = (), skip_logged: bool = True, tags: tuple[str, ...] = ()):
        if settings.mode not in ("offline", "online"):
            raise ConfigError(f"wandb.mode: a W&B run needs offline or online, got {settings.mode!r}")
        self.run_dir = Path(run_dir).resolve()
        self.sweep = sweep
        self.settings = settings
        self.cap = parse_video_cap(settings.videos)
        self.skip_logged = skip_logged
        self.tags = list(tags)
        self._stored: dict[str, list[EpisodeResult]] = defaultdict(list)
        for r in stored:
            self._stored[r.policy_label].append(r)
        self._runs: dict[str, Any] = {}
        self._logged: dict[str, set[str]] = defaultdict(set)
        self._frames: dict[str, list[dict[str, Any]]] = defaultdict(list)

    @property
    def wandb_dir(self) -> Path:
        return self.run_dir / "wandb"

    def _env(self):
        return wandb_env(self.run_dir, self.settings.mode)

    def on_result(self, result: EpisodeResult) -> None:
        with self._env():
            self._log_episode(self._open(result.policy_label), result)

    def finish(self, results: list[EpisodeResult], rows: list[dict[str, Any]], baseline: str | None) -> None:
        with self._env():
            marker = self._read_marker()
            by_label: dict[str, list[EpisodeResult]] = defaultdict(list)
            for r in results:
                by_label[r.policy_label].append(r)
            for label, mine in sorted(by_label.items()):
                if (label not in self._runs and self.skip_logged
                        and {r.key for r in mine} <= set(marker.get(label, []))):
                    continue  # an earlier process already logged all of it in a finished run
                run = self._open(label)
                for r in mine:
                    if r.key not in self._logged[label]:
                        self._log_episode(run, r)
            pareto = {label: plots.success_vs_speedup(rows, highlight=label) for label in self._runs}
            bars = {label: plots.success_by_policy(rows, baseline, highlight=label) for label in self._runs}
            latency = {label: plots.success_vs_latency(rows, highlight=label) for label in self._runs}
            for label in list(self._runs):
                run = self._runs.pop(label)
                self._log_final(run, label, by_label.get(label, []), rows, bars[label], pareto[label], latency[label])
                run.finish()
                marker[label] = sorted(self._logged[label])
                self._write_marker(marker)
            flush_wandb()

    def close(self) -> None:
        with self._env():
            while self._runs:
                _, run = self._runs.popitem()
                run.finish(exit_code=1)
            flush_wandb()

    # -- internals --

    def _open(self, label: str):
        if label in self._runs:
            return self._runs[label]
        run = open_wandb_run(self.settings.mode, self.run_dir, project=self.settings.project,
                             entity=self.settings.entity, group=self.sweep.name, job_type=label,
                             name=f"{self.sweep.name}-{label}", config=self._run_config(label), tags=self.tags)
        self._runs[label] = run
        run.define_metric("episode")
        for key in ("episode/*", "rollout", "timeline"):
            run.define_metric(key, step_metric="episode")
        for r in self._stored.pop(label, []):
            self._log_episode(run, r)
        return run

    def _run_config(self, label: str) -> dict[str, Any]:
        """flat_config plus the variant's latency model as the run directory fixed it (latency.json: the
        calibrated stage times, or the named profile's)."""
        config = flat_config(self.sweep, label)
        model = stored_latencies(self.run_dir).get(self.sweep.variants.get(label, {}).get("latency"))
        if isinstance(model, dict):
            config.update({f"latency_profile.{k}": v for k, v in model.items()})
        return config

    def _log_episode(self, run, result: EpisodeResult) -> None:
        import wandb  # ~1 s to import: only once a W&B run opens

        label = result.policy_label
        if result.key in self._logged[label]:
            return  # already in this run (e.g. stored before this process and reported again)
        row: dict[str, Any] = {
            "episode": len(self._logged[label]),
            "episode/success": int(result.success), "episode/error": int(result.status == "error"),
            "episode/steps": result.steps, "episode/wall_s": result.wall_s, "episode/task_id": result.task_id,
            "episode/trial": result.trial, "episode/repeat": result.repeat, "episode/key": result.key,
            "episode/suite": result.suite,
            "episode/reason": result.reason,
        }
        row.update({f"episode/{k}": v for k, v in episode_metrics(result).items() if v is not None})
        video = self.run_dir / result.video if result.video else None
        if wants_video(result, self.cap, self.sweep.trials) and video is not None and video.is_file():
            row["rollout"] = wandb.Video(str(video), caption=caption(result), format="mp4")
            png = plots.timeline(result) if worth_a_timeline(result) else None  # no flat plot of constants
            if png is not None:
                row["timeline"] = wandb.Image(Image.open(io.BytesIO(png)), caption=caption(result))
        run.log(row)
        self._logged[label].add(result.key)
        self._frames[label].extend(frame_rows(result))

    def _log_final(self, run, label: str, mine: list[EpisodeResult], rows: list[dict[str, Any]],
                   bars_png: bytes, pareto_png: bytes, latency_png: bytes) -> None:
        import wandb  # ~1 s to import: only once a W&B run opens

        for key in EPISODE_IDS:  # per-episode identifiers: their "last value" summary means nothing
            if key in run.summary.keys():
                del run.summary[key]
        run.summary.update(summary_values(label, mine, rows, self._replay()))
        run.summary.update(utilisation_values(self._summary_file().get("utilisation") or {}))  # the sweep's
        frames = self._frames.pop(label, [])
        if len(frames) > MAX_FRAME_ROWS:
            log.warning("%s: %d frames, the W&B table keeps the first %d (all are in results.jsonl)",
                        label, len(frames), MAX_FRAME_ROWS)
            run.summary["frames_table_truncated"] = len(frames) - MAX_FRAME_ROWS
            frames = frames[:MAX_FRAME_ROWS]
        columns = frame_columns(frames)
        policy_columns = [k for k in rows[0] if k != "full_by_reason"] if rows else []
        run.log({
            "frame_table": wandb.Table(columns=columns, data=[[f.get(c) for c in columns] for f in frames]),
            "policies": wandb.Table(columns=policy_columns, data=[[r.get(c) for c in policy_columns] for r in rows]),
            "plots/success_by_policy": wandb.Image(Image.open(io.BytesIO(bars_png))),
            "plots/success_vs_speedup": wandb.Image(Image.open(io.BytesIO(pareto_png))),
            "plots/success_vs_latency": wandb.Image(Image.open(io.BytesIO(latency_png))),
        })

    def _replay(self) -> dict[str, Any] | None:
        path = self.run_dir / REPLAY_SUMMARY
        return json.loads(path.read_text()) if path.is_file() else None

    def _summary_file(self) -> dict[str, Any]:
        path = self.run_dir / "summary.json"  # written by `libero-eval sweep` before the tracker finishes
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:  # cut or hand-edited: the variant's own summary still goes out
            return {}

    def _read_marker(self) -> dict[str, list[str]]:
        path = self.wandb_dir / LOGGED_MARKER
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_marker(self, marker: dict[str, list[str]]) -> None:
        self.wandb_dir.mkdir(parents=True, exist_ok=True)
        (self.wandb_dir / LOGGED_MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))


@contextlib.contextmanager
def wandb_env(run_dir: Path, mode: str):
    """wandb's files stay inside `run_dir` (its wandb/ folder); the caller's environment is restored after."""
    wandb_dir = Path(run_dir) / "wandb"
    values = {"WANDB_DIR": str(run_dir), "WANDB_CACHE_DIR": str(wandb_dir / "cache"),
              "WANDB_DATA_DIR": str(wandb_dir / "data"), "WANDB_SILENT": "true"}
    if mode == "offline":  # online keeps the user's own settings (login, base_url)
        values["WANDB_CONFIG_DIR"] = str(wandb_dir / "config")
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def open_wandb_run(mode: str, run_dir: Path, **init):
    """wandb.init, quiet (no console capture, stats, code or git), files under `run_dir`; call inside
    wandb_env. Online without credentials fails at once instead of stopping at a login prompt."""
    import wandb  # ~1 s to import: only once a W&B run opens, never for a sweep without W&B

    if mode == "online" and not wandb.login(prompt=False, verify=False):
        raise RuntimeError("wandb.mode is online but no W&B credentials were found (run `wandb login` or "
                           "set WANDB_API_KEY)")
    return wandb.init(
        **init, mode=mode, dir=str(run_dir), reinit="create_new",
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, x_disable_meta=True,
                                x_disable_machine_info=True, save_code=False, disable_git=True,
                                disable_code=True, x_save_requirements=False),
    )


def flush_wandb() -> None:
    """Wait until wandb's service has written everything: `run.finish()` returns before the offline record
    log is complete on disk, and a sweep process killed right after must not leave a torn log. The service
    is per process and this process's W&B user is this tracker, so tearing it down is ours to do."""
    import wandb  # ~1 s to import: only once a W&B run opens

    wandb.teardown()


def summary_values(label: str, mine: list[EpisodeResult], rows: list[dict[str, Any]],
                   replay: dict[str, Any] | None = None) -> dict[str, Any]:
    """A variant run's summary: its overall row of policy_rows, plus latency p95 and Hz, per-suite and
    per-task success with Wilson bounds, `episode/*` as means over the scored episodes (not the last
    episode's values), and its offline replay fidelity when present."""
    out: dict[str, Any] = {}
    overall = next((r for r in overall_rows(rows) if r["policy"] == label), None)
    if overall is not None:
        for key, value in overall.items():
            if key == "full_by_reason":
                out.update({f"full_by_reason/{reason}": n for reason, n in value.items()})
            elif key not in ("policy", "suite"):
                out[key] = value
    out["latency_p95_ms"] = latency_p95(mine)
    for row in rows:
        if row["policy"] == label and row["suite"] != "ALL":
            for key in ("success_rate", "wilson_low", "wilson_high", "n", "successes", "errors"):
                out[f"suite/{row['suite']}/{key}"] = row[key]
    for row in task_rows(mine):
        for key in ("success_rate", "wilson_low", "wilson_high", "n", "successes"):
            out[f"task/{row['suite']}/task{row['task_id']:02d}/{key}"] = row[key]
    metrics = [episode_metrics(r) for r in mine if r.status != "error"]
    for key in ("steps", "wall_s"):
        values = [getattr(r, key) for r in mine if r.status != "error"]
        out[f"episode/{key}"] = mean(values) if values else None
    for key in metrics[0] if metrics else ():
        values = [m[key] for m in metrics if m[key] is not None]
        out[f"episode/{key}"] = mean(values) if values else None
    successes = [int(r.success) for r in mine if r.status != "error"]
    out["episode/success"] = mean(successes) if successes else None
    for p in (replay or {}).get("policies", []):
        if p.get("policy") == label:
            out.update({f"replay/{k}": v for k, v in p.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return {k: v for k, v in out.items() if v is not None}


def make_tracker(config: SweepConfig, run_dir: str | Path) -> Tracker:
    """The tracker a sweep's config asks for, guarded. Raises ConfigError for a bad `wandb.videos` (before
    anything runs); everything later only logs."""
    w = config.wandb
    if not w.enabled or w.mode == "disabled":
        return Tracker()
    parse_video_cap(w.videos)
    results_file = Path(run_dir) / RESULTS_FILE
    stored = ResultStore(run_dir).load() if results_file.is_file() else []
    return GuardedTracker(WandbTracker(run_dir, SweepInfo.from_config(config), w, stored=stored), run_dir)


def log_run_dir(run_dir: str | Path, mode: str | None = None) -> list[str]:
    """Log a finished (or partial) run directory to W&B from results.jsonl, after the fact; one fresh run per
    variant, tagged `relogged`. Returns the labels logged. Raises on failure: the caller asked for it."""
    data = load_run(run_dir)
    settings = WandbConfig(**((data.config or {}).get("wandb") or {}))
    settings.mode = mode or (settings.mode if settings.mode != "disabled" else "offline")
    tracker = WandbTracker(run_dir, SweepInfo.from_run(data), settings, skip_logged=False, tags=("relogged",))
    try:
        tracker.finish(data.results, data.rows, data.baseline)
    except BaseException:
        tracker.close()
        raise
    return sorted({r.policy_label for r in data.results})
