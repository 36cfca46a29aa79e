"""W&B logging, read back from the offline run files with wandb's own protobuf records (tests/wandb_reader):
runs, groups, config keys, per-episode history, the per-frame table, videos, summaries equal to what the
result store says; failures never lose results; nothing secret is written; a run directory can be logged
again after the fact; and one real sweep logs end to end."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from libero_eval.cli import main
from libero_eval.config import ConfigError, WandbConfig
from libero_eval.stats import wilson_interval
from libero_eval.store import ResultStore
from libero_eval.sweep_summary import policy_rows
from libero_eval.tracking import (GuardedTracker, SweepInfo, Tracker, WandbTracker, flat_config, make_tracker,
                                  parse_video_cap, wants_video)
from tests.report_helpers import BASELINE, CACHED, FRAMES, SUITE, TASKS, TRIALS, make_run_dir, synthetic_config
from tests.wandb_reader import read_records, read_runs

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"WANDB_API_KEY": "local-0123456789abcdef0123456789abcdef01234567", "HF_TOKEN": "hf_SECRETSECRETSECRET"}


def _log_sweep(run_dir: Path, config, results):
    """What `libero-eval sweep` does with a tracker: make it (results already stored are an earlier
    process's), store each new result then call on_result, finish with everything stored."""
    tracker = make_tracker(config, run_dir)
    store = ResultStore(run_dir)
    for r in results:
        store.append(r)
        tracker.on_result(r)
    everything = store.load()
    tracker.finish(everything, policy_rows(everything, BASELINE), BASELINE)
    assert tracker.failure is None
    return tracker


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A synthetic sweep logged offline, with secrets in the environment that must not leak."""
    run_dir = tmp_path_factory.mktemp("wandb") / "synth"
    config, results = make_run_dir(run_dir, videos="all", replay=True, store=False)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in SECRETS.items():
            mp.setenv(k, v)
        _log_sweep(run_dir, config, results)
    runs = {r.job_type: r for r in read_runs(run_dir / "wandb")}
    return run_dir, ResultStore(run_dir).load(), runs


def _mine(results, label):
    return [r for r in results if r.policy_label == label]


def test_one_run_per_variant_grouped_by_sweep_with_flat_config(logged):
    run_dir, results, runs = logged
    assert sorted(runs) == sorted([BASELINE, CACHED])
    for label, run in runs.items():
        assert run.group == "synth"
        assert run.name == f"synth-{label}"
        assert run.project == "libero-eval"
        assert run.exit_code == 0
        assert run.config["policy.label"] == label
        assert run.config["sweep"] == "synth" and run.config["baseline"] == BASELINE
        assert run.config["suites.libero_spatial"] == TASKS
        assert run.config["trials"] == TRIALS and run.config["model.kind"] == "tiny"
        assert run.config["episode.replan_steps"] == 5 and run.config["wandb.videos"] == "all"
        assert not any(isinstance(v, dict) for v in run.config.values()), "config keys must be flat"
    assert runs[CACHED].config["policy.name"] == "adaptive"
    assert runs[CACHED].config["policy.pixel_mae"] == 6 and runs[CACHED].config["policy.window"] == 3
    assert "policy.window" not in runs[BASELINE].config


def test_per_episode_history_matches_the_store(logged):
    _, results, runs = logged
    for label, run in runs.items():
        episodes = {row["episode/key"]: row for row in run.history if "episode/key" in row}
        mine = _mine(results, label)
        assert sorted(episodes) == sorted(r.key for r in mine)
        assert sorted(row["episode"] for row in episodes.values()) == list(range(len(mine)))
        for r in mine:
            row = episodes[r.key]
            assert row["episode/success"] == int(r.success)
            assert row["episode/error"] == int(r.status == "error")
            assert row["episode/steps"] == r.steps
            assert row["episode/wall_s"] == pytest.approx(r.wall_s)
            assert (row["episode/suite"], row["episode/task_id"], row["episode/trial"]) == (r.suite, r.task_id, r.trial)
            if not r.records:
                assert "episode/latency_mean_ms" not in row
                continue
            latency = [rec["latency_ms"]["total"] for rec in r.records]
            reused = sum(rec["decision"] == "reuse" for rec in r.records)
            assert row["episode/frames"] == FRAMES
            assert row["episode/reuse_rate"] == pytest.approx(reused / FRAMES)
            assert row["episode/latency_mean_ms"] == pytest.approx(np.mean(latency))
            assert row["episode/latency_p95_ms"] == pytest.approx(np.percentile(latency, 95))
            cos = [rec["signals"]["shadow_cos"] for rec in r.records if "shadow_cos" in rec["signals"]]
            if cos:
                assert row["episode/shadow_cos_mean"] == pytest.approx(np.mean(cos))
                assert row["episode/shadow_cos_min"] == pytest.approx(min(cos))
            else:
                assert "episode/shadow_cos_mean" not in row


def test_per_frame_table_has_every_frame_signal_and_latency(logged):
    _, results, runs = logged
    run = runs[CACHED]
    table = run.table("frame_table")
    columns = table["columns"]
    for col in ("episode", "frame", "env_step", "decision", "reason", "shadow_cos", "pixel_mae", "state_drift",
                "shadow_l2", "latency_total_ms", "latency_prefix_ms", "threshold_pixel_mae", "batch_size"):
        assert col in columns, col
    rows = [dict(zip(columns, row)) for row in table["data"]]
    mine = _mine(results, CACHED)
    assert len(rows) == sum(len(r.records) for r in mine)
    by_frame = {(row["episode"], row["frame"]): row for row in rows}
    for r in mine:
        for rec in r.records:
            row = by_frame[(r.key, rec["index"])]
            assert (row["decision"], row["reason"], row["env_step"]) == (rec["decision"], rec["reason"], rec["env_step"])
            assert row["pixel_mae"] == pytest.approx(rec["signals"]["pixel_mae"])
            assert row["shadow_cos"] == pytest.approx(rec["signals"]["shadow_cos"])
            assert row["latency_total_ms"] == pytest.approx(rec["latency_ms"]["total"])
            assert row["threshold_pixel_mae"] == 6.0 and row["episode_success"] == r.success
    # the question users ask: reused frames whose shadow deviation says the cache was stale
    stale = [row for row in rows if row["reason"] == "within_thresholds" and row["shadow_cos"] < 0.9]
    expected = sum(rec["reason"] == "within_thresholds" and rec["signals"]["shadow_cos"] < 0.9
                   for r in mine for rec in r.records)
    assert len(stale) == expected > 0
    baseline_rows = runs[BASELINE].table("frame_table")
    assert len(baseline_rows["data"]) == sum(len(r.records) for r in _mine(results, BASELINE))
    assert "pixel_mae" not in baseline_rows["columns"]


def test_videos_are_logged_decodable_and_captioned(logged):
    _, results, runs = logged
    for label, run in runs.items():
        by_key = {r.key: r for r in _mine(results, label)}
        logged_videos = [row for row in run.history if "rollout" in row]
        assert len(logged_videos) == sum(1 for r in by_key.values() if r.video)  # cap "all"; errors have none
        for row in logged_videos:
            r = by_key[row["episode/key"]]
            video = row["rollout"]
            assert video["_type"] == "video-file"
            frames = imageio.mimread(run.file(video["path"]), memtest=False)
            assert len(frames) == r.video_frames == FRAMES
            assert frames[0].shape == (112, 64, 3)  # 64-px image + the 48-px HUD
            outcome = "SUCCESS" if r.success else "FAILURE (max_steps)"
            assert video["caption"] == f"task {r.task_id} name | {SUITE} task {r.task_id} trial {r.trial} | {outcome}"
            if label == BASELINE:  # every frame FULL, no signal: no flat plot of constants
                assert "timeline" not in row
            else:
                assert row["timeline"]["_type"] == "image-file" and run.file(row["timeline"]["path"]).is_file()


def test_summary_equals_what_the_result_store_says(logged):
    _, results, runs = logged
    latency = {label: np.mean([rec["cost_ms"] for r in _mine(results, label) if r.status != "error"
                               for rec in r.records]) for label in runs}
    for label, run in runs.items():
        scored = [r for r in _mine(results, label) if r.status != "error"]
        n, k = len(scored), sum(r.success for r in scored)
        lo, hi = wilson_interval(k, n)
        s = run.summary
        assert (s["n"], s["successes"], s["errors"]) == (n, k, len(_mine(results, label)) - n)
        assert s["success_rate"] == pytest.approx(k / n)
        assert (s["wilson_low"], s["wilson_high"]) == (pytest.approx(lo), pytest.approx(hi))
        assert s["cost_ms"] == pytest.approx(latency[label])
        assert s["hz"] == pytest.approx(1000 / latency[label])
        assert s["speedup"] == pytest.approx(latency[BASELINE] / latency[label])
        frames = [rec for r in scored for rec in r.records]
        assert s["reuse_rate"] == pytest.approx(sum(rec["decision"] == "reuse" for rec in frames) / len(frames))
        assert s["latency_p95_ms"] == pytest.approx(np.percentile([rec["latency_ms"]["total"] for rec in frames], 95))
        assert s["episode/success"] == pytest.approx(k / n)
        for task in TASKS:
            t = [r for r in scored if r.task_id == task]
            tk = sum(r.success for r in t)
            prefix = f"task/{SUITE}/task{task:02d}"
            assert s[f"{prefix}/n"] == len(t) and s[f"{prefix}/successes"] == tk
            assert s[f"{prefix}/wilson_low"] == pytest.approx(wilson_interval(tk, len(t))[0])
        assert s[f"suite/{SUITE}/success_rate"] == pytest.approx(k / n)
        for key in ("episode/key", "episode/trial", "episode/reason"):
            assert key not in s, f"{key}: a per-episode identifier has no meaningful summary"
        assert s["plots/success_by_policy"]["_type"] == "image-file"
        assert s["plots/success_vs_speedup"]["_type"] == "image-file"
    cached = runs[CACHED].summary
    assert (cached["pairs"], cached["base_only"], cached["variant_only"]) == (5, 1, 0)  # lost task 0 trial 1
    assert cached["full_by_reason/first_frame"] == 5
    assert cached["replay/cos_mean"] == pytest.approx(0.9612)  # offline fidelity beside closed loop
    assert "pairs" not in runs[BASELINE].summary


def test_nothing_secret_is_written(logged):
    run_dir, _, _ = logged
    files = [p for p in (run_dir / "wandb").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    for path in files:
        data = path.read_bytes()
        for name, secret in SECRETS.items():
            assert secret.encode() not in data, f"{name} leaked into {path}"
    info = SweepInfo("s", {"model": {"kind": "tiny", "hf_token": "x"}}, {"v": {"name": "n", "api_key": "y", "k": 1}},
                     [0], None)
    flat = flat_config(info, "v")
    assert flat["policy.k"] == 1 and flat["model.kind"] == "tiny"
    assert "policy.api_key" not in flat and "model.hf_token" not in flat


def test_reader_checks_the_log_format(tmp_path, logged):
    run_dir, _, runs = logged
    log = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    records = read_records(log)
    assert records[0].WhichOneof("record_type") == "header"
    assert any(r.WhichOneof("record_type") == "exit" for r in records)
    broken = tmp_path / "run-x.wandb"
    data = bytearray(log.read_bytes())
    data[40] ^= 0xFF
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_records(broken)


def test_video_caps():
    assert parse_video_cap("all") == ("all", None)
    assert parse_video_cap("first:2") == ("first", 2)
    for bad in ("first:0", "some", "first:x", ""):
        with pytest.raises(ConfigError, match="wandb.videos"):
            parse_video_cap(bad)

    class R:
        def __init__(self, trial, success, video="videos/x.mp4"):
            self.trial, self.success, self.video = trial, success, video

    trials = [4, 2, 7]
    assert wants_video(R(2, True), ("first", 1), trials) and not wants_video(R(4, False), ("first", 1), trials)
    assert wants_video(R(4, False), ("first", 2), trials)
    assert wants_video(R(7, False), ("failures", None), trials) and not wants_video(R(7, True), ("failures", None), trials)
    assert not wants_video(R(2, True, video=None), ("all", None), trials)
    assert not wants_video(R(2, False), ("none", None), trials)
    with pytest.raises(ConfigError, match="wandb.videos"):
        make_tracker(synthetic_config(videos="last:3"), "/nonexistent/never/created")
    with pytest.raises(ConfigError, match="wandb.mode"):
        WandbTracker("/tmp/x", SweepInfo("s", {}, {}, [0], None), WandbConfig(mode="bogus"))
    disabled = synthetic_config()
    disabled.wandb.mode = "disabled"
    assert type(make_tracker(disabled, "/nonexistent")) is Tracker


def test_first_k_videos_per_task_and_resume_backfill(tmp_path):
    """A resumed sweep: half the results were stored by an earlier process; the run still holds every
    episode, videos only for the first trial of each task; a later no-op resume logs nothing again."""
    run_dir = tmp_path / "synth"
    config, results = make_run_dir(run_dir, videos="first:1", store=False)
    before, during = results[: len(results) // 2], results[len(results) // 2:]
    for r in before:
        ResultStore(run_dir).append(r)
    _log_sweep(run_dir, config, during)
    runs = {r.job_type: r for r in read_runs(run_dir / "wandb")}
    for label, run in runs.items():
        keys = {row["episode/key"] for row in run.history if "episode/key" in row}
        assert keys == {r.key for r in _mine(results, label)}
        videos = [row for row in run.history if "rollout" in row]
        assert sorted(row["episode/key"] for row in videos) == sorted(
            r.key for r in _mine(results, label) if r.trial == 0 and r.video)
    _log_sweep(run_dir, config, [])
    assert len(read_runs(run_dir / "wandb")) == 2, "a finished, fully logged variant must not be logged twice"


class BrokenTracker(Tracker):
    def __init__(self):
        self.calls = []

    def on_result(self, result):
        self.calls.append("on_result")
        raise OSError(errno.ENOSPC, "No space left on device")

    def finish(self, results, rows, baseline):
        self.calls.append("finish")

    def close(self):
        self.calls.append("close")


def test_a_broken_tracker_is_logged_and_switched_off(tmp_path, caplog):
    inner = BrokenTracker()
    tracker = GuardedTracker(inner, tmp_path)
    with caplog.at_level(logging.WARNING, logger="libero_eval"):
        tracker.on_result(object())
        tracker.on_result(object())
        tracker.finish([], [], None)
    assert inner.calls == ["on_result", "close"]
    assert "No space left on device" in tracker.failure
    assert f"libero-eval report {tmp_path} --wandb" in caplog.text


def test_wandb_failures_never_lose_results(tmp_path, monkeypatch, caplog):
    """Disk full in the middle of a run, and a W&B directory that cannot be created: the hooks never raise,
    the store is untouched, the open run is closed as failed."""
    import wandb.sdk.wandb_run as wandb_run

    run_dir = tmp_path / "synth"
    config, results = make_run_dir(run_dir, store=False)
    store = ResultStore(run_dir)
    real_log, calls = wandb_run.Run.log, []

    def log_until_disk_full(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_log(self, *args, **kwargs)

    monkeypatch.setattr(wandb_run.Run, "log", log_until_disk_full)
    tracker = make_tracker(config, run_dir)
    with caplog.at_level(logging.WARNING, logger="libero_eval"):
        for r in results:
            store.append(r)
            tracker.on_result(r)
        tracker.finish(results, policy_rows(results, BASELINE), BASELINE)
    assert "No space left on device" in tracker.failure and len(calls) == 3
    assert [r.to_dict() for r in store.load()] == [r.to_dict() for r in results]
    runs = read_runs(run_dir / "wandb")
    assert [r.exit_code for r in runs] == [1] * len(runs) and len(runs) == 2  # both variants had opened
    assert sum(len(r.history) for r in runs) == 2  # the rows logged before the disk filled up

    monkeypatch.setattr(wandb_run.Run, "log", real_log)
    blocked = tmp_path / "blocked"
    config, results = make_run_dir(blocked)
    (blocked / "wandb").write_text("a file where wandb wants a directory")
    tracker = make_tracker(config, blocked)
    for r in results:
        tracker.on_result(r)
    tracker.finish(results, [], BASELINE)
    assert "NotADirectoryError" in tracker.failure
    assert len(ResultStore(blocked).load()) == len(results)


def test_online_without_credentials_never_prompts(tmp_path, monkeypatch):
    """mode=online and nobody logged in: tracking switches off with a clear reason instead of waiting at
    wandb's login prompt in the middle of a sweep."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config"))
    run_dir = tmp_path / "synth"
    config, results = make_run_dir(run_dir)
    config.wandb.mode = "online"
    tracker = make_tracker(config, run_dir)
    tracker.on_result(results[0])
    assert "no W&B credentials" in tracker.failure
    assert not (run_dir / "wandb").exists() or not list((run_dir / "wandb").glob("*run-*"))


def test_report_relogs_a_finished_run_directory(tmp_path, logged):
    """`libero-eval report <dir> --wandb`: W&B logging never depends on the sweep process surviving."""
    src, results, original = logged
    run_dir = tmp_path / "copy"
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns("wandb"))
    assert main(["report", str(run_dir), "--wandb"]) == 0
    runs = {r.job_type: r for r in read_runs(run_dir / "wandb")}
    assert sorted(runs) == sorted(original)
    for label, run in runs.items():
        assert run.tags == ["relogged"] and run.group == "synth"
        for key in ("success_rate", "wilson_low", "wilson_high", "cost_ms", "hz", "speedup", "reuse_rate"):
            assert run.summary[key] == pytest.approx(original[label].summary[key])
        assert len(run.table("frame_table")["data"]) == sum(len(r.records) for r in _mine(results, label))
        assert len([row for row in run.history if "rollout" in row]) == sum(1 for r in _mine(results, label) if r.video)
    assert (run_dir / "report.html").is_file()


