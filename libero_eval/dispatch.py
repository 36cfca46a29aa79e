"""Who runs what next, in the sweep driver (no Ray calls here: plain bookkeeping, unit-tested alone).

- `Scheduler`: hands a free rollout worker its next episode, preferring the task its env already holds.
- `ReplicaPool`: which policy replica serves a new episode: the least loaded healthy one. An episode keeps
  its replica for its whole life (its cache session lives there); a replica that failed an episode is out
  of rotation until a probe finds it answering again (Ray restarts it), or for good when it is dead.
- `Utilisation`: env-busy time per rollout worker, episodes per hour, and the replicas' busy fractions,
  for the sweep summary.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from libero_eval.specs import EpisodeSpec


class Scheduler:
    """Hands each free worker the next episode, preferring the task its env already holds."""

    def __init__(self, specs: list[EpisodeSpec]):
        self.by_task: dict[tuple[str, int], list[EpisodeSpec]] = defaultdict(list)
        for s in specs:
            self.by_task[(s.suite, s.task_id)].append(s)
        self.retry: list[tuple[EpisodeSpec, int]] = []

    def left(self) -> int:
        return len(self.retry) + sum(len(v) for v in self.by_task.values())

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


HEALTHY, SUSPECT, DEAD = "healthy", "suspect", "dead"


class ReplicaPool:
    """Load and health of `n` policy replicas, as the driver sees them."""

    def __init__(self, n: int):
        self.load = [0] * n  # episodes in flight per replica
        self.state = [HEALTHY] * n
        self.episodes = [0] * n  # episodes started per replica

    def pick(self) -> int | None:
        """The healthy replica with the fewest episodes in flight (ties: the lowest index); None when none
        is healthy (the caller waits for a probe)."""
        healthy = [k for k, s in enumerate(self.state) if s == HEALTHY]
        if not healthy:
            return None
        k = min(healthy, key=lambda j: (self.load[j], j))
        self.load[k] += 1
        self.episodes[k] += 1
        return k

    def done(self, k: int) -> None:
        self.load[k] -= 1

    def suspect(self, k: int) -> bool:
        """Out of rotation until probed; True when it was healthy (start a probe)."""
        if self.state[k] != HEALTHY:
            return False
        self.state[k] = SUSPECT
        return True

    def probed(self, k: int, answered: bool, restartable: bool = True) -> None:
        if answered:
            self.state[k] = HEALTHY
        elif not restartable:
            self.state[k] = DEAD

    def all_dead(self) -> bool:
        return all(s == DEAD for s in self.state)


class Utilisation:
    """Env-busy seconds per worker over its lifetime in the sweep; episodes stored per hour."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.ready_at: dict[int, float] = {}
        self.gone_at: dict[int, float] = {}
        self.env_s: dict[int, float] = defaultdict(float)
        self.episode_s: dict[int, float] = defaultdict(float)
        self.episodes: dict[int, int] = defaultdict(int)
        self.stored = 0

    def worker_ready(self, i: int) -> None:
        self.ready_at.setdefault(i, time.perf_counter())
        self.gone_at.pop(i, None)

    def worker_gone(self, i: int) -> None:
        self.gone_at[i] = time.perf_counter()

    def episode(self, i: int, env_stats: dict[str, float], wall_s: float) -> None:
        self.env_s[i] += env_stats.get("reset_s", 0.0) + env_stats.get("step_s", 0.0)
        self.episode_s[i] += wall_s
        self.episodes[i] += 1

    def summary(self, replicas: list[dict[str, Any]]) -> dict[str, Any]:
        end = time.perf_counter()
        wall = end - self.t0
        workers = []
        for i in sorted(self.ready_at):
            life = max(1e-9, self.gone_at.get(i, end) - self.ready_at[i])
            workers.append({"worker": i, "episodes": self.episodes[i], "env_s": round(self.env_s[i], 2),
                            "episode_s": round(self.episode_s[i], 2), "alive_s": round(life, 2),
                            "env_busy": round(self.env_s[i] / life, 4), "episode_busy": round(self.episode_s[i] / life, 4)})
        return {"wall_s": round(wall, 2), "episodes": self.stored,
                "episodes_per_hour": round(self.stored / wall * 3600, 1) if wall > 0 else 0.0,
                "workers": workers, "replicas": replicas}


def utilisation_values(u: dict[str, Any]) -> dict[str, float]:
    """A sweep's utilisation as flat numbers (`sweep/*` in each variant's W&B summary): episodes/h, env-busy
    fraction mean and min over the workers, each replica's busy fraction, mean batch and requests."""
    if not u:
        return {}
    busy = [w["env_busy"] for w in u.get("workers") or []]
    out = {"sweep/episodes_per_hour": u.get("episodes_per_hour"), "sweep/wall_s": u.get("wall_s"),
           "sweep/workers": len(busy), "sweep/replicas": len(u.get("replicas") or [])}
    if busy:
        out.update({"sweep/env_busy_mean": round(sum(busy) / len(busy), 4), "sweep/env_busy_min": min(busy)})
    for k, r in enumerate(u.get("replicas") or []):
        for key in ("busy_fraction", "mean_batch_size", "requests"):
            out[f"sweep/replica{k}/{key}"] = (r or {}).get(key)
    return {k: v for k, v in out.items() if v is not None}


def format_utilisation(u: dict[str, Any]) -> str:
    """Lines for the sweep's output: episodes per hour, each worker's env-busy fraction, each replica's
    requests, mean batch and busy fraction."""
    if not u:
        return ""
    lines = [f"throughput: {u['episodes']} episodes in {u['wall_s']:.0f} s = {u['episodes_per_hour']:.0f} episodes/h"]
    if u.get("workers"):
        lines.append("rollout workers (env busy = time in env reset/steps / time alive; the rest: waiting on the "
                     "policy, Ray, video encoding): " + ", ".join(
                         f"#{w['worker']} {w['episodes']} ep, env busy {w['env_busy']:.0%}" for w in u["workers"]))
    for k, r in enumerate(u.get("replicas", [])):
        if r:
            fell = r.get("fallbacks") or {}
            lines.append(f"policy replica {k}: {r.get('requests', 0)} requests in {r.get('batches', 0)} batches "
                         f"(mean batch {r.get('mean_batch_size', 0):.2f}), busy {r.get('busy_fraction', 0):.0%}"
                         + (f"; ran eager where its backend could not: {dict(fell)}" if fell else ""))
        else:
            lines.append(f"policy replica {k}: no stats (unavailable at the end)")
    return "\n".join(lines)
