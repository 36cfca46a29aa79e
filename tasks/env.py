"""LIBERO env factory with headless GL and lazy camera rendering.

On CPU a 256x256 camera render costs ~200 ms while the physics of a step costs ~7 ms, and with
replan_steps=5 the policy reads the cameras on one step in five. `LiberoEnv` therefore renders a camera
only when its image will be read, and stays pixel-identical to an env that renders every step.

Why this needs care: robosuite samples each camera observable on its own clock inside the 25 physics
sub-steps of a control step (first sub-step after the clock wraps, and float drift moves that sub-step).
Forcing a render at the end of a step gives a different image; disabling the observable freezes its clock.
So the clocks keep running exactly as robosuite runs them; only the sensor call is skipped. When the caller
announces that the observation after `n` more steps will be read (`expect_observation(n)`), the env replays
each camera clock ahead in pure float arithmetic, finds the step holding the last sample before that
observation, and renders there for real.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import time
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco / robosuite are imported
if os.environ["MUJOCO_GL"] == "egl":
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import numpy as np

from tasks import layout
from tasks.privileged import privileged_state
from tasks.registry import TaskInfo

CAMERAS = ("agentview", "robot0_eye_in_hand")
SEEDINGS = ("openpi", "per_episode")
RENDER_DEVICES = ("auto", "gpu", "cpu")  # env.render_device (libero_eval/cluster.py applies it)


class RenderError(RuntimeError):
    """A camera render failed (GL context lost, EGL missing): infrastructure, not the policy's fault."""


class LazyRenderError(RuntimeError):
    """The requested observation cannot be produced exactly (no camera sample before it)."""


@dataclasses.dataclass
class EnvConfig:
    resolution: int = 256  # openpi's LIBERO_ENV_RESOLUTION
    lazy_render: bool = True  # render cameras only on steps whose images are read
    hard_reset: bool = True  # LIBERO's default (reload the model on every reset), as in openpi's eval
    # openpi: each trial's fixtures where openpi's evaluation puts them (tasks/layout.py); per_episode:
    # env.seed(paired episode seed) before each reset (libero-eval's protocol before openpi layouts)
    seeding: str = "openpi"
    # where a rollout worker's EGL renders (libero_eval/cluster.py): auto = a GPU of its node when it has any,
    # spread over them, else the default EGL device; gpu = require one; cpu = Mesa's software EGL (keeps
    # rendering off the model's GPU). GPU and Mesa rasterisers differ in pixels: compare runs of one setting.
    render_device: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or not 32 <= self.resolution <= 1024:
            raise ValueError(f"resolution: expected an integer camera size in 32..1024 pixels, got {self.resolution!r}")
        if self.render_device not in RENDER_DEVICES:
            raise ValueError(f"render_device: expected one of {', '.join(RENDER_DEVICES)}, got {self.render_device!r}")
        if self.seeding not in SEEDINGS:
            raise ValueError(f"seeding: expected one of {', '.join(SEEDINGS)}, got {self.seeding!r}")
        if self.seeding == "openpi" and not self.hard_reset:
            raise ValueError("seeding: openpi places the fixtures at each hard reset; it needs hard_reset: true "
                             "(or use seeding: per_episode)")


@dataclasses.dataclass
class EnvCounters:
    steps: int = 0
    renders: int = 0  # real camera renders inside steps (one per camera)
    skipped_renders: int = 0  # camera samples whose render was skipped
    step_s: float = 0.0  # wall time inside env.step, renders included
    render_s: float = 0.0
    reset_s: float = 0.0
    render_steps: list = dataclasses.field(default_factory=list)  # (step index, camera) of each real render


class _LazySensor:
    """Wraps a robosuite camera sensor: renders when live, else returns the last image (never read)."""

    def __init__(self, sensor, owner: "LiberoEnv", camera: str):
        self.sensor = sensor
        self.owner = owner
        self.camera = camera
        self.__modality__ = getattr(sensor, "__modality__", "image")
        self.last: np.ndarray | None = None

    def __call__(self, obs_cache):
        if self.owner._camera_live(self.camera):
            t0 = time.perf_counter()
            try:
                self.last = self.sensor(obs_cache)
            except Exception as exc:
                raise RenderError(f"rendering camera {self.camera} failed: {type(exc).__name__}: {exc}") from exc
            self.owner._record_render(self.camera, time.perf_counter() - t0)
        else:
            self.owner.counters.skipped_renders += 1
            if self.last is None:
                res = self.owner.config.resolution
                self.last = np.zeros((res, res, 3), dtype=np.uint8)
        return self.last


