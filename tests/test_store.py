"""Result store and summary (no env)."""
import json
import warnings

import pytest

from libero_eval.specs import EpisodeResult, EpisodeSpec
from libero_eval.store import INFRA_REASONS, TORN_FILE, ResultStore
from libero_eval.summary import summary_table


def _result(trial, status="failure", label="hold", reason=None):
    spec = EpisodeSpec("libero_spatial", 0, trial, label, 10)
    return EpisodeResult(key=spec.key, suite="libero_spatial", task_id=0, task_name="t", trial=trial,
                         policy_label=label, seed=spec.seed, status=status, success=status == "success",
                         reason=reason or {"success": "done", "failure": "max_steps", "error": "env_error"}[status],
                         steps=10, wall_s=1.0, error="RuntimeError: boom" if status == "error" else None)


def test_append_load_roundtrip_and_duplicates_refused(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_result(0, "success"))
    store.append(_result(1))
    assert [r.trial for r in store.load()] == [0, 1]
    assert store.finished_keys() == {"hold/libero_spatial/task00/trial00", "hold/libero_spatial/task00/trial01"}
    with pytest.raises(ValueError, match="already has a stored result"):
        store.append(_result(1))


def test_torn_last_line_is_ignored_with_a_warning(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_result(0))
    with open(store.path, "a") as f:
        f.write(json.dumps(_result(1).to_dict())[:40])
    with pytest.warns(UserWarning, match="unreadable result line"):
        assert [r.trial for r in store.load()] == [0]


def test_status_and_success_must_agree():
    with pytest.raises(ValueError, match="contradicts"):
        EpisodeResult(key="k", suite="s", task_id=0, task_name="t", trial=0, policy_label="p", seed=1,
                      status="failure", success=True, reason="x", steps=0, wall_s=0)


def test_seeds_depend_only_on_suite_task_trial():
    a = EpisodeSpec("libero_spatial", 1, 2, "none", 10)
    b = EpisodeSpec("libero_spatial", 1, 2, "fixed_window_3", 99)
    assert a.seed == b.seed and a.key != b.key
    assert EpisodeSpec("libero_spatial", 1, 3, "none", 10).seed != a.seed
    assert a.seed == 454379236  # stable across processes and versions (sha256, not hash())


def test_summary_counts_errors_apart():
    table = summary_table([_result(0, "success"), _result(1), _result(2, "error")])
    assert "1/2  50.0%" in table  # the error is not a task failure
    assert "1 episode(s) ended in an error" in table and "env_error: RuntimeError: boom" in table


def _key(trial):
    return f"hold/libero_spatial/task00/trial{trial:02d}"


def test_torn_tail_is_moved_aside_before_the_next_append(tmp_path):
    store = ResultStore(tmp_path)
    for trial in range(3):
        store.append(_result(trial))
    data = store.path.read_bytes()
    cut = data.rfind(b"\n", 0, len(data) - 1) + 1 + 50  # 50 bytes into the last line, as a crash leaves it
    store.path.write_bytes(data[:cut])

    store = ResultStore(tmp_path)  # a resumed driver
    with pytest.warns(UserWarning, match=rf"results.jsonl: torn last line \(50 bytes at offset {cut - 50},"):
        store.append(_result(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unreadable line left behind
        assert [r.trial for r in store.load()] == [0, 1, 3]
        assert _key(2) not in store.finished_keys()
    assert store.path.read_bytes().endswith(b"\n")
    (torn,) = [json.loads(line) for line in (tmp_path / TORN_FILE).read_text().splitlines()]
    assert torn["fragment"].encode("utf-8", "surrogateescape") == data[cut - 50:cut]
    assert (torn["bytes"], torn["offset"]) == (50, cut - 50)
    store.append(_result(2))  # the torn episode reruns and stores normally
    assert sorted(r.trial for r in store.load()) == [0, 1, 2, 3]


def test_a_complete_but_garbled_last_line_is_moved_aside(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_result(0))
    with open(store.path, "ab") as f:
        f.write(b"\x00" * 16 + b"\n")  # what a power loss can leave: zeros up to the new size
    with pytest.warns(UserWarning, match="torn last line"):
        ResultStore(tmp_path).append(_result(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r.trial for r in store.load()] == [0, 1]
    torn = json.loads((tmp_path / TORN_FILE).read_text())
    assert torn["fragment"] == "\x00" * 16 + "\n" and torn["bytes"] == 17


def test_a_clean_file_is_left_alone(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_result(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ResultStore(tmp_path).append(_result(1))
    assert not (tmp_path / TORN_FILE).exists()


def test_a_later_result_supersedes_an_infrastructure_error(tmp_path):
    assert {"env_error", "render_error", "policy_unavailable", "worker_died"} == INFRA_REASONS
    store = ResultStore(tmp_path)
    store.append(_result(0, "error", reason="worker_died"))
    store.append(_result(1))
    assert store.finished_keys() == {_key(1)}  # a resume reruns trial 0
    store.append(_result(0, "error", reason="policy_unavailable"))  # the rerun failed the same way again
    assert store.finished_keys() == {_key(1)}
    store.append(_result(0, "success"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = store.load()
    assert [(r.trial, r.status) for r in loaded] == [(0, "success"), (1, "failure")]  # one result per key
    assert store.finished_keys() == {_key(0), _key(1)}
    with pytest.raises(ValueError, match="already has a stored result"):
        store.append(_result(0))


def test_a_task_outcome_or_policy_error_is_final(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_result(0))
    store.append(_result(1, "error", reason="policy_error"))
    assert store.finished_keys() == {_key(0), _key(1)}
    for result in (_result(0, "success"), _result(1, "success"), _result(1, "error", reason="env_error")):
        with pytest.raises(ValueError, match="already has a stored result"):
            store.append(result)


def test_a_line_after_a_final_result_is_ignored_on_load(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_result(0))
    with open(store.path, "a") as f:  # written around the store (by hand, or a second driver)
        f.write(json.dumps(_result(0, "success").to_dict()) + "\n")
    with pytest.warns(UserWarning, match="already has a final result"):
        assert [r.status for r in store.load()] == ["failure"]
