"""Sweeps on real Ray and real LIBERO (small): completion, driver interruption and resume (the faults done
with SIGKILL are in test_faults.py)."""
import json
from pathlib import Path

import pytest

from libero_eval.cli import main as cli_main
from libero_eval.config import ConfigError, load_config
from libero_eval.sweep import plan_episodes, run_sweep
from tests.helpers import read_results

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]  # ray_session: conftest.py
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


INTERRUPT_AFTER = 2  # of 6 planned: stored results when the driver is interrupted


def test_interrupted_driver_resumes_without_duplicates_and_refuses_other_configs(tmp_path, capsys):
    """Ctrl-C on the driver right after its 2nd stored result (KeyboardInterrupt raised from on_result: the
    timing depends neither on episode length nor on machine load): run_sweep stops with the sweep partial and
    kills its actors on the way out. Rerunning the same config skips the stored episodes and completes every
    planned episode exactly once; a different config in the same run directory is refused."""
    config = load_config(CONFIGS / "hold_smoke.yaml", ["trials=3", "max_steps=8"])
    planned = [s.key for s in plan_episodes(config)]
    assert len(planned) == 6
    out = tmp_path / "resumed"
    seen = []

    def ctrl_c(result):
        seen.append(result.key)
        if len(seen) == INTERRUPT_AFTER:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, out, progress=False, on_result=ctrl_c)
    first = read_results(out)
    assert len(first) < len(planned), (
        f"the sweep was already complete when interrupted ({len(first)} of {len(planned)} episodes stored), so "
        "this run proves no resume")
    assert [l["key"] for l in first] == seen and len(first) == INTERRUPT_AFTER  # nothing stored after Ctrl-C

    # The same config resumes: the stored episodes are skipped (not rerun), the rest run once each.
    capsys.readouterr()
    outcome = run_sweep(config, out, progress=False)
    printed = capsys.readouterr().out
    assert f"resuming {out}: {INTERRUPT_AFTER} of {len(planned)} episodes already stored" in printed, printed
    assert (outcome.planned, outcome.ran) == (len(planned), len(planned) - INTERRUPT_AFTER)
    lines = read_results(out)
    keys = [l["key"] for l in lines]
    assert len(keys) == len(set(keys)), f"duplicate results: {sorted(k for k in keys if keys.count(k) > 1)}"
    assert sorted(keys) == sorted(planned)
    assert lines[: len(first)] == first  # earlier lines untouched
    assert all(l["status"] == "failure" and l["steps"] == 8 for l in lines)  # hold never succeeds
    assert sorted(r.key for r in outcome.results) == sorted(planned)

    # A different config in the same run directory is refused (the CLI exits 2), naming the difference.
    code = cli_main(["sweep", str(CONFIGS / "hold_smoke.yaml"), "--out", str(out), "--no-progress", "trials=3",
                     "max_steps=9"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "max_steps: stored 8, now 9" in err
    assert read_results(out) == lines


@pytest.fixture(scope="module")
def smoke_two_workers(tmp_path_factory, ray_session):
    """The demo's config (the shipped small Pi0.5, 2 tasks x 2 trials x 3 variants), capped at 10 steps, on 2
    workers: (config, outcome, run directory)."""
    config = load_config(CONFIGS / "smoke.yaml", ["max_steps=10", "wandb.enabled=false"])
    out = tmp_path_factory.mktemp("smoke2") / "smoke"
    return config, run_sweep(config, out, progress=False), out


def test_two_worker_smoke_sweep_completes_with_paired_records(smoke_two_workers):
    from libero_eval.sweep_summary import pick_baseline, policy_rows

    config, outcome, out = smoke_two_workers
    lines = read_results(out)
    assert len(lines) == len({l["key"] for l in lines}) == len(plan_episodes(config)) == 12
    assert all(l["status"] == "failure" and l["steps"] == 10 for l in lines)  # random weights never succeed
    for l in lines:
        assert [r["index"] for r in l["records"]] == [0, 1]  # queries at actions 0 and 5
        assert l["records"][0]["decision"] == "full"  # every cache policy computes the first frame
        for r in l["records"]:
            assert r["decision"] in ("full", "reuse", "partial") and r["latency_ms"]["total"] > 0
            assert r["extra"]["batch_size"] >= 1 and r["extra"]["queue_wait_ms"] >= 0
        assert (out / l["video"]).exists()
    # task-affine scheduling: each worker keeps its env (2 tasks, 2 workers: at most one re-creation)
    assert len({l["env_stats"]["worker_pid"] for l in lines}) == 2
    assert max(l["env_stats"]["envs_created"] for l in lines) <= 2
    # paired seeds: one seed per (task, trial) whatever the variant
    seeds = {}
    for l in lines:
        seeds.setdefault((l["task_id"], l["trial"]), set()).add(l["seed"])
    assert all(len(s) == 1 for s in seeds.values())
    assert outcome.actor_stats["requests"] == 24 and outcome.actor_stats["open_sessions"] == 0
    variants = config.variants()
    rows = policy_rows(outcome.results, pick_baseline([v.label for v in variants], {v.label: v.name for v in variants}))
    assert [r["policy"] for r in rows] == sorted((v.label for v in variants), key=lambda l: (l != "none", l))
    assert rows[0]["policy"] == "none" and rows[0]["reuse_rate"] == 0.0
    assert all(r["pairs"] == 4 and r["mcnemar_p"] == 1.0 for r in rows[1:])


def test_speedup_does_not_depend_on_the_number_of_workers(smoke_two_workers, tmp_path):
    """The same sweep on 1 worker: every frame's cost, and so latency, Hz and speedup, equals the 2-worker
    sweep's, though the batches differ (2 workers share the actor's batches, 1 never does). The 1-worker run
    directory starts from the 2-worker one's latency.json (as a resumed sweep would): one calibration."""
    import shutil

    from libero_eval.execution import LATENCY_FILE
    from libero_eval.sweep_summary import pick_baselines, policy_rows

    config, two, two_dir = smoke_two_workers
    calibrated = json.loads((two_dir / LATENCY_FILE).read_text())["calibrated"]
    assert calibrated["name"] == "calibrated" and calibrated["prefix_ms"] > 0 and calibrated["images_per_frame"] == 2
    one_dir = tmp_path / "one"
    one_dir.mkdir()
    shutil.copy(two_dir / LATENCY_FILE, one_dir / LATENCY_FILE)
    one = run_sweep(load_config(CONFIGS / "smoke.yaml", ["max_steps=10", "wandb.enabled=false",
                                                         "ray.num_workers=1"]), one_dir, progress=False)
    batch_sizes = {w: [rec["extra"]["batch_size"] for r in o.results for rec in r.records]
                   for w, o in (("one", one), ("two", two))}
    assert max(batch_sizes["one"]) == 1  # (with 2 workers, requests that meet in time share a batch)
    baselines = pick_baselines({v.label: v.describe() for v in config.variants()})
    rows = {w: {r["policy"]: r for r in policy_rows(o.results, baselines)} for w, o in (("one", one), ("two", two))}
    for label, row in rows["two"].items():
        assert row["cost_ms"] > 0
        for key in ("cost_ms", "hz", "speedup", "reuse_rate"):
            assert rows["one"][label][key] == row[key], (label, key)
    assert rows["two"]["fixed_window_window2"]["speedup"] > 1.0  # reuse frames skip vision and prefix


def test_a_realtime_sweep_is_deterministic_and_renders_only_query_steps(tmp_path):
    """timing: realtime under the Thor profile, through Ray, W&B (offline) and the report, twice: every
    episode the same; chunks arrive 4 (full frame) or 3 (prefix reuse) env steps late; the env renders the
    cameras exactly at the query steps; each variant is compared with the `none` of its own timing. An
    `execution: rtc` variant runs the same clock, each query after the first guided towards the 5 actions
    left of the chunk in flight, for the delay the worker then applies."""
    overrides = ["trials=[40]", "max_steps=15", "latency=thor_trt_fp8", "wandb.videos=none", "ray.num_workers=1",
                 "policies=[{name: none, timing: [sync, realtime]}, {name: fixed_window, window: 2, timing: realtime}, "
                 "{name: none, timing: realtime, execution: rtc}]",
                 "suites={libero_spatial: [0]}"]
    config = load_config(CONFIGS / "smoke.yaml", overrides)
    assert cli_main(["sweep", str(CONFIGS / "smoke.yaml"), "--out", str(tmp_path / "rt0"), "--no-progress",
                     *overrides]) == 0
    runs = [run_sweep(config, tmp_path / f"rt{i}", progress=False) for i in range(2)]  # rt0: all stored already
    keep = ("index", "decision", "reason", "env_step", "cost_ms", "delay_steps", "fallback_actions")
    views = [{r.key: (r.steps, r.success, [{k: rec[k] for k in keep} for rec in r.records]) for r in o.results}
             for o in runs]
    assert views[0] == views[1]
    by_label = {r.policy_label: r for r in runs[0].results}
    sync, realtime, cached = (by_label[l] for l in ("none_timingsync", "none_timingrealtime",
                                                    "fixed_window_timingrealtime_window2"))
    assert [rec["delay_steps"] for rec in sync.records] == [0] * len(sync.records)
    assert [rec["env_step"] for rec in sync.records] == list(range(0, 15, 5))
    # the small model encodes 2 camera slots: 17 ms x 2/3 + 52 + 10 x 10.2 + 3 = 168.3 ms, ceil(3.37) = 4 steps
    assert {rec["cost_ms"] for rec in realtime.records} == {168.333}
    assert {rec["delay_steps"] for rec in realtime.records} == {4}
    assert [rec["env_step"] for rec in realtime.records] == list(range(0, 15, 5))  # delay 4 < replan 5
    assert realtime.records[0]["fallback_actions"] == 4  # the first chunk is awaited on the fallback
    assert [rec["delay_steps"] for rec in cached.records] == [4 if rec["decision"] == "full" else 3
                                                              for rec in cached.records]
    rtc = by_label["none_executionrtc_timingrealtime"]
    assert [rec["extra"]["rtc"] for rec in rtc.records] == [
        {"guided": False, "delay_steps": 4, "leftover": 0, "guided_actions": 0},
        *[{"guided": True, "delay_steps": 4, "leftover": 5, "guided_actions": 5}] * 2]
    assert [(rec["env_step"], rec["delay_steps"]) for rec in rtc.records] == [
        (rec["env_step"], rec["delay_steps"]) for rec in realtime.records]
    assert all("rtc_frozen_dev" in rec["signals"] for rec in rtc.records[1:])
    for r in runs[0].results:
        assert r.env_stats["renders"] == 2 * len(r.records)  # both cameras, at the query steps only
    from libero_eval.report import load_run, write_report

    data = load_run(tmp_path / "rt0")
    assert data.baselines == {"none_timingsync": "none_timingsync", "none_timingrealtime": "none_timingrealtime",
                              "fixed_window_timingrealtime_window2": "none_timingrealtime",
                              "none_executionrtc_timingrealtime": "none_executionrtc_timingrealtime"}
    html_path, _ = write_report(tmp_path / "rt0")
    assert "plot-sync-realtime" in html_path.read_text() and "plot-latency" in html_path.read_text()
    from tests.wandb_reader import read_runs

    summaries = {run.job_type: run.summary for run in read_runs(tmp_path / "rt0" / "wandb")}
    assert summaries["none_timingrealtime"]["cost_ms"] == pytest.approx(168.333)
    assert summaries["none_timingrealtime"]["delay_steps"] == pytest.approx(4.0)
    assert summaries["fixed_window_timingrealtime_window2"]["speedup"] > 1.0


def test_a_variant_that_does_not_fit_the_model_is_a_config_error_before_any_episode(tmp_path):
    """Layers out of range are known only once the model is loaded: the policy actor binds every variant at
    start, and the sweep stops there with the reason, instead of failing (and retrying) every episode."""
    config = load_config(CONFIGS / "smoke.yaml", ["trials=[40]", "max_steps=5", "wandb.enabled=false",
                                                  "policies=[{name: vla_cache, pruning_layers: '1,99'}]"])
    with pytest.raises(ConfigError, match=r"policy actor could not start: .*pruning_layers \[99\] out of range"):
        run_sweep(config, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "results.jsonl").exists()
