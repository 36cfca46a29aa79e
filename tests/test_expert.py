"""The scripted expert: privileged state, a real full-protocol episode that succeeds, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from libero_eval.episode import EpisodeConfig, run_episode
from libero_eval.specs import EpisodeSpec
from policies.serving.engine import make_model_free
from policies.serving.variants import PolicyVariant, VariantError
from policies.expert import ExpertError, ExpertPolicy
from policies.expert.geometry import rot_z, rotation_error
from tasks import protocol, registry


def _spec(trial: int, max_steps: int | None = None) -> EpisodeSpec:
    suite, task = "libero_spatial", 0
    return EpisodeSpec(suite=suite, task_id=task, trial=trial, policy_label="expert",
                       max_steps=max_steps or registry.MAX_STEPS[suite])


@pytest.mark.slow
def test_privileged_state_describes_the_goal_and_objects(spatial_env):
    spatial_env.reset(0, registry.init_state("libero_spatial", 0, 0), trial=0)
    priv = spatial_env.privileged()
    assert priv["goal"] == [["on", "akita_black_bowl_1", "plate_1"]]
    bowl = priv["objects"]["akita_black_bowl_1"]
    lo, hi, pos = (np.asarray(bowl[k]) for k in ("aabb_min", "aabb_max", "pos"))
    assert np.all(lo < hi) and np.all(lo[:2] <= pos[:2]) and np.all(pos[:2] <= hi[:2])
    width = hi[:2] - lo[:2]
    assert np.all((0.08 < width) & (width < 0.2)), f"a LIBERO bowl is ~13 cm wide, got {width}"
    mat = np.asarray(priv["eef_mat"])
    np.testing.assert_allclose(mat @ mat.T, np.eye(3), atol=1e-6)
    assert len(priv["gripper_qpos"]) == 2


@pytest.mark.slow
def test_expert_solves_a_full_protocol_episode_without_rendering(spatial_env, tmp_path):
    result = run_episode(_spec(3), spatial_env, ExpertPolicy(), EpisodeConfig(video="none"), tmp_path)
    assert result.status == "success", (result.reason, result.error)
    assert result.steps < registry.MAX_STEPS["libero_spatial"]
    # one query per step, each an expert decision labelled with its phase
    assert len(result.records) == result.steps
    assert {r["decision"] for r in result.records} == {"expert"}
    phases = list(dict.fromkeys(r["reason"] for r in result.records))
    assert phases[:5] == ["hover", "descend", "close", "lift", "carry"]
    # the expert never reads images: no camera was rendered during the episode
    assert result.env_stats["renders"] == 0


@pytest.mark.slow
def test_expert_video_renders_every_replan_steps_only_and_its_hud_says_what_happened(spatial_env, tmp_path):
    """Frames at the query-mode steps 0, 5, 10, the scene at the last step (12) and a one-second closing
    card; the loop renders two cameras per query frame, none for the other steps. The decoded video's HUD strip and closing card
    match reference renderings of the same text within the codec's tolerance (and not of other text)."""
    import imageio.v2 as imageio  # the decoder: only this test reads a video back

    from libero_eval.episode import closing_lines, hud_lines
    from tasks.video import HUD_HEIGHT, closing_card, hud_frame

    settings = EpisodeConfig(video="query", replan_steps=5, video_fps=10)
    spec = _spec(0, max_steps=12)
    result = run_episode(spec, spatial_env, ExpertPolicy(), settings, tmp_path)
    assert result.status == "failure" and result.reason == "max_steps"
    assert result.video_frames == 3 + 1 + 10
    assert result.env_stats["renders"] == 3 * 2  # the loop's; the last step's scene renders like a reset does
    frames = [np.asarray(f, dtype=np.float32) for f in imageio.get_reader(str(tmp_path / result.video))]
    assert len(frames) == 14
    height, width = frames[0].shape[:2]

    def strip(lines):  # a reference HUD strip under blank images: the strip does not depend on them
        blank = np.zeros((height - HUD_HEIGHT, width, 3), dtype=np.uint8)
        return hud_frame([blank], lines, result.records[5]["decision"])[-HUD_HEIGHT:].astype(np.float32)

    lines = hud_lines(spec, result.records[5], 5, realtime=False)  # frame 1: step 5, after query 5
    assert lines[1] == "expert" and lines[0].startswith("step 5  q5 EXPERT")
    def off(a, b):  # share of pixels off by more than a codec's error: text that differs, not compression
        return float((np.abs(a - b) > 96).mean())

    decoded = frames[1][-HUD_HEIGHT:]
    other = strip(hud_lines(spec, result.records[6], 6, realtime=False))  # "step 6  q6": two characters apart
    assert off(decoded, strip(lines)) < 0.002 and 4 * off(decoded, strip(lines)) < off(decoded, other)
    card = closing_card(width, height, "failure", closing_lines(spec, spatial_env.task, "failure", "max_steps", 12))
    wrong = closing_card(width, height, "success", closing_lines(spec, spatial_env.task, "success", "done", 12))
    assert off(frames[-1], card) < 0.002 and 4 * off(frames[-1], card) < off(frames[-1], wrong)


