"""Chunk execution (sync / realtime) and frame prices, step by step, without an env."""
import numpy as np
import pytest

from libero_eval.config import ConfigError, load_config
from libero_eval.execution import ChunkExecutor, frame_cost_us, load_named_profile
from libero_eval.sweep_summary import pick_baseline, pick_baselines
from policies.serving.latency import LatencyError, LatencyProfile, delay_steps
from policies.serving.variants import ExecutionSettings

THOR = load_named_profile("thor_trt_fp8")
FULL = {"vision_images": 3, "prefix_token_layers": 900, "prefix_token_layers_full": 900, "velocity_evals": 10}
REUSE = {"vision_images": 0, "prefix_token_layers": 0, "prefix_token_layers_full": 900, "velocity_evals": 10}


def chunk(tag: int, n: int = 10, gripper: float = 1.0) -> np.ndarray:
    """Actions whose x component says (chunk tag, index): 10 * tag + index."""
    a = np.zeros((n, 7), dtype=np.float32)
    a[:, 0] = 10 * tag + np.arange(n)
    a[:, 6] = gripper
    return a


def run(executor: ChunkExecutor, steps: int, costs_us: list[int]) -> tuple[list[str], list[dict]]:
    """Drive the executor like the episode loop; returns what ran per step ("c.i" or "hold"/"last")."""
    ran, records, tag = [], [], 0
    for step in range(steps):
        if executor.query_due(step):
            record = {}
            executor.issue(step, chunk(tag + 1), costs_us[tag], record)
            records.append(record)
            tag += 1
        action, fallback = executor.action(step)
        ran.append(("fallback" if fallback else f"{int(action[0]) // 10}.{int(action[0]) % 10}"))
    return ran, records


def test_thor_profile_prices_full_and_reuse_frames_as_the_seed_says():
    assert THOR.cost_us(FULL) == 174_000 and THOR.frame_ms(10) == 174.0  # 17 + 52 + 10 x 10.2 + 3
    assert THOR.cost_us(REUSE) == 105_000  # the denoising loop and the overhead only
    half = dict(FULL, prefix_token_layers=450)
    assert THOR.cost_us(half) == 148_000  # a partial pass pays its share of the prefix
    assert delay_steps(174_000, 20) == 4 and delay_steps(105_000, 20) == 3
    assert THOR.cost_us(None) == 0  # a model-free frame (hold, the expert) costs nothing


def test_delays_are_exact_integer_ceilings():
    assert delay_steps(0, 20) == 0
    assert delay_steps(50_000, 20) == 1 and delay_steps(50_001, 20) == 2
    assert delay_steps(150_000, 20) == 3  # 0.15 x 20 = 3.0000000000000004 in floats: still 3
    assert delay_steps(100_000, 30) == 3  # a period that is not a whole number of microseconds


def test_measured_latency_is_the_actors_wall_time():
    assert frame_cost_us({"latency_ms": {"total": 51.2345}}, "measured") == 51_234
    assert frame_cost_us({"extra": {"compute": FULL}}, THOR) == 174_000


def test_sync_runs_the_first_replan_steps_of_each_chunk():
    ran, records = run(ChunkExecutor(ExecutionSettings(), 5), 12, [174_000] * 3)
    assert ran == ["1.0", "1.1", "1.2", "1.3", "1.4", "2.0", "2.1", "2.2", "2.3", "2.4", "3.0", "3.1"]
    assert [r["delay_steps"] for r in records] == [0, 0, 0]


def test_realtime_executes_late_chunks_from_their_delay_and_waits_on_the_fallback_first():
    ex = ChunkExecutor(ExecutionSettings(timing="realtime"), 5)
    ran, records = run(ex, 14, [120_000, 120_000, 120_000])  # 3 steps late each
    # query 1 at step 0 arrives at 3 (run from index 3); query 2 at step 5 arrives at 8: meanwhile chunk 1
    # runs on past its replan point (indices 5-7); query 3 at step 10 arrives at 13
    assert ran == ["fallback"] * 3 + ["1.3", "1.4", "1.5", "1.6", "1.7", "2.3", "2.4", "2.5", "2.6", "2.7", "3.3"]
    assert [r["delay_steps"] for r in records] == [3, 3, 3]
    assert [r["fallback_actions"] for r in records] == [3, 0, 0]


def test_a_delay_longer_than_replan_steps_delays_the_next_query():
    ex = ChunkExecutor(ExecutionSettings(timing="realtime"), 5)
    ran, records = run(ex, 16, [310_000, 310_000, 310_000])  # 7 steps late: query 2 waits for chunk 1
    assert ran[:7] == ["fallback"] * 7 and ran[7:10] == ["1.7", "1.8", "1.9"]
    assert ran[10:14] == ["fallback"] * 4 and ran[14] == "2.7"  # chunk 1 ran out before chunk 2 came
    assert [r["fallback_actions"] for r in records[:2]] == [7, 4]


def test_a_zero_delay_realtime_loop_is_the_synchronous_one():
    sync, _ = run(ChunkExecutor(ExecutionSettings(), 5), 20, [0] * 4)
    realtime, _ = run(ChunkExecutor(ExecutionSettings(timing="realtime"), 5), 20, [0] * 4)
    assert sync == realtime


