"""LIBERO env cost on this machine: creation, reset, step time by rendering mode, RSS per env.

Modes (replan 5, 256x256 cameras, hold policy, one libero_spatial task):
  no_lazy      cameras rendered on every step (robosuite's stock behaviour)
  lazy_video   lazy env, but a video frame every step (so it renders every step too)
  lazy_query   lazy env, video frames on query steps only (the CPU default)
Prints a table and writes benchmarks/results/env.json.
Run: .venv/bin/python -m benchmarks.bench_env [--steps 60]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

from libero_eval.episode import EpisodeConfig, run_episode  # noqa: E402
from libero_eval.specs import EpisodeSpec  # noqa: E402
from policies.simple import HoldPolicy  # noqa: E402
from tasks import registry  # noqa: E402
from tasks.env import EnvConfig, LiberoEnv  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "env.json"
FULL_EPISODE_STEPS = 230  # a typical libero_spatial episode at the full protocol (220 + 10 settle)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="policy actions per measured episode")
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--task", type=int, default=0)
    args = parser.parse_args()

    task = registry.get_task(args.suite, args.task)
    rss_before = rss_mb()
    modes = {
        "no_lazy": (EnvConfig(lazy_render=False), "every_step"),
        "lazy_video": (EnvConfig(lazy_render=True), "every_step"),
        "lazy_query": (EnvConfig(lazy_render=True), "query"),
    }
    rows = {}
    create_s = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, (config, video) in modes.items():
            t0 = time.perf_counter()
            env = LiberoEnv(task, config)
            create_s.append(time.perf_counter() - t0)
            rss_env = rss_mb()
            try:
                spec = EpisodeSpec(args.suite, args.task, 0, f"bench_{mode}", args.steps)
                result = run_episode(spec, env, HoldPolicy(), EpisodeConfig(video=video), run_dir=tmp)
            finally:
                env.close()
            st = result.env_stats
            per_step = st["step_s"] / st["steps"]
            loop_per_step = (result.wall_s - st["reset_s"]) / st["steps"]
            rows[mode] = {
                "env_step_s": per_step,
                "loop_step_s": loop_per_step,  # env + observation processing + video frames + policy
                "renders_per_step": st["renders"] / st["steps"],
                "reset_s": st["reset_s"],
                "episodes_per_hour_230_steps": 3600 / (st["reset_s"] + FULL_EPISODE_STEPS * loop_per_step),
                "rss_mb_with_env": rss_env,
            }
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "suite": args.suite, "task": args.task, "steps": args.steps,
        "env_create_s_mean": sum(create_s) / len(create_s),
        "rss_mb_before_env": rss_before,
        "modes": rows,
        "speedup_lazy_query_vs_no_lazy": rows["no_lazy"]["env_step_s"] / rows["lazy_query"]["env_step_s"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"env creation {out['env_create_s_mean']:.1f} s (mean of {len(create_s)}), RSS before env "
          f"{rss_before:.0f} MB")
    print(f"{'mode':<12} {'env s/step':>10} {'loop s/step':>11} {'renders/step':>12} {'reset s':>8} "
          f"{'ep/h (230 steps)':>16} {'RSS MB':>7}")
    for mode, r in rows.items():
        print(f"{mode:<12} {r['env_step_s']:>10.3f} {r['loop_step_s']:>11.3f} {r['renders_per_step']:>12.2f} "
              f"{r['reset_s']:>8.1f} {r['episodes_per_hour_230_steps']:>16.1f} {r['rss_mb_with_env']:>7.0f}")
    print(f"lazy_query vs no_lazy: {out['speedup_lazy_query_vs_no_lazy']:.2f}x less env time per step")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
