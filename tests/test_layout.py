"""openpi's scene layouts (tasks/layout.py): the RNG arithmetic, the shipped table, the config rules, and,
in real LIBERO envs, that a restored entry gives exactly the scene openpi's evaluation loop gives."""
import contextlib
import io

import numpy as np
import pytest

from libero_eval.config import ConfigError, diff_configs, load_config
from tasks import layout, registry
from tasks.env import EnvConfig

MAIN_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")


def _draw_mix(rs: np.random.RandomState, n: int) -> None:
    """What LIBERO's samplers draw: doubles (2 words), bounded ints, and normals (which cache a second one)."""
    for i in range(n):
        rs.uniform(-1, 1)
        rs.randint(7)
        if i % 3 == 0:
            rs.standard_normal()


@pytest.mark.parametrize("mix", [0, 1, 5, 40, 400])  # 400: several MT19937 twists
def test_an_entry_rebuilds_the_rng_state_bit_for_bit(mix):
    rs = np.random.RandomState(layout.OPENPI_SEED)
    _draw_mix(rs, mix)
    state = rs.get_state()
    words, gauss = layout.entry_for(state)
    rebuilt = layout.state_at(words, gauss)
    assert layout.same_state(rebuilt, state)
    assert (gauss is not None) == bool(state[3])
    # and the stream continues identically from there
    other = np.random.RandomState()
    other.set_state(rebuilt)
    np.testing.assert_array_equal(other.standard_normal(5), rs.standard_normal(5))
    np.testing.assert_array_equal(other.random_sample(5), rs.random_sample(5))


def test_words_are_counted_exactly_across_twists():
    rs = np.random.RandomState(layout.OPENPI_SEED)
    start = rs.get_state()
    for n in (1, 623, 624, 625, 1300):
        rs = np.random.RandomState(layout.OPENPI_SEED)
        rs.randint(0, 2**32, size=n, dtype=np.uint32)  # the full uint32 range: one raw 32-bit word per value
        assert layout.words_between(start, rs.get_state()) == n


def test_an_unreachable_state_is_refused():
    other = np.random.RandomState(8).get_state()
    with pytest.raises(layout.LayoutTableError, match="not reachable"):
        layout.words_between(layout.seeded_state(), other, limit=5000)


def test_a_table_round_trips_and_names_what_it_lacks(tmp_path):
    table = layout.empty_table()
    table["suites"] = {"libero_spatial": {"3": [[0, None], [62, -1.25]]}}
    path = tmp_path / "t.json"
    layout.write_table(table, path)
    back = layout.read_table(path)
    assert back["suites"] == table["suites"]
    assert layout.missing([("libero_spatial", 3, 1), ("libero_spatial", 3, 2), ("libero_goal", 0, 0)], back) == [
        ("libero_spatial", 3, 2), ("libero_goal", 0, 0)]
    assert layout.same_state(layout.openpi_state("libero_spatial", 3, 1, back), layout.state_at(62, -1.25))
    with pytest.raises(layout.LayoutTableError, match=r"libero_goal task 0 trial 0 .*layout-table --suites libero_goal"):
        layout.openpi_state("libero_goal", 0, 0, back)
    path.write_text('{"format": 99, "seed": 7}')
    with pytest.raises(layout.LayoutTableError, match="expected format 1"):
        layout.read_table(path)


def test_the_shipped_table_covers_every_init_state_of_the_four_main_suites():
    table = layout.read_table()
    assert {"numpy", "robosuite", "mujoco"} <= set(table["built_with"])
    for suite in MAIN_SUITES:
        tasks = table["suites"][suite]
        assert sorted(map(int, tasks)) == list(range(registry.num_tasks(suite))), suite
        for task, entries in tasks.items():
            assert len(entries) == registry.NUM_INIT_STATES, (suite, task)
            assert entries[0] == [0, None], "trial 0 is the first reset after env.seed(7)"
            per_reset = np.diff([words for words, _ in entries])
            assert per_reset.min() > 0 and per_reset.max() < 1000, (suite, task, per_reset)


def test_seeding_is_validated():
    assert EnvConfig().seeding == "openpi"
    with pytest.raises(ValueError, match="seeding: expected one of openpi, per_episode, got 'openpi7'"):
        EnvConfig(seeding="openpi7")
    with pytest.raises(ValueError, match="needs hard_reset: true"):
        EnvConfig(hard_reset=False)
    EnvConfig(hard_reset=False, seeding="per_episode")


