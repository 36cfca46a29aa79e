"""Sweep efficiency on this machine (Ray, real LIBERO), policy-actor throughput, Ray round-trip overhead.

1. Sweep efficiency: a sweep of the near-zero-cost `hold` policy; wall time vs the ideal
   (sum over episodes of measured env time (reset + steps) / cores).
2. Policy actor: throughput and mean batch size with 1, 2, 4, 8 concurrent clients (each keeps one request
   in flight, as a rollout worker does) for the tiny Pi0.5 on CPU.
3. Ray round trip: a no-op actor call, and an `infer` of the hold engine with a real-size observation.
Prints tables and writes benchmarks/results/sweep.json.
Run: .venv/bin/python -m benchmarks.bench_sweep [--episodes-trials 3] [--requests 24]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
import ray  # noqa: E402

from libero_eval.config import load_config  # noqa: E402
from libero_eval.ray_actors import PolicyActor  # noqa: E402
from libero_eval.sweep import init_ray, run_sweep  # noqa: E402
from policies.serving.model import ModelConfig  # noqa: E402
from policies.serving.variants import PolicyVariant  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "sweep.json"
ROOT = Path(__file__).resolve().parents[1]


def observation(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8).astype(np.float32),
        "prompt": "pick up the black bowl between the plate and the ramekin and place it on the plate",
    }


def sweep_efficiency(trials: int) -> dict:
    config = load_config(ROOT / "configs" / "hold_smoke.yaml", [f"trials={trials}", "max_steps=20"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        outcome = run_sweep(config, Path(tmp) / "sweep", progress=False)
        wall = time.perf_counter() - t0
    env_s = sum(r.env_stats.get("reset_s", 0) + r.env_stats.get("step_s", 0) for r in outcome.results)
    episode_s = sum(r.wall_s for r in outcome.results)
    cores = os.cpu_count() or 1
    workers = config.ray.num_workers
    return {
        "episodes": len(outcome.results), "workers": workers, "cores": cores, "wall_s": wall,
        "sum_env_s": env_s, "sum_episode_s": episode_s,
        "ideal_s": env_s / min(cores, workers),
        "efficiency": (env_s / min(cores, workers)) / wall,
    }


def actor_throughput(clients_list: list[int], requests: int) -> list[dict]:
    rows = []
    variant = PolicyVariant.make("none", "none")
    actor = PolicyActor.options(num_cpus=0.5).remote(ModelConfig(kind="tiny", seed=0, device="cpu"), [variant], 8, 5.0, 1)
    obs = observation()
    for clients in clients_list:
        sessions = [f"bench/{clients}/{i}" for i in range(clients)]
        ray.get([actor.open.remote(s, "none", i) for i, s in enumerate(sessions)])
        ray.get(actor.infer.remote(sessions[0], obs))  # warm-up
        before = ray.get(actor.stats.remote())
        t0 = time.perf_counter()
        inflight = {actor.infer.remote(s, obs): s for s in sessions}
        sent = len(inflight)
        done = 0
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            s = inflight.pop(ready[0])
            ray.get(ready[0])
            done += 1
            if sent < requests:
                inflight[actor.infer.remote(s, obs)] = s
                sent += 1
        wall = time.perf_counter() - t0
        after = ray.get(actor.stats.remote())
        batches = after["batches"] - before["batches"]
        reqs = after["requests"] - before["requests"]
        rows.append({"clients": clients, "requests": done, "wall_s": wall, "throughput_rps": done / wall,
                     "mean_batch_size": reqs / batches if batches else 0.0})
        ray.get([actor.close.remote(s) for s in sessions])
    ray.kill(actor)
    return rows


def round_trip(n: int = 200) -> dict:
    actor = PolicyActor.options(num_cpus=0.5).remote(ModelConfig(), [PolicyVariant.make("hold", "hold")], 1, 0.0, 1)
    ray.get(actor.open.remote("rt", "hold", 0))
    obs = observation()
    for _ in range(10):
        ray.get(actor.infer.remote("rt", obs))
    noop, infer = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        ray.get(actor.stats.remote())
        noop.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ray.get(actor.infer.remote("rt", obs))
        infer.append(time.perf_counter() - t0)
    ray.kill(actor)
    return {"calls": n, "noop_ms_median": 1e3 * statistics.median(noop),
            "hold_infer_ms_median": 1e3 * statistics.median(infer),
            "observation_bytes": int(sum(v.nbytes for v in obs.values() if hasattr(v, "nbytes")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3, help="trials per task in the efficiency sweep (2 tasks)")
    parser.add_argument("--requests", type=int, default=24, help="requests per client count")
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()

    init_ray(load_config(ROOT / "configs" / "hold_smoke.yaml"))
    out = {"machine": f"{os.cpu_count()} cores, no GPU"}
    out["round_trip"] = rt = round_trip()
    out["actor"] = rows = actor_throughput([1, 2, 4, 8], args.requests)
    if not args.skip_sweep:
        out["sweep"] = sw = sweep_efficiency(args.trials)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))

    print(f"Ray round trip: no-op {rt['noop_ms_median']:.2f} ms, hold infer with a "
          f"{rt['observation_bytes'] / 1e3:.0f} kB observation {rt['hold_infer_ms_median']:.2f} ms (median of {rt['calls']})")
    print(f"\n{'clients':>7} {'requests':>8} {'req/s':>7} {'mean batch':>10}   (tiny Pi0.5, CPU)")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['throughput_rps']:>7.2f} {r['mean_batch_size']:>10.2f}")
    if not args.skip_sweep:
        print(f"\nsweep: {sw['episodes']} episodes on {sw['workers']} workers / {sw['cores']} cores in {sw['wall_s']:.0f} s; "
              f"ideal (env time / cores) {sw['ideal_s']:.0f} s -> efficiency {100 * sw['efficiency']:.0f}%")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
