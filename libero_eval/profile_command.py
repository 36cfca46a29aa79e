"""`libero-eval profile`: measure a latency profile (policies/serving/latency.py) on this machine's device
with a real checkpoint, and write it where a sweep's `latency:` finds it (configs/latency/<name>.yaml).

The profile holds per-stage medians at batch 1: the vision tower over all camera slots, one full prefix
pass, one velocity evaluation (the same machinery as benchmarks/bench_pi05.py: policies/pi05/timing.py).
A sweep with `latency: <name>` prices every frame with it, deterministically, on any machine.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from libero_eval.cli_common import fail, positive
from libero_eval.config import resolve_checkpoint
from libero_eval.execution import LATENCY_DIR
from policies.serving.latency import write_profile
from policies.serving.model import ModelConfig, make_engine
from policies.serving.variants import PolicyVariant

EXAMPLES = """examples:
  libero-eval profile --checkpoint /ckpt/pi05_libero --device cuda --out configs/latency/my_gpu.yaml
  libero-eval profile --checkpoint policies/pi05/assets/pi05_small_spatial01 --out /tmp/cpu.yaml
  libero-eval sweep configs/small_heldout.yaml latency=my_gpu
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "profile", help="measure a latency profile of a checkpoint on this device (configs/latency/*.yaml)",
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="Pi0.5 checkpoint directory (default: the tiny random model)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
    parser.add_argument("--backend", default="eager", help="eager, compile or tensorrt (as model.backend)")
    parser.add_argument("--engine-dir", default=None, help="tensorrt: the directory launch/build_engines.py wrote")
    parser.add_argument("--threads", default=None, type=positive,
                        help="torch CPU threads (default torch's; the CPU policy actor of a sweep uses 1)")
    parser.add_argument("--repeats", default=10, type=positive, help="timed runs per stage (median; default 10)")
    parser.add_argument("--out", default=None,
                        help=f"profile YAML to write (default {LATENCY_DIR.relative_to(LATENCY_DIR.parents[1])}/"
                             "<device>.yaml); its file name is the profile's name")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        if args.checkpoint is not None and resolve_checkpoint(args.checkpoint) is None:
            raise ValueError(f"--checkpoint: expected an existing checkpoint directory, got {args.checkpoint!r}")
        model = ModelConfig(kind="checkpoint" if args.checkpoint else "tiny",
                            checkpoint=str(resolve_checkpoint(args.checkpoint)) if args.checkpoint else None,
                            device=args.device, dtype=args.dtype, backend=args.backend, engine_dir=args.engine_dir)
        out = Path(args.out or LATENCY_DIR / f"{model.torch_device()}.yaml")
        if out.suffix not in (".yaml", ".yml"):
            raise ValueError(f"--out: expected a .yaml path, got {out}")
    except ValueError as exc:
        return fail("profile", exc)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    engine = make_engine(model, [PolicyVariant.make("none", "none")])  # one Pi0.5 variant: the model loads
    profile = engine.calibrate(args.repeats)
    profile = type(profile)(**{**profile.to_dict(), "name": out.stem,
                               "source": f"libero-eval profile: {args.checkpoint or 'tiny random model'}, "
                                         f"backend {args.backend}, median of {args.repeats} runs per stage at batch 1"})
    write_profile(profile, out, comment=f"measured by `libero-eval profile` in {time.perf_counter() - t0:.0f} s")
    print(f"vision {profile.vision_ms:.2f} ms ({profile.images_per_frame} images), prefix {profile.prefix_ms:.2f} ms, "
          f"velocity evaluation {profile.velocity_eval_ms:.2f} ms -> a full 10-step frame "
          f"{profile.frame_ms(10):.1f} ms\nwrote {out} (use it with `latency: {out.stem}` or latency={out})")
    return 0
