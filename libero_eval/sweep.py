"""Run a sweep on Ray: plan episodes, schedule them on rollout workers (few env re-creations) and policy
replicas (the least loaded), stream results to the run directory, retry infrastructure failures, replace
lost workers, resume interrupted sweeps. Here: the plan and the run directory; the actors and the loop:
libero_eval/driver.py; where the actors go: libero_eval/cluster.py; who runs what next: libero_eval/dispatch.py.

Run directory, written by the driver alone: config.yaml (the resolved config; a resume with a different one
is refused), results.jsonl (one final result per episode), attempts.jsonl (every retried attempt and why),
videos/ and observations/ (the files workers return with their results).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import yaml

from libero_eval import cluster
from libero_eval.config import LEGACY_VALUES, ConfigError, SweepConfig, diff_configs
from libero_eval.driver import SweepDriver, SweepOutcome
from libero_eval.specs import EpisodeSpec
from libero_eval.store import ResultStore
from libero_eval.trained_on import overlap_warning
from policies.base import PolicyError
from policies.serving.openpi_remote import describe_server, server_metadata
from tasks import layout, registry

log = logging.getLogger("libero_eval")


def plan_episodes(config: SweepConfig) -> list[EpisodeSpec]:
    """suites/tasks x trials x repeats x variants. Order: by task, then trial and repeat, then variant (so
    the variants of one pair run close together and a worker keeps its env)."""
    labels = [v.label for v in config.variants()]
    specs = []
    for suite, task_id in config.task_list():
        max_steps = config.max_steps or registry.MAX_STEPS[suite]
        for trial in config.trial_list():
            for repeat in range(config.repeats):
                for label in labels:
                    specs.append(EpisodeSpec(suite, task_id, trial, label, max_steps, repeat))
    return specs


def prepare_run_dir(config: SweepConfig, out: str | Path) -> Path:
    """Create the run directory, or check that a resumed one was made with the same config."""
    out = Path(out)
    stored = out / "config.yaml"
    resolved = config.to_dict()
    if stored.exists():
        old = yaml.safe_load(stored.read_text()) or {}
        diffs = diff_configs(old, resolved)
        if diffs:
            hints = [f"{section}.{key}={value}" for (section, key), value in LEGACY_VALUES.items()
                     if any(d.startswith(f"{section}.{key}: stored {value!r}") for d in diffs)]
            raise ConfigError(
                f"{out} holds a sweep with a different config; refusing to mix results. Differences:\n  "
                + "\n  ".join(diffs) + (f"\nTo resume it as it was made, add {' '.join(hints)}." if hints else "")
                + f"\nUse another --out, or delete {out} to start over."
            )
    scenes = out / SCENES_FILE
    used = {"seeding": config.env.seeding,
            "openpi_table_sha256": layout.digest([(s, t, k) for s, t in config.task_list()
                                                  for k in config.trial_list()])
            if config.env.seeding == "openpi" else None}
    if scenes.is_file() and json.loads(scenes.read_text()) != used:
        raise ConfigError(f"{out} was run with other openpi layout-table entries ({scenes}: "
                          f"{json.loads(scenes.read_text())}, now {used}): tasks/data/openpi_layouts.json changed "
                          "since; resuming would mix scene layouts. Use another --out, or delete it to start over.")
    out.mkdir(parents=True, exist_ok=True)
    stored.write_text(yaml.safe_dump(resolved, sort_keys=False))
    scenes.write_text(json.dumps(used))
    return out


SCENES_FILE = "scenes.json"  # which scene layouts the run uses (seeding, digest of its openpi table entries)


def run_sweep(config: SweepConfig, out: str | Path, progress: bool = True, on_result=None,
              on_start=None) -> SweepOutcome:
    """Run every planned episode that has no stored task outcome yet (none, or an infrastructure error whose
    retries ran out: the new result supersedes it, see store.py). `on_result(result)` is called after each
    stored result, `on_start(workers, policy_actor)` once the actors exist (tests, integrations: `workers`
    is the live list of rollout workers, a replaced worker takes its slot; `policy_actor` the first replica)."""
    t0 = time.perf_counter()
    run_dir = prepare_run_dir(config, out)
    store = ResultStore(run_dir)
    specs = plan_episodes(config)
    warning = overlap_warning(config, [(s, t, k) for s, t in config.task_list() for k in config.trial_list()])
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    done = store.finished_keys()
    todo = [s for s in specs if s.key not in done]
    if len(todo) < len(specs):
        again = len({r.key for r in store.load()} & {s.key for s in todo})
        print(f"resuming {run_dir}: {len(specs) - len(todo)} of {len(specs)} episodes already stored"
              + (f"; {again} stored infrastructure error(s) run again" if again else "")
              + f" (to start over: delete {run_dir} or pass another --out)")
    outcome = SweepOutcome(run_dir, [], len(specs), 0, 0, 0.0, {})
    if todo and config.model.kind == "openpi_server":  # unreachable: fail now, before Ray starts
        try:
            metadata = server_metadata(config.model.url, config.model.api_key_env)
        except PolicyError as exc:
            raise ConfigError(f"model.url: {exc}") from None
        print(f"openpi server at {config.model.url}: {describe_server(metadata)}")
    store.prune_videos()  # videos of attempts killed in an earlier run (before workers returned their files)
    if todo:
        shipped = cluster.init_ray(config)
        SweepDriver(config, run_dir, store, todo, len(specs), outcome, shipped, progress, on_result, on_start).run()
    keys = {s.key for s in specs}
    outcome.results = [res for res in store.load() if res.key in keys]
    outcome.wall_s = time.perf_counter() - t0
    return outcome