def test_expert_needs_privileged_state():
    with pytest.raises(ExpertError, match="privileged"):
        ExpertPolicy().infer({"observation/state": np.zeros(8, np.float32), "prompt": "x"})


def test_expert_refuses_goals_it_does_not_handle():
    priv = {"goal": [["open", "wooden_cabinet_1_top_region"]], "objects": {}, "sites": {},
            "eef_pos": [0, 0, 1], "eef_mat": np.eye(3).tolist(), "gripper_qpos": [0.04, -0.04]}
    with pytest.raises(ExpertError, match="one \\(on obj target\\)"):
        ExpertPolicy().infer({"privileged": priv})


def test_rotation_error_is_the_axis_angle_between_frames():
    r0 = np.diag([1.0, -1.0, -1.0])  # gripper pointing down
    np.testing.assert_allclose(rotation_error(rot_z(0.3) @ r0, r0), [0, 0, 0.3], atol=1e-9)
    np.testing.assert_allclose(rotation_error(r0, r0), 0, atol=1e-12)


def _drive(env, policy, trial: int) -> tuple[bool, list[str], np.ndarray]:
    """(done, phase per step, actions [T, 7]) of the expert driving `env` from the protocol's start."""
    env.reset(0, registry.init_state("libero_spatial", 0, trial), trial=trial)
    for _ in range(protocol.NUM_STEPS_WAIT):
        env.step(protocol.DUMMY_ACTION)
    policy.reset("t", 0)
    phases, actions, done = [], [], False
    for _ in range(registry.MAX_STEPS["libero_spatial"]):
        action = policy.infer({"privileged": env.privileged()}).actions[0]
        phases.append(policy.phase)
        actions.append(action)
        _, done = env.step(action)
        if done:
            break
    return done, phases, np.asarray(actions)


@pytest.mark.slow
def test_funnel_expert_succeeds_with_continuous_approaches(spatial_env):
    # gated: it waits at the hover point, then the descend label jumps; funnel: it lowers while aligning,
    # so the z action is continuous where hover hands over to descend (what a policy imitating it sees)
    jumps = {}
    for funnel in (0.0, 2.0):
        done, phases, actions = _drive(spatial_env, ExpertPolicy(place_tol=0.03, funnel=funnel), 3)
        assert done, f"funnel={funnel}: the expert did not solve the episode"
        switch = phases.index("descend") + 1  # the first action computed in the descend phase
        jumps[funnel] = abs(actions[switch, 2] - actions[switch - 1, 2])
        if funnel:  # it was already descending fast while still aligning
            assert actions[:switch, 2].min() < -0.3
    assert jumps[0.0] > 0.3 and jumps[2.0] < 0.15, jumps


def expert(**params) -> ExpertPolicy:
    return make_model_free(PolicyVariant.make("expert", "expert", params))


def test_expert_variant_validation_and_inputs():
    assert expert(gain=10.0).params.gain == 10.0
    with pytest.raises(VariantError, match="has no parameter 'window'"):
        PolicyVariant.make("expert", "expert", {"window": 2})
    with pytest.raises(VariantError, match="gain must be > 0"):
        PolicyVariant.make("expert", "expert", {"gain": -1.0})
    v = PolicyVariant.make("expert", "expert")
    assert (v.needs_images, v.needs_privileged) == (False, True)  # read from ExpertPolicy's declaration
    none = PolicyVariant.make("none", "none")
    assert (none.needs_images, none.needs_privileged) == (True, False)
    assert isinstance(expert(), ExpertPolicy)
    assert expert(place_tol=0.03).params.place_tol == 0.03  # record-demos --place-tolerance
    with pytest.raises(VariantError, match="place_tol must be > 0"):
        PolicyVariant.make("expert", "expert", {"place_tol": 0.0})
    assert expert(funnel=2.0).params.funnel == 2.0  # record-demos --funnel
    with pytest.raises(VariantError, match="funnel must be >= 0"):
        PolicyVariant.make("expert", "expert", {"funnel": -1.0})