@pytest.mark.slow
def test_real_sweep_logs_to_wandb_offline_and_writes_the_report(tmp_path):
    """One real sweep (hold policy, real LIBERO, local Ray): the CLI wires the tracker and the report."""
    out = tmp_path / "hold"
    env = {**os.environ, "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "libero_eval.cli", "sweep", "configs/hold_smoke.yaml", "--out", str(out),
         "--no-progress", "max_steps=5", "trials=1", "wandb.enabled=true", "wandb.mode=offline"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = ResultStore(out).load()
    assert len(results) == 2
    (run,) = read_runs(out / "wandb")
    assert (run.group, run.job_type, run.exit_code) == ("hold_smoke", "hold", 0)
    assert run.config["policy.name"] == "hold" and run.config["max_steps"] == 5
    episodes = {row["episode/key"]: row for row in run.history if "episode/key" in row}
    assert sorted(episodes) == sorted(r.key for r in results)
    for r in results:
        assert episodes[r.key]["episode/steps"] == r.steps == 5
        video = episodes[r.key]["rollout"]
        assert len(imageio.mimread(run.file(video["path"]), memtest=False)) == r.video_frames > 0
    table = run.table("frame_table")
    assert len(table["data"]) == sum(len(r.records) for r in results) > 0
    assert run.summary["n"] == 2 and run.summary["success_rate"] == 0
    used = json.loads((out / "summary.json").read_text())["utilisation"]  # the sweep's, in each variant's run
    assert run.summary["sweep/episodes_per_hour"] == used["episodes_per_hour"] > 0
    assert run.summary["sweep/workers"] == len(used["workers"]) and 0 < run.summary["sweep/env_busy_mean"] <= 1
    assert (out / "report.html").is_file() and (out / "summary.md").is_file()
    assert "report:" in proc.stdout and "W&B (offline)" in proc.stdout
