"""Sweeps on real Ray and real LIBERO (small): completion, driver interruption and resume (the faults done
with SIGKILL are in test_faults.py)."""
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


def test_two_worker_smoke_sweep_completes_with_paired_records(tmp_path):
    """The demo's config (the shipped small Pi0.5, 2 tasks x 2 trials x 3 variants), capped at 10 steps, on 2
    workers."""
    from libero_eval.sweep_summary import pick_baseline, policy_rows

    config = load_config(CONFIGS / "smoke.yaml", ["max_steps=10"])
    outcome = run_sweep(config, tmp_path / "smoke", progress=False)
    lines = read_results(tmp_path / "smoke")
    assert len(lines) == len({l["key"] for l in lines}) == len(plan_episodes(config)) == 12
    assert all(l["status"] == "failure" and l["steps"] == 10 for l in lines)  # random weights never succeed
    for l in lines:
        assert [r["index"] for r in l["records"]] == [0, 1]  # queries at actions 0 and 5
        assert l["records"][0]["decision"] == "full"  # every cache policy computes the first frame
        for r in l["records"]:
            assert r["decision"] in ("full", "reuse", "partial") and r["latency_ms"]["total"] > 0
            assert r["extra"]["batch_size"] >= 1 and r["extra"]["queue_wait_ms"] >= 0
        assert (tmp_path / "smoke" / l["video"]).exists()
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


def test_a_variant_that_does_not_fit_the_model_is_a_config_error_before_any_episode(tmp_path):
    """Layers out of range are known only once the model is loaded: the policy actor binds every variant at
    start, and the sweep stops there with the reason, instead of failing (and retrying) every episode."""
    config = load_config(CONFIGS / "smoke.yaml", ["trials=[40]", "max_steps=5", "wandb.enabled=false",
                                                  "policies=[{name: vla_cache, pruning_layers: '1,99'}]"])
    with pytest.raises(ConfigError, match=r"policy actor could not start: .*pruning_layers \[99\] out of range"):
        run_sweep(config, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "results.jsonl").exists()
