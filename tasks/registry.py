"""Which suites and tasks exist, their language, bddl file, 50 init states and protocol max steps.

Validation lives here so that a bad suite / task / trial fails with a clear message before any env
(seconds, ~1.5 GB) is created.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
from pathlib import Path

import numpy as np

# openpi examples/libero/main.py: max_steps per suite (the longest demo in the training data, plus margin).
MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SUITES: tuple[str, ...] = tuple(MAX_STEPS)
NUM_INIT_STATES = 50


class TaskSpecError(ValueError):
    """A suite, task or trial that does not exist (raised before any env is created)."""


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    suite: str
    task_id: int
    name: str  # bddl file stem, e.g. pick_up_the_black_bowl_..._on_the_plate
    language: str  # the prompt: lower-case words from the file name
    bddl_path: str
    max_steps: int
    num_init_states: int


def _quiet_import_benchmark():
    # LIBERO's benchmark module prints "[info] Applying task order ..." on every suite construction.
    with contextlib.redirect_stdout(io.StringIO()):
        from libero.libero import benchmark, get_libero_path  # heavy; prints on import (see above)
    return benchmark, get_libero_path


@functools.lru_cache(maxsize=None)
def _suite(suite: str):
    check_suite(suite)
    benchmark, _ = _quiet_import_benchmark()
    with contextlib.redirect_stdout(io.StringIO()):
        return benchmark.get_benchmark_dict()[suite]()


def check_suite(suite: str) -> None:
    if suite not in MAX_STEPS:
        raise TaskSpecError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")


def num_tasks(suite: str) -> int:
    return _suite(suite).n_tasks


def check_task(suite: str, task_id: int) -> None:
    check_suite(suite)
    n = num_tasks(suite)
    if not isinstance(task_id, (int, np.integer)) or not 0 <= task_id < n:
        raise TaskSpecError(f"task {task_id!r} does not exist in {suite}: expected an integer in 0..{n - 1}")


def check_trial(suite: str, task_id: int, trial: int) -> None:
    check_task(suite, task_id)
    if not isinstance(trial, (int, np.integer)) or not 0 <= trial < NUM_INIT_STATES:
        raise TaskSpecError(
            f"trial {trial!r} of {suite} task {task_id}: expected 0..{NUM_INIT_STATES - 1} "
            f"(one per stored init state)"
        )


@functools.lru_cache(maxsize=None)
def get_task(suite: str, task_id: int) -> TaskInfo:
    check_task(suite, task_id)
    _, get_libero_path = _quiet_import_benchmark()
    task = _suite(suite).get_task(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    if not Path(bddl).is_file():
        raise TaskSpecError(f"bddl file of {suite} task {task_id} is missing: {bddl}")
    return TaskInfo(
        suite=suite,
        task_id=int(task_id),
        name=task.name,
        language=task.language,
        bddl_path=bddl,
        max_steps=MAX_STEPS[suite],
        num_init_states=NUM_INIT_STATES,
    )


@functools.lru_cache(maxsize=64)
def _init_states(suite: str, task_id: int) -> np.ndarray:
    states = _suite(suite).get_task_init_states(task_id)
    states = np.asarray(states)
    if states.ndim != 2 or states.shape[0] < NUM_INIT_STATES:
        raise TaskSpecError(f"{suite} task {task_id}: expected >= {NUM_INIT_STATES} init states, got {states.shape}")
    states.setflags(write=False)
    return states


def init_state(suite: str, task_id: int, trial: int) -> np.ndarray:
    """The flattened MuJoCo state of init state `trial` (the protocol's episode `trial`)."""
    check_trial(suite, task_id, trial)
    return _init_states(suite, task_id)[trial]


def list_tasks(suite: str) -> list[TaskInfo]:
    return [get_task(suite, i) for i in range(num_tasks(suite))]
