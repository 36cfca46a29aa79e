"""The learning room's subcommands: `libero-eval record-demos` and `libero-eval train` (parsers and entry
points; the work is in demos.py and training.py)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from libero_eval.cli_common import add_command, fail, parse_int_list, positive
from libero_eval.learning.dataset import is_kept
from libero_eval.learning.demos import DemoSettings, record_demos, summarize
from libero_eval.learning.training import TrainSettings, train
from policies.pi05.configuration import Pi05Config
from tasks import registry

# --------------------------------------------------------------------------------------------------------
# libero-eval record-demos

DEMOS_EXAMPLES = """examples:
  libero-eval record-demos --tasks libero_spatial:0,1 --trials 0-49 --held-out 40-49 --out data/demos
  libero-eval record-demos --tasks libero_spatial:0-3,libero_object:0 --every 2 --image-size 112
  libero-eval record-demos --noise 0.5 --trials 0-39 --held-out none --out data/demos_dart   # recoveries

Rerunning with the same --out resumes (finished episodes are skipped; adding tasks or trials extends the
dataset). Episodes the expert fails are listed in the manifest and not rendered.
"""


def _parse_tasks(text: str) -> dict[str, list[int]]:
    tasks: dict[str, list[int]] = {}
    for part in text.split(";") if ";" in text else _split_suites(text):
        if ":" not in part:
            raise argparse.ArgumentTypeError(f"bad task list {part!r}: expected suite:ids, e.g. libero_spatial:0,1")
        suite, ids = part.split(":", 1)
        parsed = parse_int_list(ids, "task")
        if parsed == "all":
            parsed = list(range(registry.num_tasks(suite.strip())))
        tasks[suite.strip()] = list(parsed)
    return tasks


def _split_suites(text: str) -> list[str]:
    """'libero_spatial:0,1,libero_object:5' -> ['libero_spatial:0,1', 'libero_object:5']."""
    parts: list[str] = []
    for item in text.split(","):
        if ":" in item or not parts:
            parts.append(item)
        else:
            parts[-1] += "," + item
    return parts


def add_record_demos_parser(sub) -> None:
    p = add_command(sub, "record-demos", "record scripted-expert demonstrations (actions, states, images)",
                    DEMOS_EXAMPLES)
    p.add_argument("--tasks", default="libero_spatial:0,1", type=_parse_tasks,
                   help="suite:task ids, several suites comma-separated (default libero_spatial:0,1)")
    p.add_argument("--trials", default="0-49", type=lambda s: parse_int_list(s, "trial"),
                   help="init-state indices to record per task (default 0-49)")
    p.add_argument("--held-out", default="40-49",
                   type=lambda s: [] if s.strip().lower() in ("", "none") else parse_int_list(s, "trial"),
                   help="init-state indices of the held-out split, never trained on (default 40-49; 'none')")
    p.add_argument("--image-size", default=112, type=positive,
                   help="stored image size: the vision input of the model to train (default 112)")
    p.add_argument("--every", default=1, type=positive, help="render an observation every N steps (default 1)")
    p.add_argument("--max-steps", default=None, type=positive, help="expert step cap (default: the protocol's)")
    p.add_argument("--noise", default=0.0, type=float,
                   help="DART-style perturbation of the executed actions, std in action units (0: clean demos; "
                        "0.5 gives recoveries the expert still completes ~90%% of the time)")
    p.add_argument("--noise-tau", default=5.0, type=float, help="correlation time of the perturbation, steps (default 5)")
    p.add_argument("--noise-seed", default=7, type=int,
                   help="seed of the perturbation (with each episode's seed); another value records other "
                        "recoveries from the same init states (default 7)")
    p.add_argument("--place-tolerance", default=0.01, type=float,
                   help="the expert's xy gate (metres) before it lowers the object onto the target (default 0.01; "
                        "a looser gate, e.g. 0.03, is easier for a learned policy to imitate)")
    p.add_argument("--funnel", default=0.0, type=float,
                   help="the expert's approaches as funnels: its height above the grasp point / the place height "
                        "shrinks by FUNNEL metres per metre of xy error instead of waiting at a gate (0: gated, "
                        "the validated expert; 2 gives labels without 'stay' points a policy can stall at)")
    p.add_argument("--seeding", default="openpi", choices=("openpi", "per_episode"),
                   help="scene layout of each (task, init state), as env.seeding in a sweep: openpi's evaluation "
                        "layout (default) or the paired per-episode seed's")
    p.add_argument("--workers", default=2, type=positive, help="parallel processes (default 2)")
    p.add_argument("--out", default="data/demos", help="dataset directory (default data/demos)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_record_demos(args: argparse.Namespace) -> int:
    trials = list(range(50)) if args.trials == "all" else args.trials
    held_out = list(range(50)) if args.held_out == "all" else args.held_out
    try:
        settings = DemoSettings(tasks=args.tasks, trials=trials, held_out=held_out, image_size=args.image_size,
                                every=args.every, max_steps=args.max_steps, noise=args.noise,
                                noise_tau=args.noise_tau, noise_seed=args.noise_seed,
                                place_tolerance=args.place_tolerance, funnel=args.funnel, seeding=args.seeding)
        t0 = time.perf_counter()
        rows = record_demos(settings, args.out, workers=args.workers, progress=not args.no_progress)
    except ValueError as exc:  # DemoError, a bad suite / task / trial
        return fail("record-demos", exc)
    print(summarize(rows))
    print(f"\n{sum(map(is_kept, rows))}/{len(rows)} episodes kept in {args.out} "
          f"({time.perf_counter() - t0:.0f} s this run)")
    return 0


# --------------------------------------------------------------------------------------------------------
# libero-eval train

TRAIN_EXAMPLES = """examples:
  libero-eval train --demos data/demos --out runs/train_small --steps 3000
  libero-eval train --demos data/demos --out runs/train_small --steps 5000   # resumes, trains on to 5000
  libero-eval train --demos data/demos,data/demos_dart --init runs/train_small/checkpoint --out runs/ft --steps 2000

