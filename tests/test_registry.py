"""Suites, tasks, init states and early validation (LIBERO's files, no env)."""
import numpy as np
import pytest

from tasks import registry


@pytest.mark.parametrize("suite, n_tasks, max_steps", [
    ("libero_spatial", 10, 220), ("libero_object", 10, 280), ("libero_goal", 10, 300),
    ("libero_10", 10, 520), ("libero_90", 90, 400),
])
def test_suites_tasks_and_init_states(suite, n_tasks, max_steps):
    assert registry.num_tasks(suite) == n_tasks
    task = registry.get_task(suite, 0)
    assert task.max_steps == max_steps
    assert task.language and task.language == task.language.lower() and "_" not in task.language
    assert task.bddl_path.endswith(".bddl")
    states = [registry.init_state(suite, 0, k) for k in (0, 49)]
    assert states[0].ndim == 1 and states[0].shape == states[1].shape and states[0].dtype == np.float64
    assert not np.array_equal(states[0], states[1])


def test_known_task_language():
    task = registry.get_task("libero_spatial", 0)
    assert task.language == "pick up the black bowl between the plate and the ramekin and place it on the plate"


@pytest.mark.parametrize("call, message", [
    (lambda: registry.check_suite("libero_spacial"), "unknown suite 'libero_spacial'; expected one of libero_spatial"),
    (lambda: registry.check_task("libero_spatial", 10), r"task 10 does not exist in libero_spatial: expected an integer in 0..9"),
    (lambda: registry.check_task("libero_90", -1), r"expected an integer in 0..89"),
    (lambda: registry.check_trial("libero_goal", 3, 50), r"trial 50 of libero_goal task 3: expected 0..49"),
])
def test_bad_specs_fail_clearly(call, message):
    with pytest.raises(registry.TaskSpecError, match=message):
        call()


@pytest.mark.parametrize("argv, message", [
    (["--suite", "libero_spatial", "--tasks", "10"], "task 10 does not exist in libero_spatial"),
    (["--suite", "libero_goal", "--tasks", "0", "--first-trial", "49", "--trials", "2"], "trial 50 of libero_goal task 0"),
])
def test_cli_rejects_bad_input_before_creating_an_env(argv, message, tmp_path, monkeypatch, capsys):
    import tasks.env
    from libero_eval import cli

    def no_env(*a, **k):
        raise AssertionError("an env was created for invalid input")

    monkeypatch.setattr(tasks.env, "LiberoEnv", no_env)
    assert cli.main(["run", *argv, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_rejects_unknown_suite_and_bad_task_list(capsys):
    from libero_eval import cli

    for argv in (["run", "--suite", "libero_100"], ["run", "--tasks", "0,x"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'libero_100'" in err and "bad task list '0,x'" in err
