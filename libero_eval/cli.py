"""libero-eval: closed-loop evaluation of Pi0.5 (and its cached inference paths) on LIBERO.

Subcommands:
  run     run episodes sequentially in this process (suite x tasks x trials), store results and videos
  sweep   run a YAML-configured sweep (suites/tasks x trials x policy variants) in parallel on Ray
  report  write report.html + summary.md for a run directory (and log it to W&B again with --wandb)
  replay  replay recorded observation sequences through every cache policy: offline fidelity per policy
  serve   serve one variant over openpi's websocket policy protocol (openpi clients, model.kind openpi_server)
  profile measure a latency profile of a checkpoint on this device (configs/latency/; latency: <name>)
  layout-table  measure the table of openpi scene layouts (env.seeding: openpi; tasks/layout.py)
  record-demos  record scripted-expert demonstrations (libero_eval/learning/demos.py)
  train   train a small Pi0.5 on recorded demos (libero_eval/learning/training.py)
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from libero_eval import layout_command, profile_command, replay, serve
from libero_eval.cli_common import add_command, fail, parse_int_list, positive
from libero_eval.config import ConfigError, load_config
from libero_eval.dispatch import format_utilisation
from libero_eval.episode import VIDEO_MODES, EpisodeConfig, run_episode
from libero_eval.learning import commands as learning
from libero_eval.specs import EpisodeResult, EpisodeSpec
from libero_eval.store import ResultStore
from libero_eval.summary import summary_table
from libero_eval.sweep_summary import format_table, pick_baseline, pick_baselines, policy_rows
from policies.serving.engine import make_model_free
from policies.serving.variants import MODEL_FREE, PolicyVariant
from tasks import layout, registry
from tasks.env import SEEDINGS, EnvConfig, LiberoEnv

RUN_EXAMPLES = """examples:
  libero-eval run --suite libero_spatial --tasks 0,1 --trials 2 --max-steps 40 --out runs/x
  libero-eval run --suite libero_object --tasks all --trials 50 --video none --out runs/object_full

