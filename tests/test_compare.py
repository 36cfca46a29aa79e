"""`libero-eval report RUN_A RUN_B`: two run directories side by side. Shared variants are paired episode
by episode, differences are flagged (outcomes, decisions, settings, config keys), and the comparison lands
on the terminal, in compare.html / .md / .json and as one W&B run."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import yaml

from libero_eval.cli import main
from libero_eval.compare import compare_runs
from libero_eval.report import ReportError
from libero_eval.store import ResultStore
from tests.report_helpers import BASELINE, CACHED, TASKS, TRIALS, make_run_dir
from tests.wandb_reader import read_runs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A: the synthetic sweep. B: the same sweep a day later with max_steps 40, where the cached policy lost
    task 0 trial 0 (the baseline still solves it) and its frames on task 1 trial 1 decided differently."""
    root = tmp_path_factory.mktemp("compare")
    make_run_dir(root / "monday")
    _, results = make_run_dir(root / "tuesday", store=False)
    store = ResultStore(root / "tuesday")
    for r in results:
        if (r.policy_label, r.task_id, r.trial) == (CACHED, 0, 0):
            r = dataclasses.replace(r, success=False, status="failure", reason="max_steps", steps=30)
        if (r.policy_label, r.task_id, r.trial) == (CACHED, 1, 1):
            r = dataclasses.replace(r, records=[{**rec, "decision": "full"} for rec in r.records])
        store.append(r)
    config = yaml.safe_load((root / "tuesday" / "config.yaml").read_text())
    config["max_steps"] = 40
    (root / "tuesday" / "config.yaml").write_text(yaml.safe_dump(config))
    return root / "monday", root / "tuesday"


def test_shared_variants_are_paired_and_differences_flagged(two_runs):
    cmp = compare_runs(*two_runs)
    rows = {r["policy"]: r for r in cmp.rows}
    base, cached = rows[BASELINE], rows[CACHED]
    assert base["flags"] == [] and (base["pairs"], base["base_only"], base["variant_only"]) == (6, 0, 0)
    assert (cached["a"]["successes"], cached["b"]["successes"]) == (2, 1)
    assert (cached["pairs"], cached["base_only"], cached["variant_only"]) == (5, 1, 0)  # the error has no pair
    assert cached["flags"][:2] == ["outcome differs in 1 of 5 pairs", "decisions differ in 1 of 5 pairs"]
    assert cached["detectable"] is not None and cached["detectable"] > 0.5  # 5 pairs decide nothing
    changed = {(e["policy"], e["task_id"], e["trial"]): e["changed"] for e in cmp.episodes}
    assert changed == {(CACHED, 0, 0): ["outcome", "steps"], (CACHED, 1, 1): ["decisions"]}
    assert cmp.config_diff == [("max_steps", 30, 40)]


def test_report_two_runs_writes_the_comparison_and_one_wandb_run(two_runs, tmp_path, capsys):
    run_a, run_b = two_runs
    out = tmp_path / "cmp"
    assert main(["report", str(run_a), str(run_b), "--out", str(out), "--wandb", "--wandb-mode", "offline"]) == 0
    printed = capsys.readouterr().out
    assert "Config keys that differ: max_steps: 30 -> 40" in printed
    assert "outcome differs in 1 of 5 pairs" in printed and "2 paired episode(s) differ (1 in outcome)" in printed
    page = (out / "compare.html").read_text()
    assert page.count("<video controls") == 2  # the changed outcome: A's and B's video side by side
    sources = re.findall(r'<video controls preload="metadata" src="([^"]+)"', page)
    assert [(out / src).resolve() for src in sources] == [  # relative, so the folder can move with the runs
        (run / "videos" / f"{CACHED}__libero_spatial__task00__trial00.mp4").resolve() for run in (run_a, run_b)]
    assert (out / "success_a_vs_b.png").is_file()
    stored = json.loads((out / "compare.json").read_text())
    assert [r["policy"] for r in stored["rows"]] == [BASELINE, CACHED]
    assert stored["rows"][1]["a"]["successes"] == 2 and stored["rows"][1]["b"]["successes"] == 1
    assert "| max_steps |" not in (out / "compare.md").read_text()  # config differences sit in the legend
    (run,) = read_runs(out / "wandb")
    assert run.job_type == "compare" and run.exit_code == 0 and "compare" in run.tags
    assert run.config["config_diff.max_steps"] == "30 -> 40"
    table = run.table("comparison")
    assert [row[0] for row in table["data"]] == [BASELINE, CACHED]
    assert run.summary[f"{CACHED}/success_a"] == pytest.approx(2 / 5)
    assert run.summary[f"{CACHED}/pairs_differ"] == 1
    assert len(run.table("changed_episodes")["data"]) == 2
    # neither run directory was touched
    assert not (run_a / "compare.html").exists() and not (run_b / "compare.html").exists()
    assert len(ResultStore(run_b).load()) == len(TASKS) * TRIALS * 2


def test_bad_comparisons_are_refused(two_runs, tmp_path, capsys):
    run_a, _ = two_runs
    with pytest.raises(ReportError, match="the same run directory"):
        compare_runs(run_a, run_a)
    assert main(["report", str(run_a), str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(run_a), str(run_a), str(run_a)]) == 2
    assert "one run directory, or two to compare" in capsys.readouterr().err


def test_partly_overlapping_runs_say_who_is_without_a_partner(two_runs, tmp_path):
    """B holds task 0 of the baseline only: the cached policy is "only in A", the baseline's unpaired
    episodes are counted on A's side, and the default output folder sits beside B, never inside it."""
    run_a, _ = two_runs
    run_b = tmp_path / "task0"
    _, results = make_run_dir(run_b, store=False)
    for r in results:
        if r.policy_label == BASELINE and r.task_id == 0:
            ResultStore(run_b).append(r)
    rows = {r["policy"]: r for r in compare_runs(run_a, run_b).rows}
    assert rows[CACHED]["in"] == "A only" and rows[CACHED]["flags"] == ["only in A"]
    assert rows[BASELINE]["pairs"] == TRIALS and f"without a partner: {TRIALS} in A, 0 in B" in rows[BASELINE]["flags"]
    assert main(["report", str(run_a), str(run_b)]) == 0
    assert (tmp_path / f"compare_{run_a.name}_vs_task0" / "compare.html").is_file()
    assert main(["report", str(run_a), "--out", str(tmp_path / "x")]) == 2  # --out belongs to a comparison
