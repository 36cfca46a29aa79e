"""`libero-eval replay`: offline fidelity of cache policies on recorded observation sequences.

1. Record once: episodes run with `record_observations` save every query's observation (both camera
   images as uint8, the state, the prompt, the env step) to <run_dir>/observations/<episode>.npz.
2. Replay: every sequence goes through every requested policy variant in shadow mode, so each frame's
   executed actions are compared with the full computation on the same observation and noise. Per policy:
   action cosine vs full compute (mean / p5 / min), L2, reuse rate, prefix compute skipped, and the
   distribution (p50 / p75 / p90 / p95, the percentiles seed 003 picked thresholds from) of every signal
   the policy decides on. For a policy with thresholds the distribution is measured as if every frame
   were computed (a twin of the variant with its thresholds where every frame is full): it depends on the
   recorded frames only, never on the thresholds being evaluated (`signals_gated`: as the variant gated).
Writes <out>/replay_summary.json (default <run_dir>/replay/), <out>/replay_records.jsonl (one line per
frame) and prints a table. Offline fidelity is what the users' closed-loop question starts from: the
report puts it beside closed-loop success.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from libero_eval import calibrate, tables
from libero_eval.config import ConfigError, expand_variants, parse_policy_entry
from libero_eval.observations import OBSERVATIONS_DIR, Sequence, load_sequence
from libero_eval.sweep_summary import REUSE_DECISIONS
from policies.base import PolicyError
from policies.serving.engine import Request
from policies.serving.model import ModelConfig, load_model
from policies.serving.pi05 import Pi05Engine
from policies.serving.variants import MODEL_FREE, PolicyVariant

SUMMARY_FILE = "replay_summary.json"
RECORDS_FILE = "replay_records.jsonl"
PERCENTILES = (50, 75, 90, 95)
NOT_DECISION_SIGNALS = ("prefix_skipped", "shadow_cos", "shadow_l2", "shadow_cos_executed", "shadow_l2_executed")
# One variant of every cache policy (fixed_window at FlashRT's two measured windows), when none are given.
DEFAULT_POLICIES = [
    {"name": "none"},
    {"name": "fixed_window", "window": [2, 3]},
    {"name": "adaptive", "window": 3, "pixel_mae": 6.5},
    {"name": "attention_drift"},
    {"name": "vla_cache"},
]

EXAMPLES = """examples:
  libero-eval replay runs/smoke                                 # runs/smoke/observations -> runs/smoke/replay
  libero-eval replay runs/smoke --policy fixed_window:window=3 --policy adaptive:window=3,pixel_mae=6.0
  libero-eval replay runs/x/observations --policies configs/smoke.yaml --checkpoint /ckpt/pi05_libero --out r