Rerunning with the same --out resumes from train_state.pt (saved every --save-every steps and at the end;
Ctrl-C loses at most that many steps). The EMA weights are exported to <out>/checkpoint after every save.
"""


def add_train_parser(sub) -> None:
    p = add_command(sub, "train", "train a small Pi0.5 on recorded demos (flow matching, CPU)", TRAIN_EXAMPLES)
    d = TrainSettings(demos="", out="")
    p.add_argument("--demos", default="data/demos",
                   help="dataset(s) made by `libero-eval record-demos`, comma-separated (default data/demos)")
    p.add_argument("--init", default=None,
                   help="fine-tune: start from this checkpoint directory's weights (norm stats come from --demos)")
    p.add_argument("--out", default="runs/train_small", help="training directory (default runs/train_small)")
    p.add_argument("--preset", default=d.preset, help=f"Pi05Config preset to train (default {d.preset})")
    p.add_argument("--steps", default=d.steps, type=positive, help=f"total optimiser steps (default {d.steps})")
    p.add_argument("--batch-size", default=d.batch_size, type=positive, help=f"observations per step (default {d.batch_size})")
    p.add_argument("--noise-per-obs", default=d.noise_per_obs, type=positive,
                   help=f"flow-matching draws per observation, sharing its prefix pass (default {d.noise_per_obs})")
    p.add_argument("--lr", default=d.lr, type=float, help=f"peak learning rate, cosine to 10%% (default {d.lr})")
    p.add_argument("--ema", default=d.ema, type=float, help=f"EMA decay of the exported weights (default {d.ema})")
    p.add_argument("--eval-every", default=d.eval_every, type=positive, help="held-out evaluation period (steps)")
    p.add_argument("--save-every", default=d.save_every, type=positive, help="checkpoint period (steps)")
    p.add_argument("--seed", default=d.seed, type=int, help="initialisation and sampling seed")
    p.add_argument("--threads", default=0, type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    try:
        settings = TrainSettings(demos=args.demos, out=args.out, init=args.init, preset=args.preset, steps=args.steps,
                                 batch_size=args.batch_size, noise_per_obs=args.noise_per_obs, lr=args.lr,
                                 ema=args.ema, eval_every=args.eval_every, save_every=args.save_every,
                                 seed=args.seed, threads=args.threads)
        Pi05Config.from_name(settings.preset)
        result = train(settings, progress=not args.no_progress)
    except ValueError as exc:  # TrainError, DatasetError, an unknown preset
        return fail("train", exc)
    print(json.dumps(result, indent=2))
    print(f"learning curve: {Path(args.out) / 'curve.png'}")
    return 0
