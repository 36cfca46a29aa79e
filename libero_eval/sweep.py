"""Run a sweep on Ray: plan episodes, schedule them on rollout workers (few env re-creations), stream results
to the run directory, retry infrastructure failures, resume interrupted sweeps.

Run directory: config.yaml (the resolved config; a resume with a different one is refused), results.jsonl
(one final result per episode), attempts.jsonl (every retried attempt and why), videos/.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
import yaml
from tqdm import tqdm

from libero_eval.config import LEGACY_VALUES, ConfigError, SweepConfig, diff_configs
from libero_eval.execution import resolve_latencies
from libero_eval.ray_actors import PolicyActor, RolloutWorker
from libero_eval.specs import EpisodeResult, EpisodeSpec
from libero_eval.store import INFRA_REASONS, ResultStore
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
_STARTED_LOCALLY = False


def required_cpus(config: SweepConfig) -> int:
    r = config.ray
    return math.ceil(r.num_workers * r.cpus_per_worker + r.policy_actor_cpus)


def init_ray(config: SweepConfig) -> None:
    """Start a local Ray on 127.0.0.1 (or join ray.address), with enough logical CPUs for every actor: an
    actor that cannot be placed would wait forever."""
    global _STARTED_LOCALLY
    need = required_cpus(config)
    if ray.is_initialized():
        have = ray.cluster_resources().get("CPU", 0)
        if have >= need:
            return
        if not _STARTED_LOCALLY:
            raise ConfigError(
                f"the Ray cluster has {have:g} CPUs; this sweep needs {need} (ray.num_workers="
                f"{config.ray.num_workers} x ray.cpus_per_worker={config.ray.cpus_per_worker:g} + "
                f"ray.policy_actor_cpus={config.ray.policy_actor_cpus:g})")
        ray.shutdown()  # our own local Ray, started for a smaller sweep: restart it bigger
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env_vars = {k: os.environ[k] for k in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "WANDB_MODE") if k in os.environ}
    env_vars.setdefault("MUJOCO_GL", "egl")
    env_vars.setdefault("PYOPENGL_PLATFORM", "egl")
    env_vars.update({"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "LP_NUM_THREADS": "1"})
    key_env = config.model.api_key_env  # an openpi server's key: the policy actor connects, wherever it runs
    if key_env and key_env in os.environ:
        env_vars[key_env] = os.environ[key_env]
    r = config.ray
    if r.address:
        ray.init(address=r.address, runtime_env={"env_vars": env_vars}, log_to_driver=False)
        have = ray.cluster_resources().get("CPU", 0)
        if have < need:
            raise ConfigError(f"the Ray cluster at {r.address} has {have:g} CPUs; this sweep needs {need}")
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": env_vars}, log_to_driver=False, configure_logging=False)
        _STARTED_LOCALLY = True


@dataclasses.dataclass
class SweepOutcome:
    run_dir: Path
    results: list[EpisodeResult]
    planned: int
    ran: int
    retries: int
    wall_s: float
    actor_stats: dict[str, Any]


class _Scheduler:
    """Hands each free worker the next episode, preferring the task its env already holds."""

    def __init__(self, specs: list[EpisodeSpec]):
        self.by_task: dict[tuple[str, int], list[EpisodeSpec]] = defaultdict(list)
        for s in specs:
            self.by_task[(s.suite, s.task_id)].append(s)
        self.retry: list[tuple[EpisodeSpec, int]] = []

    def next(self, current: tuple[str, int] | None, busy_tasks: set) -> tuple[EpisodeSpec, int] | None:
        for i, (spec, attempt) in enumerate(self.retry):
            if (spec.suite, spec.task_id) == current:
                return self.retry.pop(i)
        if current in self.by_task and self.by_task[current]:
            return self.by_task[current].pop(0), 1
        if self.retry:
            return self.retry.pop(0)
        candidates = [k for k, v in self.by_task.items() if v]
        if not candidates:
            return None
        # a task no other worker holds, with the most episodes left
        candidates.sort(key=lambda k: (k in busy_tasks, -len(self.by_task[k])))
        return self.by_task[candidates[0]].pop(0), 1


def run_sweep(config: SweepConfig, out: str | Path, progress: bool = True, on_result=None,
              on_start=None) -> SweepOutcome:
    """Run every planned episode that has no stored task outcome yet (none, or an infrastructure error whose
    retries ran out: the new result supersedes it, see store.py). `on_result(result)` is called after each
    stored result, `on_start(workers, policy_actor)` once the actors exist (tests, integrations)."""
    t0 = time.perf_counter()
    run_dir = prepare_run_dir(config, out)
    store = ResultStore(run_dir)
    specs = plan_episodes(config)
    warning = overlap_warning(config, [(s, t, k) for s, t in config.task_list() for k in config.trial_list()])
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    done = store.finished_keys()
    todo = [s for s in specs if s.key not in done]
    attempts_log = run_dir / "attempts.jsonl"
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
    store.prune_videos()  # videos of attempts killed in an earlier, interrupted run
    if todo:
        init_ray(config)
        variants = config.variants()
        by_label = {v.label: v for v in variants}
        latencies: dict = {}
        r = config.ray
        actor_opts, placement = policy_placement(config, ray.cluster_resources())
        use_gpu = "num_gpus" in actor_opts
        print(placement)
        actor_name = f"libero-eval-policy-{uuid.uuid4().hex[:8]}"
        policy_actor = PolicyActor.options(name=actor_name, max_restarts=r.max_retries, **actor_opts).remote(
            config.model, variants, r.max_batch, r.batch_wait_ms, None if use_gpu else 1,
            config.episode.shadow, config.episode.replan_steps, use_gpu)
        n_workers = min(r.num_workers, len(todo))
        workers: list = []  # started once the latency models are fixed (a calibration runs alone)
        scheduler = _Scheduler(todo)
        worker_task: dict[int, tuple[str, int] | None] = {i: None for i in range(n_workers)}
        pending: dict[Any, tuple[int, EpisodeSpec, int]] = {}
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for res in store.load():
            counts[res.policy_label][0] += res.success
            counts[res.policy_label][1] += res.status != "error"
        bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc=f"sweep {config.name}", unit="ep",
                   dynamic_ncols=True, disable=not progress)

        def submit(i: int) -> None:
            busy = {t for j, t in worker_task.items() if j != i and t is not None}
            nxt = scheduler.next(worker_task[i], busy)
            if nxt is None:
                return
            spec, attempt = nxt
            worker_task[i] = (spec.suite, spec.task_id)
            ref = workers[i].run.remote(spec, attempt, latencies[by_label[spec.policy_label].execution.latency])
            pending[ref] = (i, spec, attempt)

        def retry_or_store(spec: EpisodeSpec, attempt: int, result: EpisodeResult) -> None:
            if result.status == "error" and result.reason in INFRA_REASONS and attempt <= r.max_retries:
                with open(attempts_log, "a") as f:
                    f.write(json.dumps({"key": spec.key, "attempt": attempt, "reason": result.reason,
                                        "error": result.error, "at": _now()}) + "\n")
                outcome.retries += 1
                scheduler.retry.append((spec, attempt + 1))
                return
            store.append(result)
            outcome.ran += 1
            counts[spec.policy_label][0] += result.success
            counts[spec.policy_label][1] += result.status != "error"
            bar.update(1)
            bar.set_postfix_str(_progress_text(counts), refresh=True)
            if on_result is not None:
                on_result(result)

        try:
            _wait_started(policy_actor)
            latencies = resolve_latencies({v.execution.latency for v in variants}, run_dir,
                                          lambda: ray.get(policy_actor.calibrate.remote(), timeout=900))
            workers.extend(
                RolloutWorker.options(num_cpus=r.cpus_per_worker, max_restarts=-1, max_task_retries=0).remote(
                    config.env, config.episode, str(run_dir), actor_name, variants)
                for _ in range(n_workers))
            if on_start is not None:
                on_start(workers, policy_actor)
            for i in range(n_workers):
                submit(i)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                i, spec, attempt = pending.pop(ref)
                try:
                    result = EpisodeResult.from_dict(ray.get(ref))
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                    worker_task[i] = None  # a restarted worker has no env
                    result = _infra_error(spec, "worker_died", exc, attempt)
                    _wait_alive(workers[i])
                    try:  # the dead worker's session expires now; running episodes keep theirs
                        ray.get(policy_actor.close_stale.remote([s.key for _, s, _ in pending.values()]), timeout=30)
                    except Exception as stale_exc:
                        log.warning("could not expire stale sessions: %s", stale_exc)
                except Exception as exc:  # e.g. env creation failed inside the worker
                    worker_task[i] = None
                    result = _infra_error(spec, "env_error", exc, attempt)
                retry_or_store(spec, attempt, result)
                submit(i)
            try:
                outcome.actor_stats = ray.get(policy_actor.stats.remote(), timeout=30)
            except Exception:
                outcome.actor_stats = {}
        finally:
            bar.close()
            for w in workers:
                ray.kill(w, no_restart=True)
            try:  # stop the actor's batching loop before the process goes
                ray.get(policy_actor.shutdown.remote(), timeout=10)
            except Exception as exc:
                log.debug("policy actor shutdown: %s", exc)
            ray.kill(policy_actor, no_restart=True)
            _wait_dead(workers)  # no worker may still rename a video after the pruning
            store.prune_videos()  # of attempts that never finished (a killed worker's, an interrupt's)
    keys = {s.key for s in specs}
    outcome.results = [res for res in store.load() if res.key in keys]
    outcome.wall_s = time.perf_counter() - t0
    return outcome


def policy_placement(config: SweepConfig, cluster: dict[str, float]) -> tuple[dict[str, float], str]:
    """Ray resources for the policy actor, from the cluster's resources (never the driver's devices) and
    `model.device`, and a line saying what was chosen. ConfigError when `cuda` is asked of a cluster without
    a GPU."""
    r, device = config.ray, config.model.device
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 0.0)
    have = f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs"
    on_cpu = {"num_cpus": r.policy_actor_cpus}
    if config.model.kind == "openpi_server":
        return on_cpu, f"policy actor: a relay to {config.model.url} on CPU (the model is the server's)"
    if all(v.model_free for v in config.variants()):
        return on_cpu, "policy actor: model-free variants only, on CPU"
    if device == "cpu":
        return on_cpu, f"policy actor: CPU (model.device: cpu; {have})"
    if gpus >= 1:
        return {"num_gpus": 1, "num_cpus": 1}, f"policy actor: one GPU (model.device: {device}; {have})"
    if device == "cuda":
        raise ConfigError(f"model.device: cuda, but {have}: start the cluster with GPUs, or use model.device: "
                          "auto or cpu")
    return on_cpu, f"policy actor: CPU (model.device: auto and {have})"


def _progress_text(counts: dict[str, list[int]], width: int | None = None) -> str:
    """Successes so far per variant, shortened to fit the terminal beside tqdm's own ~45 columns."""
    width = width or shutil.get_terminal_size((80, 24)).columns
    room = max(12, width - 48)
    text = " | ".join(f"{k} {s}/{n}" for k, (s, n) in sorted(counts.items()))
    if len(text) <= room:
        return text
    total_s, total_n = sum(s for s, _ in counts.values()), sum(n for _, n in counts.values())
    text = f"{total_s}/{total_n} ok; " + " ".join(f"{s}/{n}" for _, (s, n) in sorted(counts.items()))
    return text if len(text) <= room else text[: room - 3] + "..."


