"""`libero-eval layout-table`: measure (and check) the table of openpi scene layouts that `env.seeding:
openpi` restores (tasks/layout.py). The shipped table covers libero_spatial, libero_object, libero_goal and
libero_10; rebuild it after changing LIBERO, robosuite or MuJoCo, or add a suite it lacks.

Cost: one hard reset per entry (~4 s on CPU; 50 per task), twice with --check layout.
"""
from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path

from libero_eval.cli_common import fail, parse_int_list, positive
from tasks import layout, registry
from tasks import layout_build

EXAMPLES = """examples:
  libero-eval layout-table --suites libero_spatial --tasks 0 --trials 3 --check layout --table /tmp/t.json
  libero-eval layout-table --suites libero_spatial libero_object libero_goal libero_10 --jobs 2

Per task, an env driven as openpi's examples/libero/main.py drives it (fresh env, env.seed(7), one hard
reset per init state, in order) gives each trial's global-RNG state before its reset; the entry stores it
as (32-bit words since seeding, Gaussian cache) and is checked to rebuild it bit for bit. --check layout
also restores every entry in a second env, in reverse order, and compares body positions and first images
with openpi's. Finished tasks are written to the table at once (an interrupted build keeps them).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "layout-table", help="measure the openpi scene-layout table (env.seeding: openpi)", description=__doc__,
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", nargs="+", required=True, choices=registry.SUITES, metavar="SUITE",
                        help=f"suites to measure ({', '.join(registry.SUITES)})")
    parser.add_argument("--tasks", default="all", type=lambda s: parse_int_list(s, "task"),
                        help="task ids in every suite: '0,1', '0-4' or 'all' (default all)")
    parser.add_argument("--trials", default=registry.NUM_INIT_STATES, type=positive,
                        help=f"init states per task, from 0 (default {registry.NUM_INIT_STATES}: all)")
    parser.add_argument("--check", default="rng", choices=layout_build.CHECKS,
                        help="rng: every entry rebuilds its RNG state bit for bit (default); layout: also "
                             "restore every entry in a second env and compare bodies and images (2x time)")
    parser.add_argument("--jobs", default=1, type=positive, help="tasks measured in parallel processes (default 1)")
    parser.add_argument("--table", default=str(layout.TABLE_PATH),
                        help="table to update (default the shipped one, tasks/data/openpi_layouts.json)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.trials > registry.NUM_INIT_STATES:
        return fail("layout-table", f"--trials {args.trials}: a task has {registry.NUM_INIT_STATES} init states")
    jobs = []
    try:
        for suite in args.suites:
            ids = range(registry.num_tasks(suite)) if args.tasks == "all" else args.tasks
            for task_id in ids:
                registry.check_task(suite, task_id)
                jobs.append((suite, int(task_id), args.trials, args.check))
        table = layout.read_table(args.table)
    except (registry.TaskSpecError, layout.LayoutTableError, ValueError) as exc:
        return fail("layout-table", exc)
    table["built_with"] = layout_build.built_with()
    print(f"measuring {len(jobs)} task(s) x {args.trials} init states (check {args.check}, {args.jobs} job(s)) "
          f"into {args.table}", flush=True)
    t0 = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # each task in a fresh process: fresh env, fresh GL
    with context.Pool(args.jobs, maxtasksperchild=1) as pool:
        for i, (suite, task_id, entries, seconds) in enumerate(pool.imap_unordered(layout_build.timed_build, jobs)):
            table["suites"].setdefault(suite, {})[str(task_id)] = entries
            layout.write_table(table, args.table)
            print(f"[{i + 1}/{len(jobs)}] {suite} task {task_id}: {len(entries)} entries in {seconds:.0f} s "
                  f"(elapsed {time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"done: {Path(args.table)}")
    return 0
