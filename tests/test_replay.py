"""`libero-eval replay`: the recorded format (libero_eval.observations), replay through cache policies, the
summary schema and its table (libero_eval.tables), the CLI, and (slow) recording from a real LIBERO episode."""
from __future__ import annotations

import argparse
import json
import types

import numpy as np
import pytest

from libero_eval import replay as rp
from libero_eval import tables
from libero_eval.config import parse_policy_entry
from libero_eval.observations import load_sequence, save_observations
from libero_eval.sweep_summary import format_table as sweep_table
from policies.base import IMAGE_KEY, STATE_KEY
from tests.cache_helpers import cache_model, engine, moved, variant
from tests.pi05_helpers import observation

SPEC = types.SimpleNamespace(seed=11, key="none/libero_spatial/task00/trial00",
                             file_stem="none__libero_spatial__task00__trial00")


def record(directory, name: str, frames: int, seed: int = 11):
    recorded = [(5 * t, moved(observation(3), t // 2)) for t in range(frames)]
    spec = types.SimpleNamespace(seed=seed, key=name)
    return save_observations(directory / "observations" / f"{name}.npz", spec, recorded), recorded


def test_recorded_sequences_round_trip(tmp_path):
    path, recorded = record(tmp_path, "ep0", 3)
    seq = load_sequence(path)
    assert (seq.name, seq.seed, seq.env_steps) == ("ep0", 11, [0, 5, 10])
    for (_, want), got in zip(recorded, seq.observations, strict=True):
        assert np.array_equal(got[IMAGE_KEY], want[IMAGE_KEY]) and got[IMAGE_KEY].dtype == np.uint8
        assert np.array_equal(got[STATE_KEY], want[STATE_KEY]) and got["prompt"] == want["prompt"]
    files, out = rp.locate(tmp_path)
    assert files == [path] and out == tmp_path / "replay"
    assert rp.locate(tmp_path / "observations")[1] == tmp_path / "replay"


def test_replay_measures_fidelity_and_signal_distributions(tmp_path):
    for i in range(2):
        record(tmp_path, f"ep{i}", 4, seed=20 + i)
    sequences = [load_sequence(f) for f in rp.locate(tmp_path)[0]]
    variants = [variant("none"), variant("fixed_window", window=3), variant("adaptive", window=4, pixel_mae=1.0)]
    records = rp.replay(engine(cache_model(), shadow=True), sequences, variants, max_batch=4)
    rows = {v.label: rp.summarize_policy(v, records[v.label]) for v in variants}
    none, window, adaptive = rows["none"], rows["fixed_window"], rows["adaptive"]
    assert none["frames"] == window["frames"] == 8
    assert (none["cos_mean"], none["cos_min"], none["l2_mean"], none["reuse_rate"]) == (1.0, 1.0, 0.0, 0.0)
    assert window["reuse_rate"] == 0.5 and window["compute_skipped"] == 0.5  # frames 2 and 3 of each sequence
    assert window["cos_min"] <= window["cos_p5"] <= window["cos_mean"] < 1.0 and window["l2_mean"] > 0
    assert set(adaptive["signals"]) == {"pixel_mae"}
    p = adaptive["signals"]["pixel_mae"]
    assert list(p) == ["p50", "p75", "p90", "p95"] and p["p50"] <= p["p75"] <= p["p90"] <= p["p95"]
    # the square moves every other frame: those frames are forced full by the 1.0 threshold
    reasons = [r["reason"] for r in records["adaptive"] if r["sequence"] == "ep0"]
    assert reasons == ["first_frame", "window", "pixel_mae", "window"]
    table = rp.format_table(list(rows.values())).splitlines()
    assert table[0].split()[:3] == ["policy", "frames", "reuse"] and set(table[1]) == {"-"}
    assert table[3].split()[:4] == ["fixed_window", "8", "50%", "50.0%"]


# ---- the shared text table


def test_signal_distributions_do_not_depend_on_the_thresholds(tmp_path):
    """Seed 003 chose thresholds from percentiles of signals measured on every frame: the same recorded
    frames give attention_drift the same distribution whatever its thresholds (a twin computes every
    frame), while what it gated on differs."""
    for i in range(2):
        record(tmp_path, f"ep{i}", 5, seed=30 + i)
    sequences = [load_sequence(f) for f in rp.locate(tmp_path)[0]]
    variants = [variant("attention_drift", drift_threshold=0.0, state_threshold=0.0, label="strict"),
                variant("attention_drift", drift_threshold=50.0, state_threshold=50.0, label="lax")]
    served, twin_of = rp.with_twins(variants)
    assert len(served) == 3 and twin_of["strict"] == twin_of["lax"]  # one twin: same non-threshold parameters
    records = rp.replay(engine(cache_model(), shadow=True), sequences, served, max_batch=4)
    strict, lax = (rp.summarize_policy(v, records[v.label], records[twin_of[v.label]]) for v in variants)
    assert strict["signals"] == lax["signals"] and strict["signals_basis"] == "every frame full"
    assert {"weighted_drift_prev", "state_drift_prev", "pixel_drift_prev_cam0"} <= set(strict["signals"])
    assert strict["reuse_rate"] < lax["reuse_rate"] and strict["signals_gated"] != lax["signals_gated"]


def test_calibration_replays_one_policy_per_threshold_and_proposes_one(tmp_path, capsys):
    """`--calibrate pixel_mae=...`: reuse falls as the threshold falls (a lower threshold forces more refreshes),
    fidelity per value, calibration.json and .png written, and --target-reuse proposes the closest value."""
    for i in range(2):
        record(tmp_path, f"ep{i}", 6, seed=40 + i)
    code = rp.run(parse([str(tmp_path), "--policy", "adaptive:window=4", "--calibrate", "pixel_mae=0,255",
                         "--target-reuse", "0.6", "--device", "cpu"]))
    assert code == 0
    stored = json.loads((tmp_path / "replay" / "calibration.json").read_text())
    table = stored["rows"]
    assert [r["value"] for r in table] == [0, 255]
    assert table[0]["reuse_rate"] == 0.0 and table[0]["cos_min"] == 1.0  # every frame full: the full path
    assert table[1]["reuse_rate"] == pytest.approx(4 / 6)  # window 4, never forced: frames 1-3 and 5 of 0-5 reused
    assert stored["proposal"]["value"] == 255 and 0 < stored["proposal"]["interpolated"] < 255
    assert (tmp_path / "replay" / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "proposed for reuse 0.6: pixel_mae=255 (reuse 67%" in capsys.readouterr().out
    assert rp.run(parse([str(tmp_path), "--policy", "adaptive:window=4", "--calibrate", "pixel_mae=0,255",
                         "--target-skipped", "0.1", "--device", "cpu"])) == 0
    proposal = json.loads((tmp_path / "replay" / "calibration.json").read_text())["proposal"]
    assert proposal["metric"] == "compute_skipped" and proposal["value"] == 0
    assert rp.run(parse([str(tmp_path), "--policy", "adaptive", "--policy", "none", "--calibrate", "pixel_mae=1,2"])) == 2
    assert rp.run(parse([str(tmp_path), "--policy", "adaptive", "--calibrate", "pixel_mae=1"])) == 2
    assert rp.run(parse([str(tmp_path), "--policy", "adaptive", "--target-reuse", "0.5"])) == 2


def test_format_table_aligns_numbers_right_and_text_left():
    out = tables.format_table(["name", "n", "rate", "note"], [["a", 3, "50%", "x"], ["long name", 12, None, ""]])
    assert out.splitlines() == [
        "name        n  rate  note",
        "-------------------------",
        "a           3   50%  x",
        "long name  12     -",
    ]
    assert tables.format_table(["a", "b"], [["1", "2"]], align="<<").splitlines()[2] == "1  2"
    assert tables.fmt(None, ".2f", "x") == "-" and tables.fmt(1.3123, ".2f", "x") == "1.31x"
    with pytest.raises(ValueError, match="row 0 has 1 cells, the table has 2 columns"):
        tables.format_table(["a", "b"], [["1"]])
    with pytest.raises(ValueError, match="align must be one '<' or '>' per column"):
        tables.format_table(["a", "b"], [["1", "2"]], align="<")


def test_sweep_table_keeps_its_columns_and_numbers():
    base = {"policy": "none", "suite": "libero_spatial", "n": 6, "successes": 3, "success_rate": 0.5,
            "wilson_low": 0.19, "wilson_high": 0.81, "errors": 0, "reuse_rate": 0.0, "cost_ms": 51.04, "hz": 19.59,
            "speedup": 1.0, "delay_steps": None, "baseline": "none", "shadow_cos_mean": None, "full_by_reason": {"first_frame": 6, "every_frame": 20}}
    cached = {**base, "policy": "fixed_window", "n": 5, "successes": 2, "success_rate": 0.4, "wilson_low": 0.12,
              "wilson_high": 0.77, "errors": 1, "reuse_rate": 0.4, "cost_ms": 38.9, "hz": 25.7, "speedup": 1.3123,
              "delay_steps": 2.5,
              "shadow_exec_mean": 0.98765, "shadow_exec_min": 0.5, "full_by_reason": {"window": 3, "first_frame": 5}, "pairs": 5,
              "base_only": 1, "variant_only": 0, "mcnemar_p": 1.0, "detectable": 0.84}
    lines = sweep_table([base, cached], "none").splitlines()
    assert lines[0].split("  ")[0] == "policy" and "vs none" in lines[0] and "full frames by reason" in lines[0]
    assert lines[2].split() == ["none", "libero_spatial", "3/6", "50%", "[19-81]", "(baseline)", "0%", "51.0",
                                "19.6", "1.00x", "-", "-", "every_frame", "20,", "first_frame", "6"]
    assert lines[3].split() == ["fixed_window", "libero_spatial", "2/5", "40%", "[12-77]", "-1/+0", "p=1.00", "d>=84", "40%",
                                "38.9", "25.7", "1.31x", "2.5", "0.988/0.500", "first_frame", "5,", "window", "3", "[1",
                                "errors]"]
    assert lines[4].startswith("vs none: -b/+c = paired episodes") and "McNemar" in lines[5]  # the legend
    assert "d>=N: the smallest success difference" in lines[5] and "Connor 1987" in lines[6]
    assert lines[7].startswith("lat ms / Hz / speedup: each frame's modelled cost")
    assert "-b/+c" not in sweep_table([base], "none")  # no pairs, no legend


def test_progress_text_fits_an_80_column_terminal():
    from libero_eval.driver import _progress_text

    counts = {"adaptive_pixel_mae6.5_window3": [1, 2], "fixed_window_window2": [0, 2], "none": [2, 2]}
    assert _progress_text(counts, 200) == "adaptive_pixel_mae6.5_window3 1/2 | fixed_window_window2 0/2 | none 2/2"
    short = _progress_text(counts, 80)
    assert short == "3/6 ok; 1/2 0/2 2/2" and len(short) <= 80 - 48


def parse(argv):
    parser = argparse.ArgumentParser()
    rp.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["replay", *argv])


def test_cli_writes_the_summary_schema(tmp_path, capsys):
    record(tmp_path, "ep0", 3)
    code = rp.run(parse([str(tmp_path), "--policy", "none", "--policy", "fixed_window:window=2",
                         "--device", "cpu", "--max-frames", "2"]))
    assert code == 0
    summary = json.loads((tmp_path / "replay" / rp.SUMMARY_FILE).read_text())
    assert set(summary) == {"model", "sequences", "policies"} and summary["sequences"] == 1
    assert summary["model"]["kind"] == "tiny" and summary["model"]["seed"] == 0
    assert [p["policy"] for p in summary["policies"]] == ["none", "fixed_window_window2"]
    for row in summary["policies"]:
        assert set(row) == {"policy", "name", "frames", "cos_mean", "cos_p5", "cos_min", "l2_mean", "reuse_rate",
                            "compute_skipped", "signals", "signals_basis", "signals_gated"}
        assert row["frames"] == 2 and row["signals_basis"] == "own decisions"  # no thresholds to lift
    assert summary["policies"][1]["reuse_rate"] == 0.5
    lines = (tmp_path / "replay" / rp.RECORDS_FILE).read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[1])["policy"] == "none"
    assert "fixed_window_window2" in capsys.readouterr().out


def test_cli_defaults_to_the_runs_own_policies_and_model(tmp_path):
    record(tmp_path, "ep0", 2)
    (tmp_path / "config.yaml").write_text("policies: [{name: hold}, {name: fixed_window, window: 2}]\n"
                                          "model: {kind: tiny, seed: 1, device: cpu}\n")
    assert rp.run(parse([str(tmp_path / "observations"), "--device", "cpu", "--out", str(tmp_path / "r")])) == 0
    summary = json.loads((tmp_path / "r" / rp.SUMMARY_FILE).read_text())
    assert [p["policy"] for p in summary["policies"]] == ["fixed_window_window2"]  # hold has no model: skipped
    assert summary["model"]["seed"] == 1 and summary["policies"][0]["reuse_rate"] == 0.5


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert rp.run(parse([str(tmp_path)])) == 2
    assert "no recorded sequences (*.npz)" in capsys.readouterr().err
    record(tmp_path, "ep0", 1)
    assert rp.run(parse([str(tmp_path), "--policy", "fixed_window:windw=2"])) == 2
    assert ("no parameter 'windw'; valid parameters: execution, fallback, latency, num_steps, rtc_horizon, "
            "rtc_jacobian, rtc_max_guidance, rtc_schedule, schedule, solver, timing, window"
            in capsys.readouterr().err)
    assert rp.run(parse([str(tmp_path), "--policy", "hold"])) == 2
    assert rp.run(parse([str(tmp_path), "--policy", "none:timing=realtime, execution=rtc"])) == 2
    assert "executes rtc: replay serves recorded frames with no realtime clock" in capsys.readouterr().err
    assert parse_policy_entry("adaptive:window=3, pixel_mae=6.5") == {"name": "adaptive", "window": 3, "pixel_mae": 6.5}


@pytest.mark.slow
def test_an_episode_records_its_observations_for_replay(spatial_env, tmp_path):
    from libero_eval.episode import EpisodeConfig, run_episode
    from libero_eval.specs import EpisodeSpec
    from policies.simple import HoldPolicy

    spec = EpisodeSpec("libero_spatial", 0, 0, "hold", 12)
    result = run_episode(spec, spatial_env, HoldPolicy(), EpisodeConfig(video="none", record_observations=True),
                         run_dir=tmp_path)
    assert result.status == "failure" and len(result.records) == 3
    seq = load_sequence(tmp_path / "observations" / f"{spec.file_stem}.npz")
    assert seq.env_steps == [0, 5, 10] and seq.seed == spec.seed
    first = seq.observations[0]
    assert first[IMAGE_KEY].shape == (224, 224, 3) and first[IMAGE_KEY].dtype == np.uint8
    assert first["prompt"] == spatial_env.task.language and first[STATE_KEY].shape == (8,)
    assert [p.name for p in (tmp_path / "observations").iterdir()] == [f"{spec.file_stem}.npz"]  # no temp left
