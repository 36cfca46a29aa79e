"""Does the reported speedup depend on how many rollout workers ran? (It must not: README "Speed".)

The same small sweep (the shipped small Pi0.5, libero_spatial tasks 0 and 1, init state 40, `none`,
fixed_window 2 and 3, 30 steps, every frame priced by the Thor profile) on 1 and on 2 workers. With 2
workers the actor serves requests that meet in time in one batch, and the batch's wall time is shared; the
modelled cost of each frame is its own. Per variant: mean modelled latency, speedup vs `none`, and the mean
wall time per request (the batch's, for contrast), plus the batch sizes seen. Writes
benchmarks/results/speedup_workers.json.
Run: .venv/bin/python -m benchmarks.bench_speedup_workers
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

from libero_eval.config import load_config  # noqa: E402
from libero_eval.sweep import run_sweep  # noqa: E402
from libero_eval.sweep_summary import pick_baselines, policy_rows  # noqa: E402
from libero_eval.tables import format_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "speedup_workers.json"
OVERRIDES = ["trials=[40]", "max_steps=30", "latency=thor_trt_fp8", "wandb.enabled=false", "episode.video=none",
             "episode.shadow=false", "policies=[{name: none}, {name: fixed_window, window: [2, 3]}]"]


def main() -> int:
    out: dict = {"overrides": OVERRIDES, "runs": {}}
    rows_by_workers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            config = load_config(ROOT / "configs" / "smoke.yaml", [*OVERRIDES, f"ray.num_workers={workers}"])
            t0 = time.perf_counter()
            outcome = run_sweep(config, Path(tmp) / f"w{workers}", progress=False)
            baselines = pick_baselines({v.label: v.describe() for v in config.variants()})
            rows = {r["policy"]: r for r in policy_rows(outcome.results, baselines)}
            batches = Counter(rec["extra"]["batch_size"] for r in outcome.results for rec in r.records)
            rows_by_workers[workers] = rows
            out["runs"][workers] = {
                "wall_s": round(time.perf_counter() - t0, 1), "batch_sizes": dict(sorted(batches.items())),
                "policies": {label: {k: r[k] for k in ("cost_ms", "hz", "speedup", "wall_ms", "frames")}
                             for label, r in rows.items()}}
    body = []
    for label in rows_by_workers[1]:
        one, two = rows_by_workers[1][label], rows_by_workers[2][label]
        body.append([label, f"{one['cost_ms']:.1f}", f"{two['cost_ms']:.1f}", f"{one['speedup']:.3f}x",
                     f"{two['speedup']:.3f}x", f"{one['wall_ms']:.1f}", f"{two['wall_ms']:.1f}"])
    print(format_table(["policy", "cost ms 1w", "cost ms 2w", "speedup 1w", "speedup 2w", "wall ms 1w", "wall ms 2w"],
                       body, align="<>>>>>>"))
    print("batch sizes:", {w: r["batch_sizes"] for w, r in out["runs"].items()})
    out["speedup_equal"] = all(rows_by_workers[1][l]["speedup"] == rows_by_workers[2][l]["speedup"]
                               for l in rows_by_workers[1])
    RESULTS.write_text(json.dumps(out, indent=1))
    print(f"speedup identical on 1 and 2 workers: {out['speedup_equal']} -> {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
