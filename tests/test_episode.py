"""The episode loop on a real env: success detection, outcomes, result lines and videos."""
import hashlib
import json

import numpy as np
import pytest

from libero_eval.episode import EpisodeConfig, run_episode
from libero_eval.specs import EpisodeSpec
from policies.simple import HoldPolicy
from tests.helpers import CrashingPolicy, ScriptedPolicy, place_on, set_joint_to_limit

pytestmark = pytest.mark.slow


def _frames(path):
    import imageio.v2 as imageio

    with imageio.get_reader(str(path)) as reader:
        return [f for f in reader]


def test_teleported_bowl_on_plate_is_a_success(spatial_env):
    hold = np.tile(np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float32), (40, 1))
    policy = ScriptedPolicy(hold, on_query=lambda i: place_on(spatial_env, "akita_black_bowl_1", "plate_1") if i == 0 else None)
    result = run_episode(EpisodeSpec("libero_spatial", 0, 0, "scripted", 20), spatial_env, policy,
                         EpisodeConfig(video="none"))
    assert result.status == "success" and result.success and result.reason == "done"
    assert 0 < result.steps <= 5  # the bowl settles within a few steps


def test_untouched_scene_is_a_failure_at_max_steps(spatial_env):
    result = run_episode(EpisodeSpec("libero_spatial", 0, 1, "hold", 15), spatial_env, HoldPolicy(),
                         EpisodeConfig(video="none"))
    assert result.status == "failure" and not result.success and result.reason == "max_steps"
    assert result.steps == 15 and result.error is None
    assert [r["env_step"] for r in result.records] == [0, 5, 10]  # replan every 5 actions


def test_drawer_opened_through_the_sim_state_is_a_success():
    from tasks import registry
    from tasks.env import LiberoEnv

    with LiberoEnv(registry.get_task("libero_goal", 0)) as env:  # "open the middle drawer of the cabinet"
        policy = ScriptedPolicy(np.zeros((40, 7)), on_query=lambda i: set_joint_to_limit(
            env, "wooden_cabinet_1_middle_level", 0) if i == 0 else None)
        result = run_episode(EpisodeSpec("libero_goal", 0, 0, "scripted", 10), env, policy, EpisodeConfig(video="none"))
    assert result.success and result.steps == 1


def test_simulator_exception_is_a_failure_not_an_error(spatial_env, monkeypatch):
    calls = {"n": 0}
    real_step = spatial_env._env.step

    def exploding_step(action):
        calls["n"] += 1
        if calls["n"] == 13:  # 10 settle steps, then the policy's third action
            raise RuntimeError("MuJoCo Warning: Nan, Inf or huge value in QACC at DOF 0")
        return real_step(action)

    monkeypatch.setattr(spatial_env._env, "step", exploding_step)
    result = run_episode(EpisodeSpec("libero_spatial", 0, 2, "hold", 20), spatial_env, HoldPolicy(),
                         EpisodeConfig(video="none"))
    assert result.status == "failure" and result.reason == "env_exception" and result.steps == 3
    assert result.error.startswith("RuntimeError: MuJoCo Warning: Nan")


def test_policy_crash_is_an_error_not_a_failure(spatial_env, tmp_path):
    """Also with a video on: the crash comes before the first frame, so no video exists and none is named."""
    result = run_episode(EpisodeSpec("libero_spatial", 0, 3, "crashing", 20), spatial_env, CrashingPolicy(),
                         EpisodeConfig(video="query"), run_dir=tmp_path)
    assert result.status == "error" and result.reason == "policy_error" and not result.success
    assert result.error.startswith("RuntimeError: deliberate policy crash")
    assert (result.video, result.video_frames) == (None, 0)
    assert not list((tmp_path / "videos").iterdir())


def test_every_step_video_has_one_frame_per_step(spatial_env, tmp_path):
    result = run_episode(EpisodeSpec("libero_spatial", 0, 4, "hold", 7), spatial_env, HoldPolicy(),
                         EpisodeConfig(video="every_step", video_wrist=False), run_dir=tmp_path)
    frames = _frames(tmp_path / result.video)
    assert result.video_frames == 7 + 1 + 10 and len(frames) == 18  # + the last step's scene, a 1-s closing card
    assert frames[0].shape == (224 + 48, 224, 3)


def test_cli_run_writes_results_and_videos_and_resumes(tmp_path, capsys):
    from libero_eval import cli

    out = tmp_path / "run"
    assert cli.main(["run", "--suite", "libero_spatial", "--tasks", "0", "--trials", "1", "--max-steps", "12",
                     "--out", str(out)]) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1
    first = json.loads(lines[0])
    assert first["key"] == "hold/libero_spatial/task00/trial00" and first["status"] == "failure"
    video = out / first["video"]
    frames = _frames(video)
    assert len(frames) == first["video_frames"] == 3 + 1 + 10  # queries at 0, 5, 10; step 12; the closing card
    assert frames[0].shape == (272, 448, 3)  # agentview | wrist above the HUD strip
    digest = hashlib.sha256(video.read_bytes()).hexdigest()
    assert "0/1" in capsys.readouterr().out

    # Second run: one more trial in the same directory. Trial 0 is resumed (not rerun), its video untouched.
    assert cli.main(["run", "--suite", "libero_spatial", "--tasks", "0", "--trials", "2", "--max-steps", "12",
                     "--out", str(out)]) == 0
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [l["trial"] for l in lines] == [0, 1]
    assert hashlib.sha256(video.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in (out / "videos").iterdir()) == [
        "hold__libero_spatial__task00__trial00.mp4", "hold__libero_spatial__task00__trial01.mp4"]
    assert "resuming" in capsys.readouterr().out


class _MispricedRTC(ScriptedPolicy):
    """Says its chunks were guided for a delay of 2 steps while the episode's clock delivers them at once:
    what a policy actor pricing frames differently from the worker would look like."""

    def infer(self, observation):
        chunk = super().infer(observation)
        chunk.record.extra["rtc"] = {"guided": False, "delay_steps": 2, "leftover": 0, "guided_actions": 0}
        return chunk


def test_an_rtc_delay_the_worker_does_not_apply_ends_the_episode_as_an_internal_error(spatial_env):
    from policies.serving.variants import ExecutionSettings

    result = run_episode(EpisodeSpec("libero_spatial", 0, 0, "rtc", 20), spatial_env,
                         _MispricedRTC(np.zeros((40, 7), np.float32)), EpisodeConfig(video="none"),
                         execution=ExecutionSettings(timing="realtime"))
    assert (result.status, result.reason) == ("error", "internal_error")
    assert "guided query 0 for a delay of 2 steps but its chunk arrives 0 steps late" in result.error


def test_closing_frames_that_fail_leave_the_result_and_the_video(spatial_env, tmp_path, monkeypatch):
    def broken(state):
        raise RuntimeError("render failed")

    monkeypatch.setattr(spatial_env, "observe_state", broken)
    result = run_episode(EpisodeSpec("libero_spatial", 0, 4, "hold", 7), spatial_env, HoldPolicy(),
                         EpisodeConfig(video="query", video_wrist=False), run_dir=tmp_path)
    assert (result.status, result.reason) == ("failure", "max_steps")
    assert result.video is not None and len(_frames(tmp_path / result.video)) == result.video_frames == 2
