"""A synthetic sweep run directory for the W&B and report tests: config.yaml, results.jsonl written through
the real ResultStore, tiny real mp4 videos with the HUD, and optionally a replay summary. Fast (no env, no
model), yet shaped like a real sweep: a baseline and a cache policy, decisions, signals, thresholds,
latency per stage, shadow deviation, a paired loss, and one error episode."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from libero_eval.config import SweepConfig, WandbConfig
from libero_eval.specs import EpisodeResult, EpisodeSpec
from libero_eval.store import ResultStore
from tasks.video import VideoWriter, hud_frame

SUITE = "libero_spatial"
TASKS = [0, 1]
TRIALS = 3
FRAMES = 6
BASELINE = "none"
CACHED = "adaptive_pixel_mae6_window3"
# (task, trial) pairs each policy solves; the cached policy loses (0, 1) and wins nothing new.
SOLVED = {BASELINE: {(0, 0), (0, 1), (1, 0)}, CACHED: {(0, 0), (1, 0)}}
ERROR_EPISODE = (CACHED, 1, 2)  # (label, task, trial) that ends in a policy error


def synthetic_config(videos: str = "all", name: str = "synth") -> SweepConfig:
    return SweepConfig(
        name=name, suites={SUITE: list(TASKS)}, trials=TRIALS, max_steps=30,
        policies=[{"name": "none"}, {"name": "adaptive", "label": "adaptive", "pixel_mae": [6], "window": [3]}],
        wandb=WandbConfig(enabled=True, mode="offline", videos=videos),
    )


def _records(label: str, task: int, trial: int) -> list[dict]:
    rng = np.random.default_rng(100 * task + trial)
    records = []
    for i in range(FRAMES):
        if label == BASELINE:
            decision, reason, signals, thresholds = "full", "baseline", {}, {}
            latency = {"vision": 20.0, "prefix": 50.0, "denoise": 30.0, "total": 100.0 + i}
        else:
            pixel_mae = float(rng.uniform(2, 10))
            if i == 0:
                decision, reason = "full", "first_frame"
            elif pixel_mae > 6.0:
                decision, reason = "full", "vision_drift"
            elif i % 3 == 0:
                decision, reason = "full", "window_expired"
            else:
                decision, reason = "reuse", "within_thresholds"
            shadow_cos = 1.0 if decision == "full" else float(rng.uniform(0.8, 1.0))
            signals = {"pixel_mae": pixel_mae, "state_drift": float(rng.uniform(0, 0.1)),
                       "shadow_cos": shadow_cos, "shadow_l2": float(1 - shadow_cos) * 3}
            thresholds = {"pixel_mae": 6.0, "state_drift": 0.05}
            total = 100.0 + i if decision == "full" else 40.0 + i
            latency = {"vision": 20.0, "prefix": 50.0 if decision == "full" else 0.0, "denoise": 30.0,
                       "total": total}
        records.append({"index": i, "decision": decision, "reason": reason, "signals": signals,
                        "latency_ms": latency, "cost_ms": latency["total"], "delay_steps": 0, "env_step": 5 * i,
                        "extra": {"batch_size": 1, "queue_wait_ms": 1.5, "thresholds": thresholds}})
    return records


def synthetic_results(run_dir: Path, config: SweepConfig) -> list[EpisodeResult]:
    """Every planned episode of `config`, with a real mp4 per non-error episode (one frame per query)."""
    results = []
    for task in TASKS:
        for trial in range(TRIALS):
            for variant in config.variants():
                label = variant.label
                spec = EpisodeSpec(SUITE, task, trial, label, 30)
                if (label, task, trial) == ERROR_EPISODE:
                    results.append(EpisodeResult(
                        key=spec.key, suite=SUITE, task_id=task, task_name=f"task_{task}_name", trial=trial,
                        policy_label=label, seed=spec.seed, status="error", success=False,
                        reason="policy_error", steps=0, wall_s=0.5, error="RuntimeError: boom",
                        policy={"label": label, "name": variant.name, **variant.param_dict}))
                    continue
                records = _records(label, task, trial)
                success = (task, trial) in SOLVED[label]
                video = Path("videos") / f"{spec.file_stem}.mp4"
                with VideoWriter(run_dir / video) as writer:
                    for rec in records:
                        image = np.full((64, 64, 3), 40 * rec["index"], np.uint8)
                        writer.append(hud_frame([image], [f"q{rec['index']} {rec['decision'].upper()} {rec['reason']}"],
                                                rec["decision"]))
                results.append(EpisodeResult(
                    key=spec.key, suite=SUITE, task_id=task, task_name=f"task_{task}_name", trial=trial,
                    policy_label=label, seed=spec.seed, status="success" if success else "failure",
                    success=success, reason="done" if success else "max_steps", steps=5 * FRAMES - 2 * success,
                    wall_s=3.0 + task + 0.1 * trial, video=str(video), video_frames=writer.frames, records=records,
                    policy={"label": label, "name": variant.name, **variant.param_dict}))
    return results


def make_run_dir(run_dir: Path, videos: str = "all", replay: bool = False,
                 store: bool = True) -> tuple[SweepConfig, list[EpisodeResult]]:
    """Write config.yaml and the videos (and replay/replay_summary.json) into run_dir, and the results into
    results.jsonl unless `store` is False (then the caller stores them, one by one, as a sweep would)."""
    config = synthetic_config(videos)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    results = synthetic_results(run_dir, config)
    if store:
        for r in results:
            ResultStore(run_dir).append(r)
    if replay:
        write_replay_summary(run_dir)
    return config, results


REPLAY = {
    "model": {"kind": "tiny", "seed": 0},
    "sequences": 4,
    "policies": [
        {"policy": BASELINE, "name": "none", "frames": 24, "cos_mean": 1.0, "cos_p5": 1.0, "cos_min": 1.0,
         "l2_mean": 0.0, "reuse_rate": 0.0, "compute_skipped": 0.0, "signals": {}},
        {"policy": CACHED, "name": "adaptive", "frames": 24, "cos_mean": 0.9612, "cos_p5": 0.8731,
         "cos_min": 0.8123, "l2_mean": 0.1234, "reuse_rate": 0.4583, "compute_skipped": 0.3125,
         "signals": {"pixel_mae": {"p50": 5.1, "p75": 6.8, "p90": 8.9, "p95": 9.6}}},
    ],
}


def write_replay_summary(run_dir: Path) -> None:
    (run_dir / "replay").mkdir(exist_ok=True)
    (run_dir / "replay" / "replay_summary.json").write_text(json.dumps(REPLAY))
