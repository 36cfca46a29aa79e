"""What real-time chunking adds to a frame's denoising loop (the source of the VJP factor in
configs/latency/thor_trt_fp8.yaml): the shipped small Pi0.5 on CPU, eager float32, batch 1, the loop
plain, guided with LeRobot's identity jacobian, and guided with the paper's VJP through the model
(policies/pi05/timing.py rtc_functions). Medians of --repeats runs, three rounds. Writes
benchmarks/results/rtc_cpu.json.

Run: .venv/bin/python -m benchmarks.bench_rtc [--repeats 15]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from policies.pi05.timing import rtc_functions, synthetic_inputs, time_stages
from policies.serving.model import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "policies" / "pi05" / "assets" / "pi05_small_spatial01"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rtc_cpu.json")
    args = parser.parse_args()
    loaded = load_checkpoint(CHECKPOINT)
    config = loaded.model.config
    inputs, noise = synthetic_inputs(config, 1, "cpu")
    rounds = []
    with torch.inference_mode():
        fns = rtc_functions(loaded.model, inputs, noise)
        for _ in range(3):
            timed = time_stages(fns, torch.device("cpu"), 2, args.repeats)
            plain = timed["denoise_eager"]["median_ms"]
            rounds.append({"plain_ms": plain, "identity_ms": timed["denoise_rtc_identity"]["median_ms"],
                           "vjp_ms": timed["denoise_rtc_model"]["median_ms"],
                           "identity_extra_per_eval_ms": (timed["denoise_rtc_identity"]["median_ms"] - plain) / config.num_steps,
                           "vjp_extra_per_eval_ms": (timed["denoise_rtc_model"]["median_ms"] - plain) / config.num_steps,
                           "vjp_over_forward": (timed["denoise_rtc_model"]["median_ms"] - plain) / plain})
    result = {"checkpoint": str(CHECKPOINT.relative_to(ROOT)), "num_steps": config.num_steps, "device": "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "rounds": rounds}
    args.out.write_text(json.dumps(result, indent=2))
    for r in rounds:
        print(f"loop {r['plain_ms']:.1f} ms; identity guidance +{r['identity_extra_per_eval_ms']:.3f} ms/eval; "
              f"VJP +{r['vjp_extra_per_eval_ms']:.2f} ms/eval = {r['vjp_over_forward']:.2f} x a plain evaluation")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
