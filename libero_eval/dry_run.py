"""`libero-eval sweep CONFIG --dry-run`: the plan (episodes, actors, resources) and an estimate of the wall
time, before anything runs.

The estimate comes from measured rates, not a promise:
- env: reset and one env step of the LIBERO env on this kind of machine (lazy rendering), from
  `benchmarks/results/rates.json` (written by `benchmarks/bench_sweep.py`);
- policy: one query's median latency at batch 1 on CPU for the model (same file), or a named latency
  profile's full-frame cost for replicas on GPUs;
- steps: every episode runs to `max_steps` (episodes that succeed end earlier), unless the run directory
  already holds results: then their measured mean steps;
- shadow mode: a cache variant's frames also run the full path (counted twice).
wall ~ max(env + policy CPU work / cores, episodes x episode time / workers, policy work / replicas),
divided by the sweep efficiency bench_sweep measured (Ray, video encoding, env creation). On this machine
it said 58 min for configs/small_heldout_seeds.yaml, which took 66 min (CPU contention slows env steps
beyond the solo rate).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from libero_eval import cluster
from libero_eval.config import SweepConfig
from libero_eval.store import ResultStore
from libero_eval.execution import load_named_profile
from policies.serving.latency import LatencyError

FULL_FRAME_EVALS = 10  # Pi0.5's denoising steps (openpi's default), to price a GPU replica's query
RATES = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "rates.json"


def local_resources(config: SweepConfig) -> dict[str, float]:
    """What a local Ray would have: this machine's cores (at least what the sweep asks) and CUDA GPUs."""
    import torch  # only to count local GPUs; the rest of the dry run never touches a model

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cores = os.cpu_count() or 1
    return {"CPU": float(max(cores, cluster.required_cpus(config))), "GPU": float(gpus), "cores": float(cores)}


def load_rates(path: Path = RATES) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_key(config: SweepConfig) -> str:
    if all(v.model_free for v in config.variants()):
        return "model_free"
    if config.model.kind == "checkpoint":
        return Path(config.model.checkpoint).name
    return config.model.kind


def describe(config: SweepConfig, out: Path, resources: dict[str, float], specs: list,
             rates: dict[str, Any] | None) -> str:
    done = ResultStore(out).finished_keys() if (out / "results.jsonl").exists() else set()
    todo = [s for s in specs if s.key not in done]
    plan = cluster.plan_cluster(config, resources, len(todo))
    variants = config.variants()
    lines = [f"plan for {config.name} -> {out}" + (f" (resuming: {len(done)} stored)" if done else ""),
             f"  episodes: {len(todo)} to run of {len(specs)} = {len(config.task_list())} task(s) x "
             f"{len(config.trial_list())} init state(s) x {config.repeats} repeat(s) x {len(variants)} variant(s)",
             f"  cluster: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
             + (f" ({resources['cores']:g} cores)" if "cores" in resources else "")
             + (f" at {config.ray.address}" if config.ray.address else " (a local Ray on this machine)"),
             *(f"  {line}" for line in plan.lines),
             f"  actors: {plan.replicas} policy replica(s) x {plan.replica_options}, {plan.workers} rollout worker(s) x "
             f"{{'num_cpus': {plan.cpus_per_worker:g}}} = {plan.cpus:g} CPUs, {plan.gpus:g} GPUs"]
    if todo:
        lines += estimate(config, plan, resources, todo, rates, ResultStore(out).load() if done else [])
    return "\n".join(lines)


def estimate(config: SweepConfig, plan: cluster.Plan, resources: dict[str, float], todo: list,
             rates: dict[str, Any] | None, stored: list) -> list[str]:
    if rates is None:
        return [f"  estimate: no measured rates ({RATES} missing); run `python -m benchmarks.bench_sweep`"]
    env = rates["env"]
    wait = config.episode.num_steps_wait
    mean_steps = sum(r.steps for r in stored) / len(stored) if stored else None
    steps = [(mean_steps if mean_steps is not None else s.max_steps) + wait for s in todo]
    queries_per_step = 1.0 / config.episode.replan_steps
    if all(v.model_free for v in config.variants()):
        queries_per_step = 1.0  # image-free policies are asked every step
    on_gpu = "num_gpus" in plan.replica_options
    query_s, source = _query_seconds(config, rates, on_gpu)
    env_work = sum(env["reset_s"] + n * env["env_step_s"] for n in steps)
    shadowed = {v.label for v in config.variants() if config.episode.shadow and v.name != "none"}
    policy_work = sum(n * queries_per_step * (2 if s.policy_label in shadowed else 1)
                      for n, s in zip(steps, todo)) * query_s
    episode_s = (env_work + policy_work) / len(todo)
    cpu_work = env_work + (0.0 if on_gpu else policy_work)
    cores = resources.get("cores", resources.get("CPU", 1.0))  # physical cores (local), else Ray's CPUs
    bounds = {"CPU": cpu_work / max(1.0, cores),
              "workers": math.ceil(len(todo) / plan.workers) * episode_s,
              "replicas": policy_work / plan.replicas}
    efficiency = rates.get("sweep_efficiency") or 1.0
    wall = max(bounds.values()) / efficiency
    if stored:
        basis = f"this run's {len(stored)} stored episodes: mean {mean_steps:.0f} steps"
    else:
        basis = "every episode to max_steps: successes end earlier"
    bound = max(bounds, key=bounds.get)
    return [f"  estimate: ~{_minutes(wall)} of wall time, {len(todo) / wall * 3600:.0f} episodes/h "
            f"(bound by {bound}; {basis})",
            f"  rates: env reset {env['reset_s']:.2f} s, env step {env['env_step_s'] * 1e3:.0f} ms "
            f"({rates.get('machine', '?')}), policy query {query_s * 1e3:.0f} ms ({source}), sweep efficiency "
            f"{efficiency:.0%} (benchmarks/bench_sweep.py)"]


def _query_seconds(config: SweepConfig, rates: dict[str, Any], on_gpu: bool) -> tuple[float, str]:
    key = model_key(config)
    if on_gpu:
        try:
            p = load_named_profile(config.latency)
            full_ms = p.vision_ms + p.prefix_ms + FULL_FRAME_EVALS * p.velocity_eval_ms + p.overhead_ms
            return full_ms / 1e3, f"latency profile {config.latency}, a full frame of {FULL_FRAME_EVALS} evaluations"
        except (LatencyError, ValueError):
            return 0.0, "a GPU replica: no named latency profile, policy time left out"
    queries = rates.get("policy_query_ms", {})
    if key in queries:
        return queries[key] / 1e3, f"{key} at batch 1 on CPU"
    if key == "model_free":
        return rates.get("round_trip_ms", 0.0) / 1e3, "a Ray round trip"
    return max(queries.values(), default=0.0) / 1e3, f"no rate for {key}: the slowest measured model"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
