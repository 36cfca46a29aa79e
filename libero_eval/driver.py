"""One sweep's actors and its dispatch loop (what `run_sweep` starts once the run directory is prepared):
policy replicas and rollout workers created where libero_eval/cluster.py plans them, episodes handed out
by libero_eval/dispatch.py, results and the files workers return written by this driver alone, lost
workers replaced or dropped, replicas probed back into rotation, utilisation collected at the end.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from libero_eval import cluster
from libero_eval.config import ConfigError, SweepConfig
from libero_eval.dispatch import ReplicaPool, Scheduler, Utilisation
from libero_eval.execution import resolve_latencies
from libero_eval.ray_actors import PolicyActor, RolloutWorker
from libero_eval.specs import EpisodeResult, EpisodeSpec, infra_error
from libero_eval.store import INFRA_REASONS, ResultStore

log = logging.getLogger("libero_eval")

WORKER_DIRS = ("videos", "observations")  # where the files a worker returns go
REPLICA_START_S = 900.0  # a policy replica loads (and warms up) the model within this, as at the sweep's start


@dataclasses.dataclass
class SweepOutcome:
    run_dir: Path
    results: list[EpisodeResult]
    planned: int
    ran: int
    retries: int
    wall_s: float
    actor_stats: dict[str, Any]  # the replicas' batching, summed ("replicas": each one's)
    utilisation: dict[str, Any] = dataclasses.field(default_factory=dict)  # dispatch.Utilisation.summary
    not_run: int = 0  # planned episodes left without a result (no worker or replica could run them)


class SweepDriver:
    """One sweep's actors and its dispatch loop. The driver alone writes the run directory: a worker's
    result comes back with its files (video, recorded observations) as bytes, which are written, then the
    result appended to results.jsonl."""

    def __init__(self, config: SweepConfig, run_dir: Path, store: ResultStore, todo: list[EpisodeSpec], planned: int,
                 outcome: SweepOutcome, shipped: bool, progress: bool, on_result, on_start):
        self.config, self.run_dir, self.store, self.outcome = config, run_dir, store, outcome
        self.on_result, self.on_start = on_result, on_start
        self.r = config.ray
        self.variants = config.variants()
        self.by_label = {v.label: v for v in self.variants}
        resources = ray.cluster_resources()
        cluster.check_render_device(config, resources)
        self.on_gpu_nodes = config.env.render_device == "gpu"  # workers kept to nodes with a GPU
        self.plan = cluster.plan_cluster(config, resources, len(todo), ray.nodes() if self.on_gpu_nodes else None)
        for line in self.plan.lines:
            print(line)
        self.model = cluster.shipped_model(config, shipped)
        if shipped:
            print(f"code: {cluster.PROJECT_ROOT} shipped to the nodes as Ray's working_dir (ray.ship_code)")
        self.scheduler = Scheduler(todo)
        self.replicas = ReplicaPool(self.plan.replicas)
        self.use = Utilisation()
        prefix = f"libero-eval-policy-{uuid.uuid4().hex[:8]}"
        self.actor_names = [f"{prefix}-{k}" for k in range(self.plan.replicas)]
        self.policy_actors: list = []
        self.workers: list = []  # slot i: its current actor (replaced when it dies), None once dropped
        self.worker_task: dict[int, tuple[str, int] | None] = {}
        self.starting: dict[int, float] = {}  # slot -> when its actor was created (not yet ready)
        self.starts: dict[int, int] = defaultdict(int)  # actors created per slot
        self.worker_node: dict[int, str] = {}  # slot -> the GPU node its actor was put on (render_device: gpu)
        self.render_index: dict[int, int] = {}  # slot -> its place among the workers on that node
        self.node_misses: dict[str, int] = defaultdict(int)  # GPU node -> workers it did not start in time
        self.replica_cpus: dict[str, float] = defaultdict(float)  # node -> CPUs the replicas placed there take
        self.idle: set[int] = set()  # ready workers without an episode (none left now, or no healthy replica)
        # object ref -> ("episode", i, spec, attempt, k, actor) | ("start", i, actor) | ("probe", k)
        self.pending: dict[Any, tuple] = {}
        # slot -> its current actor's episodes in submission order (an actor runs them one at a time, in order:
        # the first has started, the rest wait in the actor's queue, `ray.worker_queue` at most)
        self.queues: dict[int, list] = defaultdict(list)
        self.queue_of: dict[Any, list] = {}  # episode ref -> the queue it was put in (its actor's)
        self.unstarted: set = set()  # episode refs of a lost actor that never started: retried without an attempt
        self.probe_due: dict[int, float] = {}  # replica -> when to probe it again
        self.probing: dict[int, float] = {}  # replica -> since when it is being probed
        self.deadlines: dict[Any, tuple[float, Any]] = {}  # episode ref -> (kill its worker after, the actor)
        self.latencies: dict = {}
        self.nodes_seen: set[str] = set()
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for res in store.load():
            self.counts[res.policy_label][0] += res.success
            self.counts[res.policy_label][1] += res.status != "error"
        self.bar = tqdm(total=planned, initial=planned - len(todo), desc=f"sweep {config.name}", unit="ep",
                        dynamic_ncols=True, disable=not progress)

    # -- actors ------------------------------------------------------------------------------------------
    def start_replicas(self) -> None:
        """The replicas, placed and loaded before any worker is asked for (workers taking a GPU node's CPUs
        first could leave a replica nowhere to go); prints where each runs."""
        on_gpu = "num_gpus" in self.plan.replica_options
        for name in self.actor_names:
            self.policy_actors.append(PolicyActor.options(
                name=name, max_restarts=self.r.max_retries, scheduling_strategy="SPREAD",
                **self.plan.replica_options).remote(
                self.model, self.variants, self.r.max_batch, self.r.batch_wait_ms, None if on_gpu else 1,
                self.config.episode.shadow, self.config.episode.replan_steps, on_gpu))
        for k, actor in enumerate(self.policy_actors):
            _wait_started(actor)
            d = ray.get(actor.describe.remote(), timeout=60)
            serving = (f"model on {d['device']} ({d['backend']} backend), {d['threads']} torch threads, torch "
                       f"{d['torch']}, warm-up {d['warmup_ms']:.0f} ms") if d["backend"] != "none" else "no model"
            print(f"policy replica {k}: {d['host']} ({d['node_ip']}), {serving}")
            self.replica_cpus[d["node_id"]] += self.plan.replica_options.get("num_cpus", 0.0)

    def start_worker(self, i: int) -> None:
        self.starts[i] += 1
        node = self.gpu_node_for(i) if self.on_gpu_nodes else None
        if self.on_gpu_nodes and node is None:
            tqdm.write(f"rollout worker {i} dropped: no GPU node has room for it (env.render_device: gpu)")
            if i < len(self.workers):
                self.workers[i] = None
            else:
                self.workers.append(None)
            return
        actor = RolloutWorker.options(max_restarts=0, max_task_retries=0,
                                      **cluster.worker_options(self.config, i, node)).remote(
            self.config.env, self.config.episode, self.actor_names, self.variants, i, self.r.policy_timeout_s,
            self.render_index.get(i) if node is not None else None)
        if i < len(self.workers):
            self.workers[i] = actor
        else:
            self.workers.append(actor)
        self.worker_task[i] = None
        self.starting[i] = time.perf_counter()
        self.pending[actor.describe.remote()] = ("start", i, actor)

    def gpu_node_for(self, i: int) -> str | None:
        """The alive GPU node with the most room for slot i's worker (room: its CPUs, less the workers put
        there and those it failed to start in time); None when every one is full."""
        room = cluster.gpu_node_room(ray.nodes(), self.r.cpus_per_worker, self.replica_cpus)
        for node, misses in self.node_misses.items():
            if node in room:
                room[node] -= misses
        assigned: dict[str, int] = defaultdict(int)
        for j, node in self.worker_node.items():
            if j != i and j < len(self.workers) and self.workers[j] is not None:
                assigned[node] += 1
        node = cluster.pick_node(room, assigned)
        if node is not None:
            self.worker_node[i] = node
            taken = {self.render_index[j] for j, n in self.worker_node.items() if n == node and j != i
                     and j < len(self.workers) and self.workers[j] is not None}
            self.render_index[i] = min(set(range(len(taken) + 1)) - taken)  # its place on the node: its GPU
        return node

    def worker_lost(self, i: int, why: str, running_left: bool = False) -> None:
        """Slot i's actor is gone: replace it (where Ray finds room; GPU nodes only for render_device: gpu),
        or drop the slot after `max_retries` + 1 replacements in a row that never became ready. Its queued
        episodes never started; when `running_left`, the first one in its queue is the one that was running
        (its failure not processed yet)."""
        self.use.worker_gone(i)
        self.worker_task[i] = None
        self.unstarted.update(self.queues[i][1:] if running_left else self.queues[i])
        self.queues[i] = []
        ray.kill(self.workers[i], no_restart=True)
        self.starting.pop(i, None)
        self.idle.discard(i)
        if self.starts[i] > self.r.max_retries + 1:
            log.warning("rollout worker %d dropped (%s); the sweep goes on with fewer workers", i, why)
            tqdm.write(f"rollout worker {i} dropped ({why}); going on with {self.alive_workers() - 1} worker(s)")
            self.workers[i] = None
            return
        self.start_worker(i)

    def alive_workers(self) -> int:
        return sum(w is not None for w in self.workers)

    # -- dispatch ----------------------------------------------------------------------------------------
    def fill(self) -> None:
        """Give every idle worker an episode, while episodes are left and a replica is healthy."""
        for i in sorted(self.idle):
            self.submit(i)

    def submit(self, i: int) -> None:
        """Fill worker i's queue up to `ray.worker_queue` episodes. Only an idle worker takes one of the
        last episodes (fewer left than workers): they never wait behind another episode."""
        if self.workers[i] is None or i in self.starting:
            return
        queue = self.queues[i]
        while len(queue) < self.r.worker_queue and self.scheduler.left():
            if queue and self.scheduler.left() < self.alive_workers():
                break
            k = self.replicas.pick()
            if k is None:  # every replica is out of rotation: wait for a probe
                break
            busy = {t for j, t in self.worker_task.items() if j != i and t is not None}
            spec, attempt = self.scheduler.next(self.worker_task[i], busy)
            self.worker_task[i] = (spec.suite, spec.task_id)
            latency = self.latencies[self.by_label[spec.policy_label].execution.latency]
            actor = self.workers[i]
            ref = actor.run.remote(spec, attempt, latency, k)
            self.pending[ref] = ("episode", i, spec, attempt, k, actor)
            # a queued episode's deadline runs from its predecessor's (reset when it starts: episode_done)
            start = max([time.perf_counter()] + [self.deadlines[r][0] for r in queue[-1:] if r in self.deadlines])
            self.deadlines[ref] = (start + self.episode_deadline_s(spec), actor)
            queue.append(ref)
            self.queue_of[ref] = queue
        if queue:
            self.idle.discard(i)
        else:
            self.idle.add(i)

    def episode_done(self, ref, i: int, spec: EpisodeSpec, attempt: int, k: int, actor) -> None:
        self.replicas.done(k)
        files: dict[str, bytes] = {}
        self.deadlines.pop(ref, None)
        queue = self.queue_of.pop(ref)
        was_head = queue[0] is ref  # an actor runs its queue in order: only the head had started
        started = was_head and ref not in self.unstarted
        self.unstarted.discard(ref)
        queue.remove(ref)
        if queue and queue[0] in self.deadlines:  # the next one starts now: its deadline runs from here
            self.deadlines[queue[0]] = (time.perf_counter() + self.episode_deadline_s(self.pending[queue[0]][2]), actor)
        current = self.workers[i] is actor  # not an actor already lost and replaced
        try:
            data, files = ray.get(ref)
            result = EpisodeResult.from_dict(data)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as exc:
            # the worker died (killed, its node lost, or past its deadline), or its result went with its node
            if current:  # the first failure of this actor seen: the rest of its queue never started
                self.worker_lost(i, f"{type(exc).__name__}", running_left=not was_head)
            if not started:  # it waited in the lost actor's queue: handed out again, no attempt spent
                self.close_session(k, spec.key)  # (a no-op unless it opened one after all)
                self.scheduler.retry.append((spec, attempt))
                self.fill()
                return
            result = infra_error(spec, "worker_died", exc, attempt)
            self.close_session(k, spec.key)
        except Exception as exc:  # e.g. env creation failed inside the worker: a fresh worker takes the slot
            result = infra_error(spec, "env_error", exc, attempt)
            self.close_session(k, spec.key)
            if current:
                self.worker_lost(i, f"env_error: {_first_line(exc)}", running_left=not was_head)
        else:
            self.use.episode(i, result.env_stats, result.wall_s)
        if result.status == "error" and result.reason == "policy_unavailable" and self.replicas.suspect(k):
            self.probe(k)
        self.retry_or_store(spec, attempt, result, files)
        self.submit(i)
        self.fill()  # a retried episode may wait for any idle worker

    def close_session(self, k: int, key: str) -> None:
        """The dead attempt's session on replica k closes before its retry can open one of the same name."""
        try:
            ray.get(self.policy_actors[k].close.remote(key), timeout=10)
        except Exception as exc:  # a restarting replica has lost its sessions anyway
            log.debug("closing %s on replica %d: %s", key, k, exc)

    def probe(self, k: int) -> None:
        self.probe_due.pop(k, None)
        self.probing.setdefault(k, time.perf_counter())
        self.pending[self.policy_actors[k].ping.remote()] = ("probe", k)

    def probe_done(self, ref, k: int) -> None:
        try:
            ray.get(ref)
            self.probing.pop(k, None)
            self.replicas.probed(k, True)
            tqdm.write(f"policy replica {k} answers again")
            self.fill()
        except ray.exceptions.ActorDiedError:
            self.probing.pop(k, None)
            self.replicas.probed(k, False, restartable=False)
            tqdm.write(f"policy replica {k} is dead (out of restarts)")
        except Exception:  # restarting or unreachable: ask again shortly
            self.probe_due[k] = time.perf_counter() + 2.0

    def retry_or_store(self, spec: EpisodeSpec, attempt: int, result: EpisodeResult, files: dict[str, bytes]) -> None:
        if result.status == "error" and result.reason in INFRA_REASONS and attempt <= self.r.max_retries:
            with open(self.run_dir / "attempts.jsonl", "a") as f:
                f.write(json.dumps({"key": spec.key, "attempt": attempt, "reason": result.reason,
                                    "error": result.error, "at": _now()}) + "\n")
            self.outcome.retries += 1
            self.scheduler.retry.append((spec, attempt + 1))
            return
        for rel, data in files.items():  # the files first: a stored result always finds its video
            try:
                _write_file(self.run_dir, rel, data)
            except (OSError, ValueError) as exc:  # the result still counts; the missing file is said
                log.warning("%s of %s not written: %s", rel, spec.key, exc)
                tqdm.write(f"warning: {rel} of {spec.key} not written ({exc}); its result is stored without it")
                if result.video == rel:
                    result.video, result.video_frames = None, 0
        self.store.append(result)
        self.outcome.ran += 1
        self.use.stored += 1
        self.counts[spec.policy_label][0] += result.success
        self.counts[spec.policy_label][1] += result.status != "error"
        self.bar.update(1)
        self.bar.set_postfix_str(_progress_text(self.counts), refresh=True)
        if self.on_result is not None:
            self.on_result(result)

    def tick(self) -> None:
        """Timeouts and due probes, between results."""
        now = time.perf_counter()
        for i, since in list(self.starting.items()):
            if now - since > self.r.start_timeout_s:
                if i in self.worker_node:  # its GPU node had no room after all: one worker fewer there
                    self.node_misses[self.worker_node[i]] += 1
                self.worker_lost(i, f"not placed and started within ray.start_timeout_s={self.r.start_timeout_s:g} s")
        for k, due in list(self.probe_due.items()):
            if now >= due:
                self.probe(k)
        for ref, (deadline, actor) in list(self.deadlines.items()):
            if now > deadline:  # wedged (a hung render, ...): kill it; its episodes are retried
                log.warning("rollout worker %s past its episode deadline: killed", self.pending.get(ref, ("", "?"))[1])
                self.deadlines.pop(ref)
                ray.kill(actor, no_restart=True)
        for k, since in list(self.probing.items()):
            if now - since > REPLICA_START_S:  # restarting but never placed (or never loaded): out for good
                self.probing.pop(k)
                self.probe_due.pop(k, None)
                self.replicas.probed(k, False, restartable=False)
                tqdm.write(f"policy replica {k} did not come back within {REPLICA_START_S:.0f} s; out of rotation")

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.start_replicas()
            self.latencies = resolve_latencies({v.execution.latency for v in self.variants}, self.run_dir,
                                               lambda: ray.get(self.policy_actors[0].calibrate.remote(), timeout=900))
            for i in range(self.plan.workers):
                self.start_worker(i)
            if self.on_start is not None:
                self.on_start(self.workers, self.policy_actors[0])
            while self.in_flight() or (self.scheduler.left() and self.alive_workers()):
                if self.replicas.all_dead():
                    raise ConfigError("every policy replica is dead (out of restarts); stored results are kept: "
                                      "rerun the same command to resume")
                ready = ray.wait(list(self.pending), num_returns=1, timeout=1.0)[0] if self.pending else []
                if not self.pending:
                    time.sleep(0.5)  # idle workers wait for a replica's next probe
                for ref in ready:
                    what = self.pending.pop(ref)
                    if what[0] == "probe" and self.replicas.state[what[1]] == "dead":
                        continue
                    if what[0] == "episode":
                        self.episode_done(ref, *what[1:])
                    elif what[0] == "start":
                        self.worker_started(ref, *what[1:])
                    else:
                        self.probe_done(ref, what[1])
                self.tick()
            self.outcome.not_run = self.scheduler.left()
            if self.outcome.not_run:
                tqdm.write(f"{self.outcome.not_run} episode(s) not run: no rollout worker could be placed; rerun "
                           "the same command to resume them")
            self.collect_stats()
        finally:
            self.bar.close()
            for w in self.workers:
                if w is not None:
                    ray.kill(w, no_restart=True)
            for actor in self.policy_actors:
                try:  # stop the actor's batching loop before the process goes
                    ray.get(actor.shutdown.remote(), timeout=10)
                except Exception as exc:
                    log.debug("policy actor shutdown: %s", exc)
                ray.kill(actor, no_restart=True)

    def episode_deadline_s(self, spec: EpisodeSpec) -> float:
        """Generous: a second per env step, two policy timeouts, env creation. Only a hang reaches it."""
        return (spec.max_steps + self.config.episode.num_steps_wait) * 1.0 + 2 * self.r.policy_timeout_s + 300.0

    def in_flight(self) -> bool:
        return any(p[0] == "episode" for p in self.pending.values())

    def worker_started(self, ref, i: int, actor) -> None:
        if self.workers[i] is not actor:  # a start that timed out and was replaced meanwhile
            return
        try:
            d = ray.get(ref)
        except Exception as exc:  # its constructor failed (render device, ...): replace it
            self.worker_lost(i, f"start failed: {_first_line(exc)}")
            return
        self.starting.pop(i, None)
        self.use.worker_ready(i)
        if self.starts[i] > 1 or d["node_id"] not in self.nodes_seen:  # one line per node, and replacements
            tqdm.write(f"rollout worker {i}{' (replacement)' if self.starts[i] > 1 else ''}: {d['host']} "
                       f"({d['node_ip']}, node {d['node_id'][:8]}), rendering on {d['render_device']}")
        self.nodes_seen.add(d["node_id"])
        self.starts[i] = 1  # ready: a later loss gets fresh replacements
        self.submit(i)

    def collect_stats(self) -> None:
        replicas = []
        for actor in self.policy_actors:
            try:
                replicas.append(ray.get(actor.stats.remote(), timeout=30))
            except Exception:
                replicas.append({})
        total_req = sum(s.get("requests", 0) for s in replicas)
        total_batches = sum(s.get("batches", 0) for s in replicas)
        self.outcome.actor_stats = {"requests": total_req, "batches": total_batches,
                                    "mean_batch_size": total_req / total_batches if total_batches else 0.0,
                                    "open_sessions": sum(s.get("open_sessions", 0) for s in replicas),
                                    "replicas": replicas}
        self.outcome.utilisation = self.use.summary(replicas)


def _write_file(run_dir: Path, rel: str, data: bytes) -> None:
    """A worker's file into the run directory, atomically (a partial file is never seen under its name).
    Only `videos/NAME` and `observations/NAME`: anything else a worker returns is refused by its text."""
    parts = Path(rel).parts
    if len(parts) != 2 or parts[0] not in WORKER_DIRS or parts[1] in (".", "..") or Path(rel).is_absolute():
        raise ValueError(f"a worker returned a file the run directory does not take: {rel!r}")
    path = run_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else repr(exc))


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


def _wait_started(policy_actor, timeout_s: float = REPLICA_START_S) -> None:
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
