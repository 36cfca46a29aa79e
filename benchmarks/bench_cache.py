"""What each cache policy costs and how much it damages, on a recorded real LIBERO frame sequence.

    python benchmarks/bench_cache.py                 # tiny Pi0.5 on CPU (pi05_libero bf16, random weights, on a GPU)
    python benchmarks/bench_cache.py --record        # (re)record benchmarks/data/libero_spatial_t0_reach.npz

Per policy, every frame of the sequence served in order (one session, batch size 1):
  decision overhead   the policy's `decide` inside the engine (median and p95 ms, mean in the JSON; target
                      < 1 ms for 2 cameras at 224x224)
  latency             mean `total` per frame (first frame excluded: warm-up) and its ratio to `none`
  compute skipped     mean fraction of the prefix pass's token-layers not computed
  shadow deviation    action cosine vs the full path with the same noise (mean, p5, min), a second pass
  modelled cost       each frame's cost under the `calibrated` latency model (policies/serving/latency.py:
                      the engine's stages timed at batch 1, median of 5 calibrations) against the frame's
                      measured wall time (`total`, batch 1): mean ratio, median and p90 of |cost/wall - 1|
  calibration         5 calibrations in a row: each stage's spread and the full frame's (max-min)/median
The sequence: libero_spatial task 0, trial 0, a scripted reach (privileged state) toward the black bowl
that descends, closes the gripper and lifts: the arm and the wrist camera move, the scene around stays.
Writes a table to stdout and JSON to benchmarks/results/cache_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libero_eval.config import expand_variants  # noqa: E402
from libero_eval.observations import Sequence, load_sequence  # noqa: E402
from libero_eval.replay import DEFAULT_POLICIES  # noqa: E402
from libero_eval.tables import format_table  # noqa: E402
from policies.base import ActionChunk, InferenceRecord  # noqa: E402
from policies.pi05.configuration import Pi05Config  # noqa: E402
from policies.pi05.modeling import Pi05Model  # noqa: E402
from policies.pi05.processing import TINY_TOKENIZER, Normalizer, Pi05Processor, PromptTokenizer  # noqa: E402
from policies.serving.engine import Request  # noqa: E402
from policies.serving.latency import LatencyProfile  # noqa: E402
from policies.serving.pi05 import Pi05Engine  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "libero_spatial_t0_reach.npz"
POLICIES = [  # one variant of every cache policy, plus the seed code's gate and the repo's relevance rule
    *DEFAULT_POLICIES,
    {"name": "attention_drift", "label": "attention_drift_seed_code", "preset": "seed_code"},
    {"name": "vla_cache", "label": "vla_cache_repo", "relevance": "top_k"},
    # the token-skipping mechanism at full strength: every reusable token dropped at the pruning layers
    {"name": "vla_cache", "label": "vla_cache_repo_all", "relevance": "top_k", "reuse_proportion": 1.0},
]


# ---- recording


class ReachPolicy:
    """Scripted reach on privileged sim state: hover over the bowl, descend, close, lift (no model)."""

    name = "reach"

    def __init__(self, env, target_body: str = "akita_black_bowl_1_main", horizon: int = 10):
        self.env, self.target, self.horizon = env, target_body, horizon
        self.index = 0

    def reset(self, episode_id: str, seed: int) -> None:
        self.index = 0

    def end_episode(self, episode_id: str) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def infer(self, observation: dict[str, Any]) -> ActionChunk:
        sim = self.env.sim
        bowl = sim.data.body_xpos[sim.model.body_name2id(self.target)].copy()
        eef = np.asarray(observation["observation/state"][:3], dtype=np.float64)
        phase = self.index
        offset = np.array([0.0, 0.0, 0.10]) if phase < 10 else np.array([0.0, 0.0, 0.02])
        if phase >= 18:
            offset = np.array([0.0, 0.0, 0.25])  # lift
        gripper = 1.0 if 14 <= phase else -1.0
        actions = np.zeros((self.horizon, 7), dtype=np.float32)
        goal = bowl + offset
        for k in range(self.horizon):
            actions[k, :3] = np.clip(15.0 * (goal - eef), -1.0, 1.0)
            actions[k, 6] = gripper
        self.index += 1
        return ActionChunk(actions, InferenceRecord(index=phase, decision="expert", reason="scripted_reach"))


def record(path: Path, queries: int) -> None:
    # LIBERO (robosuite, MuJoCo) only when recording: the benchmark itself runs on the stored sequence
    from libero_eval.episode import EpisodeConfig, run_episode
    from libero_eval.specs import EpisodeSpec
    from tasks import registry
    from tasks.env import LiberoEnv

    spec = EpisodeSpec("libero_spatial", 0, 0, "reach", queries * 5)
    out = path.parent / "_recording"
    with LiberoEnv(registry.get_task("libero_spatial", 0)) as env:
        result = run_episode(spec, env, ReachPolicy(env), EpisodeConfig(video="none", record_observations=True),
                             run_dir=out)
    recorded = out / "observations" / f"{spec.file_stem}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    recorded.replace(path)
    for p in sorted(out.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    out.rmdir()
    print(f"recorded {len(result.records)} queries ({result.steps} steps, {result.status}) -> {path} "
          f"({path.stat().st_size / 1e6:.1f} MB)")


# ---- benchmark


def build_engine(config: str, device: str, dtype: str) -> tuple[Pi05Engine, dict[str, Any]]:
    """A preset with seeded random weights (latency and compute are real, actions are not), the tiny
    tokenizer (its ids are valid in every preset's vocabulary) and identity normalisation."""
    cfg = Pi05Config.from_name(config)
    with torch.device("meta"):
        model = Pi05Model(cfg)
    model = model.to_empty(device=device)
    model.tie_weights()
    model.init_random_weights(0).set_precision(dtype).eval()
    processor = Pi05Processor(cfg, PromptTokenizer(TINY_TOKENIZER, cfg.max_token_len), Normalizer.identity())
    info = {"config": config, "device": device, "dtype": dtype, "prefix_tokens": cfg.num_prefix_tokens,
            "weights": "random (seed 0)"}
    return Pi05Engine(model, processor, shadow=False), info


def serve(engine: Pi05Engine, variant, seq: Sequence) -> list[dict[str, Any]]:
    engine.open("bench", variant, seq.seed)
    records = []
    for obs in seq.observations:
        (chunk,) = engine.infer_batch([Request("bench", obs)])
        if isinstance(chunk, BaseException):
            raise chunk
        records.append(chunk.record.to_dict())
    engine.close("bench")
    return records


def calibration(engine: Pi05Engine, runs: int = 5, repeats: int = 5) -> tuple[LatencyProfile, dict[str, Any]]:
    """`runs` calibrations: the median profile (per stage) and how much they vary run to run."""
    profiles = [engine.calibrate(repeats) for _ in range(runs)]
    stages = ("vision_ms", "prefix_ms", "velocity_eval_ms")
    median = {k: float(np.median([getattr(p, k) for p in profiles])) for k in stages}
    profile = LatencyProfile(**{**profiles[0].to_dict(), **median, "source": f"median of {runs} calibrations"})
    steps = engine.config.num_steps
    frames = [p.frame_ms(steps) for p in profiles]
    spread = {k: (max(getattr(p, k) for p in profiles) - min(getattr(p, k) for p in profiles)) / median[k]
              for k in stages}
    return profile, {"runs": runs, "repeats": repeats, "profiles": [p.to_dict() for p in profiles],
                     "full_frame_ms": frames, "full_frame_spread": (max(frames) - min(frames)) / float(np.median(frames)),
                     "stage_spread": spread}


def measure(engine: Pi05Engine, variants, seq: Sequence, profile: LatencyProfile) -> list[dict[str, Any]]:
    rows = []
    for v in variants:
        engine.shadow = False
        timed = serve(engine, v, seq)
        engine.shadow = True
        shadowed = serve(engine, v, seq)
        decide = [r["latency_ms"]["decide"] for r in timed]
        total = [r["latency_ms"]["total"] for r in timed[1:]]
        cos = [r["signals"]["shadow_cos"] for r in shadowed]
        cost = [profile.cost_us(r["extra"]["compute"]) / 1000 for r in timed[1:]]
        error = [abs(c / w - 1) for c, w in zip(cost, total)]
        decisions = [r["decision"] for r in timed]
        rows.append({
            "policy": v.label, "name": v.name, "frames": len(timed),
            "decide_ms_mean": float(np.mean(decide)), "decide_ms_median": float(np.median(decide)),
            "decide_ms_p95": float(np.percentile(decide, 95)),
            "latency_ms_mean": float(np.mean(total)),
            "cost_ms_mean": float(np.mean(cost)), "cost_vs_wall": float(np.mean(cost) / np.mean(total)),
            "cost_error_median": float(np.median(error)), "cost_error_p90": float(np.percentile(error, 90)),
            "stage_ms_mean": {k: float(np.mean([r["latency_ms"][k] for r in timed[1:]]))
                              for k in ("vision", "prefix", "denoise")},
            "reuse_rate": sum(d in ("reuse", "partial") for d in decisions) / len(decisions),
            "compute_skipped": float(np.mean([r["signals"]["prefix_skipped"] for r in timed])),
            "shadow_cos_mean": float(np.mean(cos)), "shadow_cos_p5": float(np.percentile(cos, 5)),
            "shadow_cos_min": float(np.min(cos)),
            "reasons": {reason: sum(r["reason"] == reason for r in timed)
                        for reason in sorted({r["reason"] for r in timed})},
            "decisions_match_shadow_pass": decisions == [r["decision"] for r in shadowed],
        })
        print(f"  {v.label}: {rows[-1]['latency_ms_mean']:.1f} ms/frame, reuse {rows[-1]['reuse_rate']:.0%}",
              flush=True)
    base = next(r["latency_ms_mean"] for r in rows if r["name"] == "none")
    for r in rows:
        r["latency_vs_none"] = r["latency_ms_mean"] / base
    return rows


TABLE_HEADERS = ["policy", "decide ms", "p95", "lat ms", "vs none", "cost ms", "cost/wall", "|err| p50", "reuse",
                 "skipped", "cos mean", "cos p5", "cos min"]


def table(rows: list[dict[str, Any]]) -> str:
    return format_table(TABLE_HEADERS, [
        [r["policy"], f"{r['decide_ms_median']:.3f}", f"{r['decide_ms_p95']:.3f}", f"{r['latency_ms_mean']:.1f}",
         f"{r['latency_vs_none']:.2f}x", f"{r['cost_ms_mean']:.1f}", f"{r['cost_vs_wall']:.2f}",
         f"{r['cost_error_median']:.0%}", f"{r['reuse_rate']:.0%}", f"{r['compute_skipped']:.1%}",
         f"{r['shadow_cos_mean']:.4f}", f"{r['shadow_cos_p5']:.4f}", f"{r['shadow_cos_min']:.4f}"]
        for r in rows], align="<>>>>>>>>>>>>")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="record the frame sequence (real LIBERO) first")
    parser.add_argument("--queries", type=int, default=24, help="queries to record (5 env steps each)")
    parser.add_argument("--config", default=None, help="tiny (CPU default) or pi05_libero (GPU default)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cache_<device>.json)")
    args = parser.parse_args()
    if args.record or not DATA.exists():
        record(DATA, args.queries)
    torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    device = args.device or ("cuda" if gpu else "cpu")
    config = args.config or ("pi05_libero" if device == "cuda" else "tiny")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    seq = load_sequence(DATA)
    engine, info = build_engine(config, device, dtype)
    print(f"{config} on {device} ({dtype}), {len(seq.observations)} frames of {DATA.name}", flush=True)
    t0 = time.perf_counter()
    profile, variability = calibration(engine)
    print(f"calibration: full frame {variability['full_frame_ms']} ms, spread {variability['full_frame_spread']:.1%} "
          f"over {variability['runs']} calibrations", flush=True)
    rows = measure(engine, expand_variants(POLICIES), seq, profile)
    print(table(rows))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"cache_{device}.json"
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if gpu else None},
        "model": info, "sequence": {"file": DATA.name, "frames": len(seq.observations), "seed": seq.seed},
        "wall_s": round(time.perf_counter() - t0, 1), "calibration": {"profile": profile.to_dict(), **variability},
        "policies": rows,
    }, indent=1))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