def _replay_clock(observable, n_updates: int, timestep: float) -> list[int]:
    """Indices (0-based, among the next n_updates sub-steps) at which robosuite's Observable.update would
    call the sensor. Mirrors robosuite 1.4 `Observable.update` (force=False) operation for operation."""
    t = observable._time_since_last_sample
    sampled = observable._sampled
    delay = observable._current_delay
    period = observable._sampling_timestep
    events = []
    for i in range(n_updates):
        t += timestep
        if not sampled and period - delay >= t:
            events.append(i)
            sampled = True
        if t >= period:
            if not sampled:
                events.append(i)
            t %= period
            sampled = False
    return events


def seed_scene(seeding: str, libero_env, task: TaskInfo, trial: int | None, seed: int,
               layout_table: dict | None = None) -> None:
    """Set numpy's global RNG so that `libero_env`'s next hard reset draws the scene of `trial` under
    `seeding`: openpi's layout (tasks/layout.py; `seed` unused), or env.seed(seed) (per_episode)."""
    if seeding == "openpi":
        np.random.set_state(layout.openpi_state(task.suite, task.task_id, int(trial), layout_table))
    else:
        libero_env.seed(int(seed))


def clear_gripper_commands(robosuite_env) -> None:
    """Start a soft-reset episode like a hard-reset one, whatever the previous episode did.

    robosuite's gripper models integrate their command (PandaGripper.current_action moves 0.01 per physics
    substep toward -1 or +1) and nothing resets it but rebuilding the model, which a hard reset does. After a
    soft reset (hard_reset=False) an episode that follows one ending with a closed gripper settles
    differently from one that follows an open one (measured: the robot's joints differ by up to 3e-5 after
    the settle steps, the fingers by 3e-3), so the same actions no longer give the same episode.
    """
    for robot in robosuite_env.robots:
        gripper = getattr(robot, "gripper", None)
        if gripper is not None and hasattr(gripper, "current_action"):
            gripper.current_action = np.zeros_like(gripper.current_action)


