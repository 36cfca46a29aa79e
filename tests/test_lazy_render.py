"""Lazy rendering is exact: on every query step the lazy env's images are pixel-identical to robosuite's
stock env rendering every step (same seed, init state, actions), and states and done flags are identical."""
import contextlib
import io

import numpy as np
import pytest

from tasks import protocol, registry
from tasks.env import CAMERAS, EnvConfig, LiberoEnv, _replay_clock
from tests.helpers import random_actions

pytestmark = pytest.mark.slow

STEPS = 62  # policy actions after the settle steps
REPLAN = 5
STATE_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "robot0_joint_pos")


def _stock_env(task):
    with contextlib.redirect_stdout(io.StringIO()):
        from libero.libero.envs import OffScreenRenderEnv

        return OffScreenRenderEnv(bddl_file_name=task.bddl_path, camera_heights=256, camera_widths=256)


@pytest.mark.parametrize("suite, task_id, seed", [("libero_spatial", 1, 11), ("libero_object", 2, 12)])
def test_lazy_env_matches_stock_env_on_every_query_step(suite, task_id, seed):
    task = registry.get_task(suite, task_id)
    init = registry.init_state(suite, task_id, 3)
    actions = np.concatenate([np.tile(protocol.DUMMY_ACTION, (protocol.NUM_STEPS_WAIT, 1)), random_actions(STEPS, seed)])
    query_steps = set(range(protocol.NUM_STEPS_WAIT, len(actions) + 1, REPLAN))  # obs read after these steps

    stock = _stock_env(task)
    try:
        stock.seed(seed)
        stock.reset()
        stock.set_init_state(init)
        reference = []
        for a in actions:
            raw, _, done, _ = stock.step(a)
            reference.append(({k: np.array(raw[k]) for k in (*STATE_KEYS, protocol.AGENTVIEW, protocol.WRIST)}, done))
    finally:
        stock.close()

    with LiberoEnv(task, EnvConfig(lazy_render=True, seeding="per_episode")) as env:
        env.reset(seed, init)
        env.expect_observation(protocol.NUM_STEPS_WAIT)
        for step, a in enumerate(actions, 1):
            raw, done = env.step(a)
            ref, ref_done = reference[step - 1]
            assert done == ref_done, f"done differs at step {step}"
            for k in STATE_KEYS:
                np.testing.assert_array_equal(raw[k], ref[k], err_msg=f"{k} at step {step}")
            if step in query_steps:
                for cam in (protocol.AGENTVIEW, protocol.WRIST):
                    assert cam in raw, f"{cam} missing on query step {step}"
                    diff = np.abs(raw[cam].astype(int) - ref[cam].astype(int)).max()
                    assert diff == 0, f"{cam} differs by {diff} grey levels on query step {step}"
                env.expect_observation(REPLAN)
            else:
                # images are handed out only when they are exact
                if protocol.AGENTVIEW in raw:
                    np.testing.assert_array_equal(raw[protocol.AGENTVIEW], ref[protocol.AGENTVIEW])
        counters = env.counters

    # Renders happen only for the query steps: one per camera per query, on the query step or the step
    # before it (when the camera's clock takes no sample inside the query step itself).
    assert counters.renders == len(CAMERAS) * len(query_steps)
    allowed = {s for q in query_steps for s in (q - 1, q)}
    assert {s for s, _ in counters.render_steps} <= allowed
    assert counters.skipped_renders > 0
    assert counters.steps == len(actions)


def test_replay_clock_mirrors_robosuite_sampling():
    """The clock replay predicts exactly the sub-steps at which robosuite calls a sensor."""
    from robosuite.utils.observables import Observable, sensor

    calls = []

    @sensor(modality="image")
    def probe(obs_cache):
        calls.append(step[0])
        return np.zeros(1)

    step = [0]
    obs = Observable("probe", probe, sampling_rate=20)
    calls.clear()
    obs.update(0.002, {}, force=True)  # as after set_init_state
    calls.clear()
    predicted = _replay_clock(obs, 25 * 40, 0.002)
    for i in range(25 * 40):
        step[0] = i
        obs.update(0.002, {})
    assert calls == predicted and len(predicted) >= 39
