"""Faults done for real to real Ray and real LIBERO (README "Failure semantics"): SIGKILL a rollout worker
mid-episode, SIGKILL the policy actor inside and between queries, SIGKILL the driver and rerun, cut
results.jsonl mid-line and resume, a sweep where every variant scores 0. After each: every planned episode
is stored exactly once with a task outcome, retries are logged, and every stored episode has exactly one
playable video and no other file is left in videos/."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import imageio.v2 as imageio
import pytest
import ray

from libero_eval.config import load_config
from libero_eval.ray_actors import SCRATCH_ROOT
from libero_eval.store import ResultStore
from libero_eval.sweep import plan_episodes, run_sweep
from tests.helpers import read_results

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]  # ray_session: conftest.py
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TASK_OUTCOMES = ("success", "failure")


def attempts(run_dir: Path) -> list[dict]:
    path = run_dir / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_nothing_lost(run_dir: Path, config) -> list[dict]:
    """Every planned episode once with a task outcome, lines for a key only after superseded infrastructure
    errors, one playable video per stored episode and no other file in videos/. Returns the stored rows."""
    planned = sorted(s.key for s in plan_episodes(config))
    lines = read_results(run_dir)
    stored = {r.key: r for r in ResultStore(run_dir).load()}
    assert sorted(stored) == planned
    bad = {k: (r.status, r.reason, r.error) for k, r in stored.items() if r.status not in TASK_OUTCOMES}
    assert not bad, f"episodes without a task outcome: {bad}"
    for key in planned:
        earlier = [l for l in lines if l["key"] == key][:-1]
        assert all(l["status"] == "error" for l in earlier), f"{key}: a task outcome was stored twice"
    videos = {p.name for p in (run_dir / "videos").iterdir()}
    referenced = {Path(r.video).name for r in stored.values()}
    assert videos == referenced, f"unreferenced: {sorted(videos - referenced)}, missing: {sorted(referenced - videos)}"
    for r in stored.values():
        with imageio.get_reader(run_dir / r.video) as reader:
            frames = sum(1 for _ in reader)
        assert frames == r.video_frames > 0, f"{r.video}: {frames} decodable frames, {r.video_frames} written"
    return [dict(key=k, status=r.status, attempt=r.attempt) for k, r in sorted(stored.items())]


def on_thread(fn):
    """Run fn in a daemon thread; its exception is kept and re-raised by the returned join()."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # surfaced by join()
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join(timeout: float = 60.0):
        thread.join(timeout)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return join


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.005):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_sigkill_rollout_worker_mid_episode(tmp_path):
    config = load_config(CONFIGS / "hold_smoke.yaml", ["suites={libero_spatial: [0]}", "trials=2", "max_steps=40",
                                                        "ray.num_workers=1", "ray.worker_queue=2"])  # one queued behind
    out = tmp_path / "worker"
    joins = []

    def kill_worker(workers, policy_actor):
        def run():
            pid = wait_for(lambda: _pid(workers[0]), 120, "the rollout worker")
            # mid-episode: its video is being written in the worker's own scratch directory, never in the run
            # directory (the driver alone writes that)
            wait_for(lambda: list((SCRATCH_ROOT / str(pid) / "videos").glob("*.partial.mp4")), 120,
                     "an episode in progress", 0.05)
            assert not (out / "videos").exists() or not list((out / "videos").iterdir())
            os.kill(pid, signal.SIGKILL)
            return pid

        joins.append(on_thread(run))

    outcome = run_sweep(config, out, progress=False, on_start=kill_worker)
    killed = joins[0]()
    rows = assert_nothing_lost(out, config)
    assert [a["reason"] for a in attempts(out)] == ["worker_died"]
    assert sorted(r["attempt"] for r in rows) == [1, 2] and outcome.retries == 1
    # the killed attempt left no file: its scratch directory went when the replacement worker started
    assert not (SCRATCH_ROOT / str(killed)).exists()


def _pid(worker):
    try:
        return ray.get(worker.pid.remote(), timeout=5)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


