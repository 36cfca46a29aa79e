"""Demo recording: the expert pass, the re-rendered observations (equal to the closed loop's), the format,
resume and argument errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from libero_eval.learning import commands, demos
from libero_eval.learning.dataset import DATASET_FILE
from libero_eval.learning.demos import DemoError, DemoSettings, record_chunk
from libero_eval.seeding import episode_seed
from policies.pi05.processing import fit_image
from tasks import protocol, registry


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Records one real episode (a camera-less and a rendering LIBERO env): for slow tests only."""
    out = tmp_path_factory.mktemp("demos")
    settings = DemoSettings(tasks={"libero_spatial": [0]}, trials=[2], held_out=[], image_size=112, every=25)
    rows = record_chunk("libero_spatial", 0, [2], settings.to_dict(), str(out))
    return out, rows


@pytest.fixture(scope="module")
def recorded_dart(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos_dart")
    settings = DemoSettings(tasks={"libero_spatial": [0]}, trials=[3], held_out=[], image_size=112, every=50,
                            noise=0.5)
    rows = record_chunk("libero_spatial", 0, [3], settings.to_dict(), str(out))
    return out, rows


@pytest.mark.slow
def test_recorded_episode_has_the_documented_arrays(recorded):
    out, rows = recorded
    (row,) = rows
    assert row["success"] and row["split"] == "train" and row["file"] == "libero_spatial/task00/trial02.npz"
    assert row["replay_drift"] == 0.0  # the rendering replay retraced the expert pass exactly
    with np.load(out / row["file"]) as z:
        t = row["steps"]
        assert z["actions"].shape == (t, 7) and z["actions"].dtype == np.float32
        assert z["sim_states"].shape[0] == t + 1
        np.testing.assert_array_equal(z["frame_steps"], np.arange(0, t, 25))
        f = len(z["frame_steps"])
        assert row["frames"] == f
        assert z["images"].shape == z["wrist_images"].shape == (f, 112, 112, 3)
        assert z["images"].dtype == np.uint8 and z["images"].std() > 10  # a real scene, not a blank frame
        assert z["states"].shape == (f, 8)
        assert str(z["prompt"]) == registry.get_task("libero_spatial", 0).language
        np.testing.assert_array_equal(z["labels"], z["actions"])  # no perturbation: the labels are what ran


@pytest.mark.slow
def test_dart_episode_runs_perturbed_actions_and_labels_the_experts(recorded_dart):
    """With --noise the executed actions differ from the expert's labels in bursts; the replay of the
    executed actions still retraces the expert pass exactly, so images and labels belong together."""
    out, (row,) = recorded_dart
    assert row["success"] and row["replay_drift"] == 0.0
    with np.load(out / row["file"]) as z:
        diff = np.abs(z["actions"] - z["labels"])
    assert diff[:, :3].max() > 0.1  # perturbed ...
    assert (diff[:, :3].max(axis=1) == 0).mean() > 0.3  # ... in bursts, with calm (and grasping) in between
    np.testing.assert_array_equal(diff[:, 6], 0.0)  # never the gripper


@pytest.mark.slow  # record_chunk creates the camera-less LIBERO env even with both passes faked
def test_an_episode_whose_replay_drifts_is_listed_but_not_kept(tmp_path, monkeypatch):
    """Images must show the states the labels were computed on: a replay that parts from the expert pass
    (a contact amplifying a rounding difference) drops the episode, with the reason in the manifest."""
    def fake_expert_pass(env, policy, init_state, max_steps, noise=None):
        acts = np.zeros((4, 7), np.float32)
        return True, acts, acts, np.zeros((5, 3))

    def fake_render_pass(env, seed, init_state, actions, sim_states, every, size):
        return {}, 0.25

    monkeypatch.setattr(demos, "_expert_pass", fake_expert_pass)
    monkeypatch.setattr(demos, "_render_pass", fake_render_pass)
    settings = DemoSettings(tasks={"libero_spatial": [0]}, trials=[0], held_out=[], every=2)
    (row,) = record_chunk("libero_spatial", 0, [0], settings.to_dict(), str(tmp_path))
    assert row["success"] and row["file"] is None and row["replay_drift"] == 0.25
    assert "replay drifted 0.25" in row["dropped"]
    assert not list(tmp_path.rglob("*.npz"))
    assert demos.summarize([row]).splitlines()[1].split()[3:5] == ["1", "0"]  # 1 episode, 0 kept


def test_dart_noise_is_seeded_bursty_and_limited_to_free_space_phases():
    a = demos.OUNoise(0.5, 5.0, np.random.default_rng([1, 7]))
    b = demos.OUNoise(0.5, 5.0, np.random.default_rng([1, 7]))
    seq_a = np.array([a("hover") for _ in range(400)])
    np.testing.assert_array_equal(seq_a, [b("hover") for _ in range(400)])
    on = np.abs(seq_a).max(axis=1) > 0
    assert 0.15 < on.mean() < 0.6  # bursts of ~10 steps, calm of ~20
    assert seq_a[on, :3].std() == pytest.approx(0.5, rel=0.35)
    np.testing.assert_array_equal(seq_a[:, 6], 0.0)
    assert all(not np.any(a(phase)) for phase in ("descend", "close", "lower", "release", "retreat") for _ in range(50))


@pytest.mark.slow
def test_rerendered_observations_equal_the_closed_loop_ones(recorded, spatial_env):
    """Replaying the demo's actions in the closed-loop env (hard reset, lazy rendering) reaches the recorded
    states and renders the images the dataset stores."""
    out, (row,) = recorded
    with np.load(out / row["file"]) as z:
        actions, frame_steps, images, wrist, states = (z[k] for k in ("actions", "frame_steps", "images",
                                                                        "wrist_images", "states"))
    env = spatial_env
    env.reset(episode_seed("libero_spatial", 0, 2), registry.init_state("libero_spatial", 0, 2), trial=2)
    env.expect_observation(protocol.NUM_STEPS_WAIT)
    for _ in range(protocol.NUM_STEPS_WAIT):
        raw, _ = env.step(protocol.DUMMY_ACTION)
    frames = list(frame_steps)
    checked = 0
    for t in range(len(actions)):
        if t in frames:
            i = frames.index(t)
            np.testing.assert_array_equal(fit_image(protocol.model_image(raw[protocol.AGENTVIEW]), 112), images[i])
            np.testing.assert_array_equal(fit_image(protocol.model_image(raw[protocol.WRIST]), 112), wrist[i])
            np.testing.assert_allclose(protocol.state_vector(raw), states[i], atol=1e-6)
            checked += 1
            if i + 1 < len(frames):
                env.expect_observation(frames[i + 1] - t)
        raw, done = env.step(actions[t])
    assert checked == len(frames) and done


def test_resume_plans_only_missing_episodes():
    settings = DemoSettings(tasks={"libero_spatial": [0, 1]}, trials=list(range(5)), held_out=[4])
    done = {("libero_spatial", 0, k) for k in range(5)} | {("libero_spatial", 1, 0)}
    units = list(demos.plan(settings, done, chunk=3))
    assert units == [("libero_spatial", 1, [1, 2, 3]), ("libero_spatial", 1, [4])]
    assert settings.split(4) == "held_out" and settings.split(0) == "train"


def test_a_dataset_refuses_other_recording_settings(tmp_path):
    a = DemoSettings(tasks={"libero_spatial": [0]}, trials=[0, 1], held_out=[1], image_size=112)
    demos._prepare_out(tmp_path, a)
    b = DemoSettings(tasks={"libero_spatial": [1]}, trials=[2], held_out=[], image_size=112)
    demos._prepare_out(tmp_path, b)  # extending with other tasks/trials is fine
    meta = json.loads((tmp_path / DATASET_FILE).read_text())
    assert meta["tasks"] == {"libero_spatial": [0, 1]} and meta["trials"] == [0, 1, 2]
    with pytest.raises(DemoError, match="image_size: recorded 112, now 64"):
        demos._prepare_out(tmp_path, DemoSettings(tasks={"libero_spatial": [0]}, trials=[0], held_out=[],
                                                  image_size=64))
    with pytest.raises(DemoError, match="place_tolerance: recorded 0.01, now 0.03"):
        demos._prepare_out(tmp_path, DemoSettings(tasks={"libero_spatial": [0]}, trials=[0], held_out=[],
                                                  place_tolerance=0.03))
    with pytest.raises(DemoError, match="noise: recorded 0.0, now 0.5"):
        demos._prepare_out(tmp_path, DemoSettings(tasks={"libero_spatial": [0]}, trials=[0], held_out=[], noise=0.5))
    with pytest.raises(DemoError, match="funnel: recorded 0.0, now 2.0"):
        demos._prepare_out(tmp_path, DemoSettings(tasks={"libero_spatial": [0]}, trials=[0], held_out=[], funnel=2.0))
    with pytest.raises(DemoError, match="noise_seed: recorded 7, now 8"):
        demos._prepare_out(tmp_path, DemoSettings(tasks={"libero_spatial": [0]}, trials=[0], held_out=[],
                                                  noise_seed=8))


def test_bad_recording_arguments_fail_early():
    with pytest.raises(DemoError, match="noise must be in \\[0, 1\\]"):
        DemoSettings(tasks={"libero_spatial": [0]}, trials=[0], held_out=[], noise=2.0)
    with pytest.raises(DemoError, match="place_tolerance must be in"):
        DemoSettings(tasks={"libero_spatial": [0]}, trials=[0], held_out=[], place_tolerance=0.5)
    with pytest.raises(DemoError, match="funnel must be in \\[0, 20\\]"):
        DemoSettings(tasks={"libero_spatial": [0]}, trials=[0], held_out=[], funnel=-1.0)
    with pytest.raises(DemoError, match="noise_seed must be >= 0, got -1"):
        DemoSettings(tasks={"libero_spatial": [0]}, trials=[0], held_out=[], noise_seed=-1)
    with pytest.raises(DemoError, match="held-out trials \\[7\\] are not among"):
        DemoSettings(tasks={"libero_spatial": [0]}, trials=[0, 1], held_out=[7])
    with pytest.raises(ValueError, match="libero_nope"):
        DemoSettings(tasks={"libero_nope": [0]}, trials=[0], held_out=[])
    assert commands._parse_tasks("libero_spatial:0,1,libero_object:5") == {"libero_spatial": [0, 1], "libero_object": [5]}