Record sequences with `episode.record_observations` (EpisodeConfig.record_observations) in a baseline run.
"""


# ---- the recorded sequences (format: libero_eval.observations)


def locate(source: str | Path) -> tuple[list[Path], Path]:
    """(sequence files, default output directory) of a run directory or an observations directory."""
    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"{source} is not a directory (expected a run directory or its observations/)")
    directory = source / OBSERVATIONS_DIR if (source / OBSERVATIONS_DIR).is_dir() else source
    files = sorted(directory.glob("*.npz"))
    if not files:
        raise ValueError(f"no recorded sequences (*.npz) in {directory}; record them with "
                         "episode.record_observations in a baseline run")
    run_dir = directory.parent if directory.name == OBSERVATIONS_DIR else directory
    return files, run_dir / "replay"


# ---- replay and summary


def replay(engine, sequences: list[Sequence], variants: list, max_batch: int = 8,
           progress=None) -> dict[str, list[dict[str, Any]]]:
    """Serve every sequence under every variant (engine in shadow mode); returns records per variant label.

    Frame t of every (variant, sequence) session is served before frame t + 1, in batches of `max_batch`.
    """
    sessions = [(v, seq, f"{v.label}/{seq.name}") for v in variants for seq in sequences]
    for v, seq, sid in sessions:
        engine.open(sid, v, seq.seed)
    records: dict[str, list[dict[str, Any]]] = {v.label: [] for v in variants}
    try:
        for t in range(max(len(seq.observations) for seq in sequences)):
            due = [(v, seq, sid) for v, seq, sid in sessions if t < len(seq.observations)]
            for start in range(0, len(due), max_batch):
                part = due[start : start + max_batch]
                results = engine.infer_batch([Request(sid, seq.observations[t]) for _, seq, sid in part])
                for (v, seq, _), result in zip(part, results, strict=True):
                    if isinstance(result, BaseException):
                        raise RuntimeError(f"replay of {seq.name} under {v.label} failed at frame {t}") from result
                    record = result.record.to_dict()
                    record.update(sequence=seq.name, env_step=seq.env_steps[t])
                    records[v.label].append(record)
                if progress is not None:
                    progress(len(part))
    finally:
        for _, _, sid in sessions:
            engine.close(sid)
    return records


def every_frame_full(variant: PolicyVariant) -> PolicyVariant | None:
    """The variant with its gating thresholds where every frame is computed (its policy's FULL_EVERY_FRAME),
    so each signal is measured against the previous frame with that frame's own attention, as seed 003's
    offline analysis measured them: the same recorded frames give the same distribution whatever the
    thresholds. None for a policy without thresholds."""
    forced = getattr(variant.policy_class, "FULL_EVERY_FRAME", None)
    if not forced:
        return None
    return PolicyVariant.make(f"{variant.label}__every_frame_full", variant.name, {**variant.param_dict, **forced})


def with_twins(variants: list[PolicyVariant]) -> tuple[list[PolicyVariant], dict[str, str]]:
    """The variants plus one every-frame-full twin per distinct set of non-threshold parameters; returns
    (all to replay, {variant label: its twin's label})."""
    twins: dict[tuple, PolicyVariant] = {}
    twin_of: dict[str, str] = {}
    for v in variants:
        twin = every_frame_full(v)
        if twin is not None:
            twin_of[v.label] = twins.setdefault((twin.name, twin.params), twin).label
    return variants + list(twins.values()), twin_of


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES}


def signal_percentiles(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    names = sorted({k for r in records for k in r["signals"] if k not in NOT_DECISION_SIGNALS})
    return {name: percentiles([r["signals"][name] for r in records if name in r["signals"]]) for name in names}


def summarize_policy(variant, records: list[dict[str, Any]],
                     every_frame_full: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Fidelity of the variant's own decisions; `signals` from its every-frame-full twin's records when it
    has thresholds (policy-independent, what thresholds are chosen from), else from its own."""
    cos = [r["signals"]["shadow_cos"] for r in records]
    gated = signal_percentiles(records)
    return {
        "policy": variant.label,
        "name": variant.name,
        "frames": len(records),
        "cos_mean": float(np.mean(cos)),
        "cos_p5": float(np.percentile(cos, 5)),
        "cos_min": float(np.min(cos)),
        "l2_mean": float(np.mean([r["signals"]["shadow_l2"] for r in records])),
        "reuse_rate": sum(r["decision"] in REUSE_DECISIONS for r in records) / len(records),
        "compute_skipped": float(np.mean([r["signals"]["prefix_skipped"] for r in records])),
        "signals": gated if every_frame_full is None else signal_percentiles(every_frame_full),
        "signals_basis": "own decisions" if every_frame_full is None else "every frame full",
        "signals_gated": gated,
    }


REPLAY_HEADERS = ["policy", "frames", "reuse", "skipped", "cos mean", "cos p5", "cos min", "L2 mean",
                  "signals p50/p75/p90/p95"]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The replay summary rows (summarize_policy) as the text table `libero-eval replay` prints."""
    cells = []
    for r in rows:
        signals = "; ".join(f"{k} " + "/".join(f"{v:.3g}" for v in p.values()) for k, p in r["signals"].items())
        cells.append([r["policy"], r["frames"], f"{r['reuse_rate']:.0%}", f"{r['compute_skipped']:.1%}",
                      f"{r['cos_mean']:.4f}", f"{r['cos_p5']:.4f}", f"{r['cos_min']:.4f}", f"{r['l2_mean']:.4f}",
                      signals])
    return tables.format_table(REPLAY_HEADERS, cells, align="<>>>>>>><")


# ---- command line


def policy_entries(files: list[str], inline: list[str]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for file in files:
        data = yaml.safe_load(Path(file).read_text())
        data = data.get("policies") if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise ValueError(f"{file}: expected a list of policies or a config with a 'policies' list")
        entries.extend(data)
    entries.extend(parse_policy_entry(text) for text in inline)
    return entries


def run_config(run_dir: Path) -> dict[str, Any]:
    """The sweep config stored in a run directory (config.yaml), or {} when there is none."""
    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "replay", help="replay recorded observation sequences through cache policies (offline fidelity)",
        description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run directory (with observations/) or a directory of recorded *.npz")
    parser.add_argument("--policies", action="append", default=[], metavar="YAML",
                        help="a YAML list of policies, or a sweep config (its 'policies'); repeatable")
    parser.add_argument("--policy", action="append", default=[], metavar="NAME:K=V,...",
                        help="one policy inline, e.g. adaptive:window=3,pixel_mae=6.5; repeatable (default "
                             "without --policies/--policy: the run's config.yaml policies, else one variant of "
                             "every cache policy)")
    parser.add_argument("--checkpoint", default=None,
                        help="Pi0.5 checkpoint directory (default: the run's config.yaml model, else tiny random)")
    parser.add_argument("--model-seed", type=int, default=0, help="weights seed of the tiny random model (default 0)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests per engine call (default 8)")
    parser.add_argument("--max-frames", type=int, default=None, help="replay only the first N frames per sequence")
    parser.add_argument("--out", default=None, help="output directory (default <run_dir>/replay)")
    parser.add_argument("--calibrate", default=None, metavar="PARAM=V1,V2,...",
                        help="replay the one --policy at each value of one threshold (e.g. pixel_mae=4,5,6,6.5,7): "
                             "reuse and fidelity per value -> calibration.json / .png")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target-reuse", type=float, default=None, metavar="R",
                        help="with --calibrate: propose the value whose reuse rate comes closest to R (0..1)")
    target.add_argument("--target-skipped", type=float, default=None, metavar="S",
                        help="with --calibrate: the same on the prefix compute skipped (vla_cache: its frames are "
                             "nearly all partial, what moves is how much they skip)")
    return parser


def replay_model(args: argparse.Namespace, stored: dict[str, Any]) -> ModelConfig:
    """--checkpoint, else the run's own model section (config.yaml), else the tiny random model."""
    if args.checkpoint:
        return ModelConfig(kind="checkpoint", checkpoint=args.checkpoint, device=args.device, dtype=args.dtype)
    if stored.get("model"):
        section = {**stored["model"], "device": args.device}
        if args.dtype:
            section["dtype"] = args.dtype
        return ModelConfig(**section)
    return ModelConfig(kind="tiny", seed=args.model_seed, device=args.device)


def run(args: argparse.Namespace) -> int:
    try:
        files, default_out = locate(args.source)
        stored = run_config(default_out.parent)
        entries = policy_entries(args.policies, args.policy)
        if not entries:  # the sweep's own variants, so the report pairs labels with closed-loop results
            entries = [e for e in stored.get("policies", []) if e.get("name") not in MODEL_FREE
                       and "rtc" not in str(e.get("execution", ""))] or DEFAULT_POLICIES  # (no clock offline)
        calibration = None
        if args.calibrate is not None or args.target_reuse is not None or args.target_skipped is not None:
            calibration = _calibration_entries(args, entries)
            entries = calibration[2]
        variants = expand_variants(entries)
        for v in variants:
            if v.model_free:
                raise ValueError(f"policy {v.label!r} has no model to replay; use the Pi0.5 cache policies")
            if v.execution.execution == "rtc":
                raise ValueError(f"policy {v.label!r} executes rtc: replay serves recorded frames with no realtime "
                                 "clock and no chunk in flight to guide towards; replay it without execution: rtc")
        if args.max_batch < 1 or (args.max_frames is not None and args.max_frames < 1):
            raise ValueError(f"--max-batch and --max-frames must be >= 1, got {args.max_batch}, {args.max_frames}")
        model = replay_model(args, stored)
        sequences = [load_sequence(f) for f in files]
    except (ValueError, TypeError, ConfigError, OSError) as exc:
        print(f"libero-eval replay: error: {exc}", file=sys.stderr)
        return 2
    if args.max_frames is not None:
        for seq in sequences:
            seq.observations, seq.env_steps = seq.observations[: args.max_frames], seq.env_steps[: args.max_frames]

    loaded = load_model(model)  # eager stages: fidelity is the cache policies', whatever the run's backend
    engine = Pi05Engine(loaded.model, loaded.processor, shadow=True, label=loaded.label)
    try:
        for v in variants:  # checked against the model before any frame is served
            engine.bind(v)
    except PolicyError as exc:
        print(f"libero-eval replay: error: {exc}", file=sys.stderr)
        return 2
    served, twin_of = with_twins(variants)  # the twins' signals are every frame's, whatever the thresholds
    for twin in served[len(variants):]:
        engine.bind(twin)
    total = len(served) * sum(len(s.observations) for s in sequences)
    with tqdm(total=total, desc="replay", unit="frame", dynamic_ncols=True) as bar:
        records = replay(engine, sequences, served, args.max_batch, progress=bar.update)

    summary = {
        "model": {**dataclasses.asdict(model), "label": loaded.label, "config": loaded.model.config.name,
                  "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
                  "device": str(engine.device)},
        "sequences": len(sequences),
        "policies": [summarize_policy(v, records[v.label], records.get(twin_of.get(v.label, ""))) for v in variants],
    }
    out = Path(args.out) if args.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    with open(out / RECORDS_FILE, "w") as f:
        for v in variants:
            for record in records[v.label]:
                f.write(json.dumps({"policy": v.label, **record}) + "\n")
    print(format_table(summary["policies"]))
    print(f"\n{len(sequences)} sequences x {len(served)} policies = {total} frames -> {out / SUMMARY_FILE}")
    if calibration is not None:
        param, values, _ = calibration
        table = calibrate.rows(param, values, summary["policies"])
        metric, target = (("compute_skipped", args.target_skipped) if args.target_skipped is not None
                          else ("reuse_rate", args.target_reuse))
        proposal = calibrate.write(out, table, target, metric)
        print(f"\ncalibration of {param} ({out / calibrate.CALIBRATION_FILE}, {calibrate.CALIBRATION_PLOT}):")
        print(calibrate.format_rows(table))
        if proposal is not None:
            what = "reuse" if metric == "reuse_rate" else "compute skipped"
            crossing = ("" if proposal["interpolated"] is None
                        else f"; {what} crosses {target:g} at {param} ~ {proposal['interpolated']:.4g}")
            print(f"proposed for {what} {target:g}: {param}={proposal['value']:g} ({what} {proposal[metric]:.0%}, "
                  f"cosine mean {proposal['cos_mean']:.4f}, p5 {proposal['cos_p5']:.4f})" + crossing)
    return 0


def _calibration_entries(args: argparse.Namespace, entries: list[dict[str, Any]]):
    """(param, values, the one policy entry swept over the values) for --calibrate; ValueError otherwise."""
    if args.calibrate is None:
        raise ValueError("--target-reuse / --target-skipped need --calibrate PARAM=V1,V2,...")
    if args.target_skipped is not None and not 0.0 <= args.target_skipped <= 1.0:
        raise ValueError(f"--target-skipped: expected a share in [0, 1], got {args.target_skipped}")
    if len(entries) != 1:
        raise ValueError(f"--calibrate sweeps one policy: give exactly one --policy, got {len(entries)}")
    if args.target_reuse is not None and not 0.0 <= args.target_reuse <= 1.0:
        raise ValueError(f"--target-reuse: expected a reuse rate in [0, 1], got {args.target_reuse}")
    param, values = calibrate.parse_calibrate(args.calibrate)
    values = [int(v) if float(v).is_integer() else v for v in values]
    return param, values, [{**entries[0], param: values}]