def test_a_sweep_outside_the_table_is_refused_before_it_starts():
    with pytest.raises(ConfigError, match=r"env.seeding: openpi .*lacks 2: libero_90 task 3 trial 0, libero_90 task 3 "
                                          r"trial 1\. Build them with `libero-eval layout-table --suites libero_90`"):
        load_config(None, ["suites={libero_90: [3]}", "trials=2"])
    config = load_config(None, ["suites={libero_90: [3]}", "trials=2", "env.seeding=per_episode"])
    assert config.env.seeding == "per_episode"
    with pytest.raises(ConfigError, match="env.seeding: openpi places the fixtures at each hard reset; it needs hard_reset: true"):
        load_config(None, ["env.hard_reset=false"])


def test_run_directories_from_before_the_option_resume_as_per_episode():
    new = load_config(None).to_dict()
    old = {k: v for k, v in new.items()}
    old["env"] = {k: v for k, v in new["env"].items() if k != "seeding"}
    assert diff_configs(old, new) == ["env.seeding: stored 'per_episode', now 'openpi'"]
    per_episode = load_config(None, ["env.seeding=per_episode"]).to_dict()
    assert diff_configs(old, per_episode) == []


# -- real envs --------------------------------------------------------------------------------------

def _openpi_loop(task, trials: int, steps_between: int = 10) -> dict[int, dict]:
    """openpi examples/libero/main.py, the parts that touch the scene: one env per task, env.seed(7), then per
    init state: reset, set_init_state, run the episode (here: a few dummy steps)."""
    from tasks import protocol
    from tasks.layout_build import Snapshot

    with contextlib.redirect_stdout(io.StringIO()):
        from libero.libero.envs import OffScreenRenderEnv

        env = OffScreenRenderEnv(bddl_file_name=task.bddl_path, camera_heights=256, camera_widths=256)
    env.seed(7)
    out = {}
    try:
        for k in range(trials):
            env.reset()
            raw = env.set_init_state(registry.init_state(task.suite, task.task_id, k))
            out[k] = Snapshot.take(env.env.sim, raw)
            before = np.random.get_state()
            for _ in range(steps_between):
                env.step(protocol.DUMMY_ACTION)
            assert layout.same_state(before, np.random.get_state()), "env steps drew from the global RNG"
    finally:
        env.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("suite, task_id", [("libero_spatial", 0), ("libero_object", 3), ("libero_goal", 0),
                                            ("libero_10", 2)])
def test_a_reused_env_restores_openpis_scene_for_any_trial_in_any_order(suite, task_id):
    from tasks.env import LiberoEnv
    from tasks.layout_build import Snapshot

    task = registry.get_task(suite, task_id)
    expected = _openpi_loop(task, trials=3)
    with LiberoEnv(task) as env:  # the default config: seeding openpi, lazy rendering
        for k in (2, 0, 2):  # out of order, after other trials, twice
            np.random.seed(1234 + k)  # whatever the process drew before must not matter
            raw = env.reset(99, registry.init_state(suite, task_id, k), observe=True, trial=k)
            got = Snapshot.take(env.sim, raw)
            assert got.differences(expected[k]) == [], (suite, task_id, k)
            assert got.differences(expected[1]) != [], "trials 1 and k have different scenes (fixtures moved)"


@pytest.mark.slow
def test_the_builder_measures_the_shipped_entries_and_checks_them_in_a_second_env():
    from tasks import layout_build

    entries = layout_build.build_task("libero_goal", 1, trials=2, check="layout")
    assert entries == layout.read_table()["suites"]["libero_goal"]["1"][:2]


def test_an_old_run_directory_resumes_per_episode_and_a_changed_table_is_refused(tmp_path):
    import json

    import yaml

    from libero_eval.sweep import SCENES_FILE, prepare_run_dir

    old = load_config(None).to_dict()
    del old["env"]["seeding"], old["latency"], old["episode"]["timing"], old["episode"]["fallback"]
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="env.seeding: stored 'per_episode', now 'openpi'.*\n"
                                          "To resume it as it was made, add env.seeding=per_episode"):
        prepare_run_dir(load_config(None), run_dir)
    prepare_run_dir(load_config(None, ["env.seeding=per_episode"]), run_dir)  # resumes
    assert json.loads((run_dir / SCENES_FILE).read_text()) == {"seeding": "per_episode", "openpi_table_sha256": None}

    new_dir = tmp_path / "new"
    prepare_run_dir(load_config(None), new_dir)
    stored = json.loads((new_dir / SCENES_FILE).read_text())
    assert stored["seeding"] == "openpi" and len(stored["openpi_table_sha256"]) == 64
    (new_dir / SCENES_FILE).write_text(json.dumps({**stored, "openpi_table_sha256": "0" * 64}))  # a rebuilt table
    with pytest.raises(ConfigError, match="other openpi layout-table entries"):
        prepare_run_dir(load_config(None), new_dir)