class LiberoEnv:
    """One LIBERO task's env (OffScreenRenderEnv, agentview + wrist cameras), reused across trials."""

    def __init__(self, task: TaskInfo, config: EnvConfig | None = None, layout_table: dict | None = None):
        self.task = task
        self.config = config or EnvConfig()
        self.layout_table = layout_table  # seeding openpi: None = the shipped table (tasks/layout.py)
        self.counters = EnvCounters()
        self._step_index = 0  # control steps since the last reset
        self._live_steps: dict[str, set[int]] = {c: set() for c in CAMERAS}
        self._render_all = not self.config.lazy_render
        self._in_reset = False
        self._reset_live = False
        # Per camera: was its latest sample really rendered? Then the image robosuite returns is exact.
        self._last_render_ok = {c: False for c in CAMERAS}
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            from libero.libero.envs import OffScreenRenderEnv  # heavy (robosuite, MuJoCo); noisy on import

            self._env = OffScreenRenderEnv(
                bddl_file_name=task.bddl_path,
                camera_heights=self.config.resolution,
                camera_widths=self.config.resolution,
                camera_names=list(CAMERAS),
                hard_reset=self.config.hard_reset,
            )
        self.create_s = time.perf_counter() - t0
        self._robosuite = self._env.env
        self._substeps = int(self._robosuite.control_timestep / self._robosuite.model_timestep)
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def reset(self, seed: int, init_state: np.ndarray, observe: bool = False, trial: int | None = None
              ) -> dict[str, Any]:
        """Seed (before every reset: the env is reused across trials), reset, set the init state.

        Seeding `openpi` sets numpy's global RNG to the state openpi's evaluation has before `trial`'s reset
        (so `seed` does not touch the scene); `per_episode` calls env.seed(seed). Returns the raw
        observation; it carries camera images only when `observe` is True.
        """
        if self.config.seeding == "openpi" and trial is None:
            raise ValueError("seeding openpi places the scene by trial: reset(..., trial=k) is required")
        t0 = time.perf_counter()
        self._step_index = 0
        self._live_steps = {c: set() for c in CAMERAS}
        seed_scene(self.config.seeding, self._env, self.task, trial, seed, self.layout_table)
        self._in_reset = True
        try:
            self._env.reset()
            clear_gripper_commands(self._robosuite)
            self._wrap_cameras()
            self._reset_live = observe
            raw = self._env.set_init_state(np.asarray(init_state))
        finally:
            self._in_reset = False
            self._reset_live = False
        self.counters.reset_s += time.perf_counter() - t0
        return self._filter_obs(raw, all(self._last_render_ok[c] for c in CAMERAS))

    def close(self) -> None:
        if not self._closed:
            self._env.close()
            self._closed = True

    def __enter__(self) -> "LiberoEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- stepping ----------------------------------------------------------------------------------

    @property
    def step_index(self) -> int:
        return self._step_index

    @property
    def control_hz(self) -> float:
        """Env steps per second of simulated time (robosuite's control_freq; 20 for LIBERO)."""
        return float(self._robosuite.control_freq)

    def set_render_every_step(self, every_step: bool) -> None:
        """Render cameras on every step (e.g. a video at full fps), lazy or not."""
        self._render_all = every_step or not self.config.lazy_render

    def expect_observation(self, in_steps: int) -> None:
        """Announce that the camera images returned by the `in_steps`-th step from now will be read."""
        if in_steps < 1:
            raise ValueError(f"in_steps must be >= 1, got {in_steps}")
        if self._render_all:
            return
        timestep = self._robosuite.model_timestep
        for cam in CAMERAS:
            observable = self._robosuite._observables[f"{cam}_image"]
            events = _replay_clock(observable, in_steps * self._substeps, timestep)
            if not events:
                raise LazyRenderError(
                    f"camera {cam} takes no sample in the next {in_steps} steps: cannot render the "
                    f"observation of step {self._step_index + in_steps} lazily (sampling rate "
                    f"{1 / observable._sampling_timestep:.1f} Hz)"
                )
            self._live_steps[cam].add(self._step_index + 1 + events[-1] // self._substeps)

    def step(self, action) -> tuple[dict[str, Any], bool]:
        """Execute one action. Returns (raw observation, done). The observation carries camera images
        only on steps announced with `expect_observation` (or every step when rendering every step)."""
        target = self._step_index + 1
        t0 = time.perf_counter()
        self._step_index = target  # the sensors consult it while the step runs
        raw, _reward, done, _info = self._env.step(np.asarray(action, dtype=np.float64))
        self.counters.step_s += time.perf_counter() - t0
        self.counters.steps += 1
        observed = all(self._last_render_ok[c] for c in CAMERAS)
        for cam in CAMERAS:
            self._live_steps[cam] = {s for s in self._live_steps[cam] if s > target}
        return self._filter_obs(raw, observed), bool(done)

    def check_success(self) -> bool:
        return bool(self._env.check_success())

    # -- privileged state (oracle policies and tests only) -----------------------------------------

    @property
    def sim(self):
        return self._robosuite.sim

    def get_sim_state(self) -> np.ndarray:
        return self._env.get_sim_state()

    def observe_state(self, state: np.ndarray) -> dict[str, Any]:
        """Set a flattened sim state (from `get_sim_state`) and return the raw observation with both cameras
        rendered from it: the images the closed loop saw at that state (demo re-rendering)."""
        self._in_reset, self._reset_live = True, True
        try:
            raw = self._env.regenerate_obs_from_state(np.asarray(state))
        finally:
            self._in_reset, self._reset_live = False, False
        return self._filter_obs(raw, all(self._last_render_ok[c] for c in CAMERAS))

    def privileged(self) -> dict[str, Any]:
        """Goal, object boxes and gripper pose for oracle policies (see tasks.privileged)."""
        return privileged_state(self._robosuite)

    # -- internals ---------------------------------------------------------------------------------

    def _wrap_cameras(self) -> None:
        self._last_render_ok = {c: False for c in CAMERAS}
        for cam in CAMERAS:
            observable = self._robosuite._observables[f"{cam}_image"]
            sensor = observable._sensor
            if isinstance(sensor, _LazySensor):
                sensor = sensor.sensor
            if observable._delayer() != 0.0:
                raise LazyRenderError(f"camera {cam} has a sampling delay: lazy rendering would not be exact")
            observable._sensor = _LazySensor(sensor, self, cam)

    def _camera_live(self, camera: str) -> bool:
        if self._in_reset:
            live = self._render_all or self._reset_live
        else:
            live = self._render_all or self._step_index in self._live_steps[camera]
        self._last_render_ok[camera] = live
        return live

    def _record_render(self, camera: str, seconds: float) -> None:
        if not self._in_reset:
            self.counters.renders += 1
            self.counters.render_steps.append((self._step_index, camera))
        self.counters.render_s += seconds

    def _filter_obs(self, raw: dict[str, Any], observed: bool) -> dict[str, Any]:
        if observed:
            return raw
        return {k: v for k, v in raw.items() if not k.endswith("_image") and k != "image-state"}


def make_env(task: TaskInfo, config: EnvConfig | None = None) -> LiberoEnv:
    return LiberoEnv(task, config)