def _wait_started(policy_actor, timeout_s: float = 900.0) -> None:
    """The policy actor loads the model and binds every variant to it before the first episode: a variant
    that does not fit the model (layers out of range, ...) or a checkpoint that does not load is a
    configuration error, said once, not an infrastructure failure of every episode."""
    try:
        ray.get(policy_actor.pid.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(f"the policy actor did not start within {timeout_s:.0f} s (loading the model?)") from None
    except ray.exceptions.RayActorError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        cause = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else repr(exc))
        raise ConfigError(f"the policy actor could not start: {cause.strip()}") from None


def _wait_dead(actors: list, timeout_s: float = 30.0) -> None:
    """ray.kill is asynchronous: wait until each actor's calls fail (its process is gone)."""
    deadline = time.perf_counter() + timeout_s
    for actor in actors:
        while time.perf_counter() < deadline:
            try:
                ray.get(actor.pid.remote(), timeout=5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                break
            time.sleep(0.1)


def _wait_alive(worker, timeout_s: float = 120.0) -> None:
    """After a worker died, wait until Ray has restarted it (calls fail with ActorUnavailableError until then)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            ray.get(worker.pid.remote(), timeout=30)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            time.sleep(0.5)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _infra_error(spec: EpisodeSpec, reason: str, exc: BaseException, attempt: int) -> EpisodeResult:
    return EpisodeResult(
        key=spec.key, suite=spec.suite, task_id=spec.task_id, task_name="", trial=spec.trial, repeat=spec.repeat,
        policy_label=spec.policy_label, seed=spec.seed, status="error", success=False, reason=reason, steps=0,
        wall_s=0.0, error=f"{type(exc).__name__}: {exc}", attempt=attempt, finished_at=_now(),
    )