Outputs in --out: results.jsonl (one line per finished episode), videos/*.mp4, run.json (the arguments).
Rerunning with the same --out resumes: episodes already stored are skipped, videos are never overwritten.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="libero-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = add_command(sub, "run", "run episodes sequentially in one process", RUN_EXAMPLES)
    run.add_argument("--suite", default="libero_spatial", choices=registry.SUITES, help="LIBERO suite (default libero_spatial)")
    run.add_argument("--tasks", default="0", type=lambda s: parse_int_list(s, "task"),
                     help="task ids: '0,1', '0-4' or 'all' (default 0)")
    run.add_argument("--trials", default=1, type=positive,
                     help="trials per task; trial k uses the task's init state k (default 1, at most 50)")
    run.add_argument("--first-trial", default=0, type=int, help="index of the first trial (default 0)")
    run.add_argument("--max-steps", default=None, type=positive,
                     help="policy actions per episode before it counts as a failure (default: the protocol's "
                          + ", ".join(f"{k} {v}" for k, v in registry.MAX_STEPS.items()) + ")")
    run.add_argument("--policy", default="hold", choices=tuple(MODEL_FREE),
                     help="policy to evaluate (default hold: zero actions, gripper open; expert: the scripted "
                          "pick-and-place oracle on privileged state); Pi0.5 variants run with `sweep`")
    run.add_argument("--label", default=None, help="name of this policy variant in results and videos (default: --policy)")
    run.add_argument("--replan-steps", default=5, type=positive, help="actions executed per policy query (default 5)")
    run.add_argument("--video", default="query", choices=VIDEO_MODES,
                     help="query: a frame per policy query (no extra rendering, the CPU default); every_step: "
                          "a frame per env step (renders every step); none: no video")
    run.add_argument("--no-wrist-video", action="store_true", help="agentview only in videos")
    run.add_argument("--resolution", default=256, type=positive, help="camera resolution (default 256, as openpi)")
    run.add_argument("--no-lazy-render", action="store_true",
                     help="render cameras on every step (slower; observations are identical either way)")
    run.add_argument("--seeding", default="openpi", choices=SEEDINGS,
                     help="scene layout per (task, trial): openpi = the layout openpi's LIBERO evaluation gives that "
                          "init state (default); per_episode = env.seed(paired episode seed) before each reset")
    run.add_argument("--out", default=None, help="run directory (default runs/<suite>_<policy>)")

    sweep = add_command(sub, "sweep", "run a sweep on Ray (local by default)", SWEEP_EXAMPLES)
    sweep.add_argument("config", help="YAML sweep config, e.g. configs/smoke.yaml")
    sweep.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, values parsed as YAML: trials=3 ray.num_workers=1 max_steps=null")
    sweep.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    sweep.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local Ray on 127.0.0.1)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print the plan (episodes, policy replicas, rollout workers, resources) and an estimate "
                            "of the wall time from measured rates; run nothing")

    report = add_command(sub, "report", "write report.html and summary.md for a run directory, or compare two",
                         REPORT_EXAMPLES)
    report.add_argument("run_dir", nargs="+", metavar="RUN_DIR",
                        help="a run directory made by `libero-eval sweep` or `libero-eval run`; two: compare them "
                             "(A then B: what changed from A to B)")
    report.add_argument("--timelines", default="2", metavar="N|all|KEYS",
                        help="which episodes get a timeline and a video player in report.html: N per policy "
                             "(default 2: paired losses first), all, or episode keys LABEL/SUITE/taskNN/trialNN,...")
    report.add_argument("--out", default=None,
                        help="with two run directories: where compare.html/.md/.json go (default: "
                             "compare_<A>_vs_<B> beside B)")
    report.add_argument("--wandb", action="store_true",
                        help="also log to W&B: one fresh run per policy variant, or with two run directories one "
                             "comparison run")
    report.add_argument("--wandb-mode", default=None, choices=("offline", "online"),
                        help="W&B mode for --wandb (default: the sweep config's wandb.mode, offline if disabled)")

    replay.add_parser(sub)
    serve.add_parser(sub)
    layout_command.add_parser(sub)
    profile_command.add_parser(sub)
    learning.add_record_demos_parser(sub)
    learning.add_train_parser(sub)
    return parser


REPORT_EXAMPLES = """examples:
  libero-eval report runs/smoke                       # runs/smoke/report.html, runs/smoke/summary.md
  libero-eval report runs/smoke --wandb --wandb-mode online
  libero-eval report runs/smoke --timelines all       # a timeline and a video player for every episode
  libero-eval report runs/yesterday runs/today        # what changed: runs/compare_yesterday_vs_today/

Works on a finished, partial or resumed sweep: everything comes from results.jsonl (plus config.yaml, the
videos and replay/replay_summary.json when present). W&B runs land in <run_dir>/wandb; sync offline ones
with `wandb sync <run_dir>/wandb/offline-run-*`.
"""


SWEEP_EXAMPLES = """examples:
  libero-eval sweep configs/smoke.yaml
  libero-eval sweep configs/libero_spatial.yaml model.checkpoint=/ckpt/pi05_libero trials=10
  libero-eval sweep configs/smoke.yaml ray.num_workers=1 --out runs/smoke_1w
  # realtime under the Thor latency profile, naive and with real-time chunking (README "Speed"):
  libero-eval sweep configs/smoke.yaml latency=thor_trt_fp8 "policies=[{name: none, timing: [sync, realtime]},
      {name: none, label: rtc, timing: realtime, execution: rtc}]"
  # on a Ray cluster (code shipped to the nodes, one policy replica per GPU): the plan first, then the run
  libero-eval sweep configs/libero_spatial.yaml model.checkpoint=/ckpt/pi05_libero --address HEAD:6379 --dry-run
  libero-eval sweep configs/libero_spatial.yaml model.checkpoint=/ckpt/pi05_libero --address HEAD:6379

Interrupt (Ctrl-C) and rerun the same command to resume: stored episodes are skipped; a run directory made
with a different config is refused with the differences listed.
"""


def cmd_run(args: argparse.Namespace) -> int:
    # Validate everything before any env is created.
    try:
        registry.check_suite(args.suite)
        task_ids = list(range(registry.num_tasks(args.suite))) if args.tasks == "all" else args.tasks
        trials = list(range(args.first_trial, args.first_trial + args.trials))
        for t in task_ids:
            registry.check_task(args.suite, t)
            for k in (trials[0], trials[-1]):
                registry.check_trial(args.suite, t, k)
        settings = EpisodeConfig(replan_steps=args.replan_steps, video=args.video, video_wrist=not args.no_wrist_video)
        env_config = EnvConfig(resolution=args.resolution, lazy_render=not args.no_lazy_render, seeding=args.seeding)
        if args.seeding == "openpi":
            gaps = layout.missing([(args.suite, t, k) for t in task_ids for k in trials])
            if gaps:
                raise ValueError(f"--seeding openpi: the layout table lacks {gaps[:3]}; build it with "
                                 f"`libero-eval layout-table --suites {args.suite}` or use --seeding per_episode")
    except ValueError as exc:
        return fail("run", exc)
    label = args.label or args.policy
    max_steps = args.max_steps or registry.MAX_STEPS[args.suite]
    out = Path(args.out or f"runs/{args.suite}_{label}")
    store = ResultStore(out)
    previous = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else None
    if previous is not None and store.path.is_file() and previous.get("seeding", "per_episode") != args.seeding:
        return fail("run", f"{out} holds episodes run with --seeding {previous.get('seeding', 'per_episode')}; "
                           f"use another --out or the same --seeding")
    (out / "run.json").write_text(json.dumps(vars(args), indent=2, default=str))
    policy = make_model_free(PolicyVariant.make(label, args.policy))

    specs = [EpisodeSpec(args.suite, t, k, label, max_steps) for t in task_ids for k in trials]
    store.prune_videos()  # of episodes killed in an earlier run
    done_keys = store.finished_keys()
    todo = [s for s in specs if s.key not in done_keys]
    if len(todo) < len(specs):
        print(f"resuming {out}: {len(specs) - len(todo)} of {len(specs)} episodes already stored")

    successes = 0
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="episodes", unit="ep", dynamic_ncols=True)
    for task_id in task_ids:
        task_specs = [s for s in todo if s.task_id == task_id]
        if not task_specs:
            continue
        task = registry.get_task(args.suite, task_id)
        bar.set_postfix_str(f"creating env for {args.suite} task {task_id}")
        try:
            env = LiberoEnv(task, env_config)
        except Exception as exc:
            for spec in task_specs:
                store.append(_env_error_result(spec, task.name, exc))
                bar.update(1)
            continue
        try:
            for spec in task_specs:
                bar.set_postfix_str(f"task {task_id} trial {spec.trial} | success {successes}")
                result = run_episode(spec, env, policy, settings, run_dir=out)
                store.append(result)
                successes += result.success
                bar.update(1)
        finally:
            env.close()
    bar.close()

    store.prune_videos()
    results = [r for r in store.load() if r.key in {s.key for s in specs}]
    print()
    print(summary_table(results))
    print(f"\nresults: {store.path}\nvideos:  {store.videos_dir}")
    return 1 if any(r.status == "error" for r in results) else 0


def _env_error_result(spec: EpisodeSpec, task_name: str, exc: BaseException) -> EpisodeResult:
    return EpisodeResult(
        key=spec.key, suite=spec.suite, task_id=spec.task_id, task_name=task_name, trial=spec.trial,
        policy_label=spec.policy_label, seed=spec.seed, status="error", success=False, reason="env_error",
        steps=0, wall_s=0.0, error=f"{type(exc).__name__}: {exc}",
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    try:
        config = load_config(args.config, overrides)
    except (ConfigError, ValueError) as exc:
        return fail("sweep", exc)
    # Ray (sweep) and matplotlib (tracking imports the report and its plots) load only for the commands that
    # use them, so `libero-eval --help` and `libero-eval run` do not pay for them
    from libero_eval.sweep import run_sweep
    from libero_eval.tracking import make_tracker  # see above

    out = Path(args.out or f"runs/{config.name}")
    if args.dry_run:
        return _dry_run(config, out)
    try:
        tracker = make_tracker(config, out)
    except ConfigError as exc:
        return fail("sweep", exc)
    try:
        outcome = run_sweep(config, out, progress=not args.no_progress, on_result=tracker.on_result)
    except ConfigError as exc:
        tracker.close()
        return fail("sweep", exc)
    except BaseException:
        tracker.close()
        raise
    variants = config.variants()
    baseline = pick_baseline([v.label for v in variants], {v.label: v.name for v in variants},
                             {v.label: v.param_dict for v in variants})
    baselines = pick_baselines({v.label: v.describe() for v in variants})
    rows = policy_rows(outcome.results, baselines)
    (out / "summary.json").write_text(json.dumps({"rows": rows, "actor": outcome.actor_stats,
                                                  "utilisation": outcome.utilisation}, indent=2, default=str))
    tracker.finish(outcome.results, rows, baseline)
    print()
    print(format_table(rows, baselines))
    if config.model.kind == "tiny" and any(v.name not in MODEL_FREE for v in variants):
        print("\nNOTE: the model has random weights (model.kind=tiny): success rates mean nothing here and need "
              "a real checkpoint (model.kind=checkpoint). What differs between policies is above: decisions, "
              "reuse rate, latency, shadow deviation.")
    if outcome.utilisation:
        print("\n" + format_utilisation(outcome.utilisation))
    print(f"{outcome.ran} episodes run, {outcome.retries} retried attempts, {outcome.wall_s:.0f} s; results in {out}")
    _write_report(out, "libero-eval sweep")
    if tracker.failure:
        print(f"W&B logging failed ({tracker.failure}); every result is in {out}. Log it again with "
              f"`libero-eval report {out} --wandb`.", file=sys.stderr)
    elif config.wandb.enabled and config.wandb.mode == "offline":
        print(f"W&B (offline): {out / 'wandb'}; upload with `wandb sync {out / 'wandb'}/offline-run-*`")
    return 1 if any(r.status == "error" for r in outcome.results) else 0


def _dry_run(config, out: Path) -> int:
    import ray  # the cluster's resources, when joining one (the sweep module loaded it already)

    from libero_eval import dry_run  # torch and the store: only the dry run needs them here
    from libero_eval.sweep import plan_episodes  # see cmd_sweep

    try:
        if config.ray.address:
            ray.init(address=config.ray.address, log_to_driver=False)
            try:
                resources = ray.cluster_resources()
            finally:
                ray.shutdown()
        else:
            resources = dry_run.local_resources(config)
        print(dry_run.describe(config, out, resources, plan_episodes(config), dry_run.load_rates()))
    except ConfigError as exc:
        return fail("sweep", exc)
    return 0


def _write_report(run_dir: Path, prog: str, timelines: int | str | list[str] = 2) -> bool:
    """report.html + summary.md; a failure here is reported, never fatal to a sweep that already stored its
    results."""
    from libero_eval.report import write_report  # matplotlib: only the commands that write a report load it

    try:
        html_path, md_path = write_report(run_dir, timelines)
    except Exception as exc:
        print(f"{prog}: could not write the report ({type(exc).__name__}: {exc}); "
              f"retry with `libero-eval report {run_dir}`", file=sys.stderr)
        return False
    print(f"report: {html_path} and {md_path}")
    return True


def cmd_report(args: argparse.Namespace) -> int:
    from libero_eval.report import ReportError, load_run, parse_timelines, pick_timelines  # matplotlib: report only
    from libero_eval.tracking import log_run_dir  # imports the report too, see cmd_sweep

    if len(args.run_dir) > 2:
        return fail("report", f"one run directory, or two to compare, got {len(args.run_dir)}: {args.run_dir}")
    if len(args.run_dir) == 2:
        if args.timelines != "2":
            return fail("report", "--timelines is for one run's report.html; a comparison shows the changed episodes")
        return _compare(args)
    if args.out is not None:
        return fail("report", "--out is for a comparison (two run directories); a run's report goes into it")
    run_dir = Path(args.run_dir[0])
    try:
        timelines = parse_timelines(args.timelines)
        pick_timelines(load_run(run_dir), timelines)  # an unknown episode key fails here, before any writing
    except ReportError as exc:
        return fail("report", exc)
    if not _write_report(run_dir, "libero-eval report", timelines):
        return 1
    if args.wandb:
        try:
            labels = log_run_dir(run_dir, args.wandb_mode)
        except Exception as exc:
            print(f"libero-eval report: W&B logging failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(f"W&B: {len(labels)} run(s) logged ({', '.join(labels)}) under {run_dir / 'wandb'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from libero_eval.compare import compare_runs, format_comparison, log_comparison, write_comparison  # matplotlib
    from libero_eval.report import ReportError  # matplotlib: loaded by the report commands only

    run_a, run_b = (Path(p) for p in args.run_dir)
    try:
        cmp = compare_runs(run_a, run_b)
    except ReportError as exc:
        return fail("report", exc)
    out = (Path(args.out) if args.out
           else run_b.resolve().parent / f"compare_{run_a.resolve().name}_vs_{run_b.resolve().name}")
    print(format_comparison(cmp))
    try:
        html_path, md_path = write_comparison(cmp, out)
    except OSError as exc:
        return fail("report", f"cannot write the comparison into {out}: {exc}")
    print(f"comparison: {html_path} and {md_path}")
    if args.wandb:
        try:
            name = log_comparison(cmp, out, args.wandb_mode or "offline")
        except Exception as exc:
            print(f"libero-eval report: W&B logging failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(f"W&B: comparison run {name} under {out / 'wandb'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides may come after options (argparse stops collecting positionals at an option)
        bad = [e for e in extra if args.command not in ("sweep", "serve") or "=" not in e or e.startswith("-")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = list(args.overrides) + extra
    if args.command == "run":
        return cmd_run(args)
    if args.command == "sweep":
        return cmd_sweep(args)
    if args.command == "replay":
        return replay.run(args)
    if args.command == "report":
        return cmd_report(args)
    if args.command == "serve":
        return serve.run(args)
    if args.command == "profile":
        return profile_command.run(args)
    if args.command == "layout-table":
        return layout_command.run(args)
    if args.command == "train":
        return learning.run_train(args)
    if args.command == "record-demos":
        return learning.run_record_demos(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