def test_sigkill_policy_actor_inside_and_between_queries(tmp_path, capsys):
    """The shipped small Pi0.5 behind the policy actor, serving an RTC variant (its sessions hold the chunk in
    flight and the realtime clock sent with each open). First kill: while a batch is being computed; second,
    after Ray restarted it: between two queries, sessions open (the next query finds its session gone). The
    retried episodes run guided on the restarted actor."""
    config = load_config(CONFIGS / "smoke.yaml", ["trials=[40]", "max_steps=60", "latency=thor_trt_fp8",
                                                  "policies=[{name: none, timing: realtime, execution: rtc}]",
                                                  "episode.shadow=false", "ray.max_retries=3", "wandb.enabled=false"])
    out = tmp_path / "actor"
    joins, kills = [], []

    def state(actor):
        try:
            return ray.get(actor.state.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            return None  # dead or restarting

    def kill_actor(workers, policy_actor):
        def run():
            for inside in (True, False):
                wait_for(lambda: (s := state(policy_actor)) and s["sessions"] > 0
                         and (s["in_flight"] > 0) == inside, 180, f"a query {'in' if inside else 'not in'} flight")
                pid = ray.get(policy_actor.pid.remote(), timeout=5)
                os.kill(pid, signal.SIGKILL)
                kills.append(("inside" if inside else "between", pid))
                wait_for(lambda: state(policy_actor) is not None, 180, "the restarted actor", 0.2)

        joins.append(on_thread(run))

    run_sweep(config, out, progress=False, on_start=kill_actor)
    joins[0](timeout=300)
    assert [k[0] for k in kills] == ["inside", "between"] and kills[0][1] != kills[1][1]
    # the replica left the rotation and a probe through its engine thread brought it back after each kill
    assert capsys.readouterr().out.count("policy replica 0 answers again") >= 1
    assert_nothing_lost(out, config)
    retried = attempts(out)
    assert retried and {a["reason"] for a in retried} == {"policy_unavailable"}, retried
    assert any("session lost" in a["error"] for a in retried)  # the between-queries kill, recognised by type
    for r in ResultStore(out).load():
        assert [rec["extra"]["rtc"]["guided"] for rec in r.records] == [False] + [True] * (len(r.records) - 1)


def test_cut_results_line_then_resume(tmp_path):
    config = load_config(CONFIGS / "hold_smoke.yaml", ["suites={libero_spatial: [0]}", "trials=3", "max_steps=8",
                                                        "ray.num_workers=1"])
    out = tmp_path / "torn"
    run_sweep(config, out, progress=False)
    results = out / "results.jsonl"
    data = results.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    cut_key = json.loads(data[last_start:])["key"]
    results.write_bytes(data[: last_start + 40])  # the driver died while appending the last result
    with pytest.warns(UserWarning):
        outcome = run_sweep(config, out, progress=False)
    assert outcome.ran == 1 and [r.key for r in outcome.results].count(cut_key) == 1
    assert_nothing_lost(out, config)
    assert results.read_bytes().endswith(b"\n") and (out / "results.torn").exists()


def test_sigkill_driver_then_rerun_and_an_all_zero_sweep_reports(tmp_path):
    """The CLI sweep killed with SIGKILL after two stored results, then rerun: it completes. Every episode
    fails (hold), so every rate is 0/n: the report and the W&B run are still written."""
    out = tmp_path / "driver"
    overrides = ["trials=3", "max_steps=30", "wandb.enabled=true", "wandb.mode=offline"]
    cmd = [sys.executable, "-m", "libero_eval.cli", "sweep", str(CONFIGS / "hold_smoke.yaml"), "--out", str(out),
           "--no-progress", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        wait_for(lambda: (out / "results.jsonl").exists() and len(read_results(out)) >= 2, 300,
                 "two stored results", 0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the driver and whatever it started (its local Ray)
    finally:
        first.wait(30)
    assert len(read_results(out)) < 6, "the sweep finished before the kill: this run proves no resume"
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout
    config = load_config(CONFIGS / "hold_smoke.yaml", overrides)
    rows = assert_nothing_lost(out, config)
    assert all(r["status"] == "failure" for r in rows)
    text = rerun.stdout + rerun.stderr
    assert "could not write the report" not in text and "W&B logging failed" not in text, text[-3000:]
    assert (out / "report.html").exists() and json.loads((out / "summary.json").read_text())
    assert list((out / "wandb").glob("offline-run-*"))
