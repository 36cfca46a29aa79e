"""A sweep over the init states a checkpoint was trained on is warned about (no env)."""
from pathlib import Path

from libero_eval.config import load_config
from libero_eval.trained_on import overlap_warning, read_trained_on, write_trained_on

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "policies" / "pi05" / "assets" / "pi05_small_spatial01"


def _pairs(config):
    return [(s, t, k) for s, t in config.task_list() for k in config.trial_list()]


def test_the_shipped_checkpoint_knows_its_training_init_states():
    assert read_trained_on(SHIPPED) == {"libero_spatial": {0: set(range(40)), 1: set(range(40))}}


def test_evaluating_training_init_states_is_warned_held_out_ones_are_not():
    config = load_config(ROOT / "configs" / "smoke.yaml", ["trials=5"])  # init states 0-4: trained on
    warning = overlap_warning(config, _pairs(config))
    assert "10 of 10 planned (task, init state) pairs use init states this checkpoint was trained on" in warning
    assert "libero_spatial task 0: 0-4" in warning and "Held-out init states: libero_spatial task 0: not 0-39" in warning
    assert overlap_warning(load_config(ROOT / "configs" / "smoke.yaml"), _pairs(load_config(ROOT / "configs" / "smoke.yaml"))) is None
    stored = config.to_dict()  # the report reads the stored config.yaml
    assert overlap_warning(stored, [("libero_spatial", 0, 3), ("libero_spatial", 0, 44)]).startswith("1 of 2")


def test_checkpoints_without_training_data_say_nothing(tmp_path):
    assert read_trained_on(tmp_path) == {} and read_trained_on(None) == {}
    write_trained_on(tmp_path, {"libero_goal": {"2": [1, 2, 3, 7]}}, "demos/x")
    assert read_trained_on(tmp_path) == {"libero_goal": {2: {1, 2, 3, 7}}}
    config = {"model": {"kind": "checkpoint", "checkpoint": str(tmp_path)}}
    assert "libero_goal task 2: 1-3, 7" in overlap_warning(config, [("libero_goal", 2, k) for k in range(8)])
    assert overlap_warning({"model": {"kind": "tiny"}}, [("libero_goal", 2, 1)]) is None