def test_hold_keeps_the_last_gripper_command_and_repeat_last_repeats_the_action():
    for fallback in ("hold", "repeat_last"):
        ex = ChunkExecutor(ExecutionSettings(timing="realtime", fallback=fallback), 5)
        first, is_fallback = ex.action(0)
        np.testing.assert_array_equal(first, [0, 0, 0, 0, 0, 0, -1])  # nothing ran yet: still, gripper open
        assert is_fallback
        ex.issue(1, chunk(1, n=2, gripper=1.0), 0, {})
        ex.action(1), ex.action(2)
        action, is_fallback = ex.action(3)  # the 2-action chunk ran out
        assert is_fallback
        expected = [0, 0, 0, 0, 0, 0, 1] if fallback == "hold" else chunk(1, n=2)[1]
        np.testing.assert_array_equal(action, expected)


def test_latency_profiles_and_execution_axes_are_validated_at_load():
    with pytest.raises(LatencyError, match="vision_ms must be a time in ms >= 0"):
        LatencyProfile(name="x", vision_ms=-1, prefix_ms=1, velocity_eval_ms=1)
    with pytest.raises(LatencyError, match=r"missing keys \['prefix_ms'\]"):
        LatencyProfile.from_dict({"name": "x", "vision_ms": 1, "velocity_eval_ms": 1})
    with pytest.raises(ConfigError, match="unknown latency model 'thor'.*thor_trt_fp8"):
        load_config(None, ["latency=thor"])
    with pytest.raises(ConfigError, match=r"policies\[0\]: policy 'none_timingasync': timing: expected one of sync, realtime, got 'async'"):
        load_config(None, ["policies=[{name: none, timing: async}]"])
    with pytest.raises(ConfigError, match="episode.timing: expected one of sync, realtime"):
        load_config(None, ["episode.timing=async"])
    config = load_config(None, ["latency=thor_trt_fp8", "policies=[{name: none, timing: [sync, realtime]}, {name: hold}]"])
    variants = config.variants()
    assert [(v.label, v.execution.timing, v.execution.latency) for v in variants] == [
        ("none_timingsync", "sync", "thor_trt_fp8"), ("none_timingrealtime", "realtime", "thor_trt_fp8"),
        ("hold", "sync", "thor_trt_fp8")]


def test_the_readme_timeline_is_what_the_executor_does():
    """README "Speed": Thor profile, replan 5, queries full / reuse / full."""
    ran, records = run(ChunkExecutor(ExecutionSettings(timing="realtime"), 5), 15,
                       [THOR.cost_us(FULL), THOR.cost_us(REUSE), THOR.cost_us(FULL)])
    assert ran == ["fallback"] * 4 + ["1.4", "1.5", "1.6", "1.7", "2.3", "2.4", "2.5", "2.6", "2.7", "2.8", "3.4"]
    assert [r["delay_steps"] for r in records] == [4, 3, 4]


def test_results_from_before_per_frame_costs_show_latency_as_unknown():
    from libero_eval.specs import EpisodeResult
    from libero_eval.sweep_summary import format_table, pick_baselines, policy_rows

    def result(label: str, name: str, with_cost: bool) -> EpisodeResult:
        records = [{"index": i, "decision": "full", "reason": "x", "latency_ms": {"total": 50.0},
                    **({"cost_ms": 174.0, "delay_steps": 0} if with_cost else {})} for i in range(3)]
        return EpisodeResult(key=f"{label}/k", suite="libero_spatial", task_id=0, task_name="t", trial=0,
                             policy_label=label, seed=1, status="failure", success=False, reason="max_steps",
                             steps=15, wall_s=1.0, records=records, policy={"label": label, "name": name})

    old = [result("none", "none", False), result("fixed_window", "fixed_window", False)]
    rows = policy_rows(old, pick_baselines({"none": {"name": "none"}, "fixed_window": {"name": "fixed_window"}}))
    assert [(r["cost_ms"], r["hz"], r["speedup"], r["wall_ms"]) for r in rows] == [(None, None, None, 50.0)] * 2
    table = format_table(rows, "none").splitlines()
    assert table[2].split()[6:10] == ["0%", "-", "-", "-"]  # reuse, lat ms, Hz, speedup
    mixed = [result("none", "none", True), result("fixed_window", "fixed_window", False)]
    assert [r["speedup"] for r in policy_rows(mixed, "none")] == [1.0, None]


def test_the_baseline_is_the_none_at_the_checkpoints_denoising_not_a_denoising_candidate():
    """`none` with num_steps / solver (seed 004's candidates, e.g. euler5 and heun5) is compared against the
    plain `none`, whatever the label order."""
    variants = {"euler5": {"name": "none", "num_steps": 5}, "heun5": {"name": "none", "num_steps": 5, "solver": "heun"},
                "none": {"name": "none"}, "fw2": {"name": "fixed_window", "window": 2}}
    names = {k: v["name"] for k, v in variants.items()}
    assert pick_baseline(sorted(variants), names) == "euler5"  # by name alone: the first `none`
    assert pick_baseline(sorted(variants), names, variants) == "none"
    assert set(pick_baselines(variants).values()) == {"none"}
    assert pick_baseline(["euler5"], names, variants) == "euler5"  # no plain one: a candidate still pairs
