"""Record demonstrations of the scripted expert: `libero-eval record-demos`.

Two passes per episode, so only kept episodes pay for rendering:
  1. the expert runs on a camera-less env (robosuite ControlEnv: no renderer, ~15 ms per step) from the
     protocol's start (init state k + 10 settle steps), recording actions and flattened sim states (with
     `noise` > 0, DART-style: the executed action is perturbed, the expert's own action is the label);
  2. for successful episodes, the actions are replayed on a rendering LiberoEnv (lazy rendering: cameras
     render only every `every` steps), so the stored observations are exactly the closed loop's: the
     protocol's processing (rotate 180, 224 px), then `fit_image` to the model's size.

The on-disk format is `libero_eval.learning.dataset`'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from libero_eval.learning.dataset import DATASET_FILE, MANIFEST_FILE, episode_file, is_kept, read_manifest
from libero_eval.seeding import episode_seed
from policies.expert import ExpertPolicy
from policies.pi05.processing import fit_image
from tasks import layout, protocol, registry
from tasks.env import SEEDINGS, EnvConfig, LiberoEnv, clear_gripper_commands, seed_scene
from tasks.privileged import privileged_state

logger = logging.getLogger("libero_eval.demos")

# max |sim state difference| between the rendering replay and the expert pass for a kept episode; the replay
# is deterministic, so anything above float noise means the images and the labels have parted (contacts
# amplify a 1e-7 action difference into centimetres: seen before actions were cast to float32 first)
MAX_REPLAY_DRIFT = 1e-6


class DemoError(ValueError):
    """Bad recording arguments, or a resume with settings that differ from the recorded ones."""


# what datasets recorded before the `seeding` option show: fixtures placed once when each recording worker
# created its (soft-reset) render env
LEGACY_SEEDING = "legacy: fixtures placed once per recording worker"


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    tasks: dict[str, list[int]]  # suite -> task ids
    trials: list[int]  # init-state indices recorded per task
    held_out: list[int]  # init-state indices kept out of training (split "held_out")
    image_size: int = 112
    every: int = 1  # render an observation every `every` steps
    max_steps: int | None = None  # None: the protocol's max steps per suite
    # DART-style perturbation: executed = expert + OU noise (std `noise` on x/y/z, a third of it on the rotation
    # dims, none on the gripper; correlation time `noise_tau` steps); the expert's own action is the label, so
    # the data shows how to recover from the drift a learned policy makes
    noise: float = 0.0
    noise_tau: float = 5.0
    noise_seed: int = 7  # the perturbation's stream per episode is seeded by (episode seed, noise_seed)
    place_tolerance: float = 0.01  # the expert's carry -> lower gate (ExpertParams.place_tol), metres
    funnel: float = 0.0  # the expert's funnel approaches (ExpertParams.funnel); 0: gated, as validated
    # the scene layout the images show (tasks.env.EnvConfig.seeding): openpi's for each (task, init state), or
    # the paired per-episode seed's; datasets recorded before this option placed the fixtures once per
    # recording worker (LEGACY_SEEDING)
    seeding: str = "openpi"

    def __post_init__(self) -> None:
        if self.seeding not in SEEDINGS:
            raise DemoError(f"seeding must be one of {', '.join(SEEDINGS)}, got {self.seeding!r}")
        if self.seeding == "openpi":
            gaps = layout.missing([(s, t, k) for s, ids in self.tasks.items() for t in ids for k in self.trials])
            if gaps:
                raise DemoError(f"seeding openpi: the layout table has no entry for {gaps[:3]}"
                                f"{' ...' if len(gaps) > 3 else ''}; use seeding per_episode or build the table "
                                "(libero-eval layout-table)")
        for suite, ids in self.tasks.items():
            for task_id in ids:
                registry.check_task(suite, task_id)
            for trial in self.trials:
                registry.check_trial(suite, ids[0] if ids else 0, trial)
        if self.image_size < 8:
            raise DemoError(f"image_size must be >= 8, got {self.image_size}")
        if self.every < 1:
            raise DemoError(f"every must be >= 1, got {self.every}")
        if not 0.0 <= self.noise <= 1.0:
            raise DemoError(f"noise must be in [0, 1] (action units), got {self.noise}")
        if self.noise_tau <= 0:
            raise DemoError(f"noise_tau must be > 0 steps, got {self.noise_tau}")
        if self.noise_seed < 0:
            raise DemoError(f"noise_seed must be >= 0, got {self.noise_seed}")
        if not 0 < self.place_tolerance <= 0.1:
            raise DemoError(f"place_tolerance must be in (0, 0.1] metres, got {self.place_tolerance}")
        if not 0 <= self.funnel <= 20:
            raise DemoError(f"funnel must be in [0, 20] (metres of height per metre of xy error), got {self.funnel}")
        stray = sorted(set(self.held_out) - set(self.trials))
        if stray:
            raise DemoError(f"held-out trials {stray} are not among the recorded trials {self.trials}")

    def split(self, trial: int) -> str:
        return "held_out" if trial in self.held_out else "train"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _prepare_out(out: Path, settings: DemoSettings) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / DATASET_FILE
    wanted = settings.to_dict()
    if path.is_file():
        have = json.loads(path.read_text())
        defaults = {f.name: f.default for f in dataclasses.fields(DemoSettings)}  # datasets older than an option
        defaults["seeding"] = LEGACY_SEEDING
        diffs = [f"{k}: recorded {have.get(k, defaults.get(k))!r}, now {wanted[k]!r}"
                 for k in ("image_size", "every", "max_steps", "noise", "noise_tau", "noise_seed",
                           "place_tolerance", "funnel", "seeding")
                 if have.get(k, defaults.get(k)) != wanted[k]]
        if diffs:
            raise DemoError(f"{out} holds demos recorded with other settings ({'; '.join(diffs)}); "
                            "use another --out or the same settings")
        # more tasks or trials may be added to an existing dataset; held-out stays a function of the trial
        merged = {**have, "tasks": {**have["tasks"], **{s: sorted(set(have["tasks"].get(s, [])) | set(ids))
                                                        for s, ids in wanted["tasks"].items()}},
                  "trials": sorted(set(have["trials"]) | set(wanted["trials"])),
                  "held_out": sorted(set(have["held_out"]) | set(wanted["held_out"]))}
        path.write_text(json.dumps(merged, indent=2))
    else:
        path.write_text(json.dumps(wanted, indent=2))


# --------------------------------------------------------------------------------------------------------
# Worker side (one process per chunk of trials of one task: its own envs, its own EGL context)


NOISE_SCALE = np.array([1.0, 1.0, 1.0, 1 / 3, 1 / 3, 1 / 3, 0.0])  # per action dim, times DemoSettings.noise
NOISE_PHASES = ("hover", "lift", "carry")  # free-space motion; grasping and placing run unperturbed
BURST_ON, BURST_OFF = 10.0, 20.0  # mean steps of a perturbation burst / of the calm between bursts


class OUNoise:
    """DART-style action perturbation in bursts: Ornstein-Uhlenbeck noise (std `std * NOISE_SCALE`,
    correlation `tau` steps: a drift that lasts, like a learned policy's) during bursts of ~BURST_ON steps
    separated by ~BURST_OFF calm steps, only in the expert's free-space phases. The calm lets the expert
    converge (its phase changes are gated on small errors), so the data shows drift *and* the correction."""

    def __init__(self, std: float, tau: float, rng: np.random.Generator):
        self.decay = float(np.exp(-1.0 / tau))
        self.scale = std * NOISE_SCALE
        self.rng = rng
        self.value = self.rng.standard_normal(len(NOISE_SCALE)) * self.scale
        self.on = True

    def __call__(self, phase: str) -> np.ndarray:
        fresh = self.rng.standard_normal(len(NOISE_SCALE)) * self.scale
        self.value = self.decay * self.value + np.sqrt(1 - self.decay ** 2) * fresh
        switch = self.rng.random() < (1 / BURST_ON if self.on else 1 / BURST_OFF)
        self.on = self.on != switch
        return self.value if self.on and phase in NOISE_PHASES else np.zeros_like(self.value)


def _expert_pass(env, policy, init_state: np.ndarray, max_steps: int, noise: OUNoise | None = None
                 ) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray]:
    """-> (success, executed actions [T, 7], expert labels [T, 7], sim states [T + 1, D]) from the protocol's
    start; without `noise` the executed actions are the labels."""
    env.reset()
    clear_gripper_commands(env.env)
    env.set_init_state(init_state)
    for _ in range(protocol.NUM_STEPS_WAIT):
        env.step(protocol.DUMMY_ACTION)
    states, actions, labels = [env.get_sim_state().copy()], [], []
    done = False
    for _ in range(max_steps):
        chunk = policy.infer({"privileged": privileged_state(env.env)})
        label = chunk.actions[0].astype(np.float64)
        action = label if noise is None else np.clip(label + noise(policy.phase), -1.0, 1.0)
        action = action.astype(np.float32)  # run exactly what is stored, so the replay retraces it bit for bit
        _, _, done, _ = env.step(action.astype(np.float64))
        actions.append(action)
        labels.append(label.astype(np.float32))
        states.append(env.get_sim_state().copy())
        if done:
            break
    return (bool(done), np.asarray(actions, dtype=np.float32), np.asarray(labels, dtype=np.float32),
            np.asarray(states))


def _render_pass(env, seed: int, trial: int, actions: np.ndarray, sim_states: np.ndarray, every: int,
                 size: int) -> tuple[dict[str, np.ndarray], float]:
    """Replay the episode on a rendering LiberoEnv, rendering (lazily) only the steps that become frames.

    Replay rather than setting saved states: robosuite renders a step's images at its last physics substep,
    before MuJoCo's kinematics catch up with the integrated state, so an image rendered from a restored
    state differs from the closed loop's by a 2 ms motion (up to ~20 levels on moving edges). Replaying the
    actions is deterministic (the replayed states match the expert pass exactly; returned as `drift`).
    """
    steps = np.arange(0, len(actions), every, dtype=np.int32)
    wanted = set(int(t) for t in steps)
    env.reset(seed, registry.init_state(env.task.suite, env.task.task_id, trial), trial=trial)
    env.expect_observation(protocol.NUM_STEPS_WAIT)
    raw = None
    for _ in range(protocol.NUM_STEPS_WAIT):
        raw, _ = env.step(protocol.DUMMY_ACTION)
    images, wrist, states = [], [], []
    drift = 0.0
    for t in range(len(actions)):
        if t in wanted:
            images.append(fit_image(protocol.model_image(raw[protocol.AGENTVIEW]), size))
            wrist.append(fit_image(protocol.model_image(raw[protocol.WRIST]), size))
            states.append(protocol.state_vector(raw))
            drift = max(drift, float(np.abs(env.get_sim_state() - sim_states[t]).max()))
            if t + every < len(actions):
                env.expect_observation(every)
        raw, _ = env.step(actions[t])
    frames = {"frame_steps": steps, "images": np.stack(images), "wrist_images": np.stack(wrist),
              "states": np.stack(states).astype(np.float32)}
    return frames, drift


def record_chunk(suite: str, task_id: int, trials: list[int], settings: dict[str, Any], out: str) -> list[dict]:
    """Record `trials` of one task; returns their manifest rows (written by the parent, in order)."""
    task = registry.get_task(suite, task_id)
    max_steps = settings["max_steps"] or registry.MAX_STEPS[suite]
    with contextlib.redirect_stdout(io.StringIO()):
        # LIBERO itself (robosuite, MuJoCo; it prints on import) loads in the recording workers only
        from libero.libero.envs.env_wrapper import ControlEnv

        # hard resets: the physics pass must see the fixtures where the render pass (and an evaluation) does
        cheap = ControlEnv(bddl_file_name=task.bddl_path, has_renderer=False, has_offscreen_renderer=False,
                           use_camera_obs=False, hard_reset=True)
    renderer: LiberoEnv | None = None
    policy = ExpertPolicy(place_tol=settings["place_tolerance"], funnel=settings["funnel"])
    rows = []
    try:
        for trial in trials:
            seed = episode_seed(suite, task_id, trial)
            t0 = time.perf_counter()
            seed_scene(settings["seeding"], cheap, task, trial, seed)
            policy.reset(f"{suite}/{task_id}/{trial}", seed)
            noise = None
            if settings["noise"] > 0:
                rng = np.random.default_rng([seed, settings["noise_seed"]])
                noise = OUNoise(settings["noise"], settings["noise_tau"], rng)
            success, actions, labels, sim_states = _expert_pass(
                cheap, policy, registry.init_state(suite, task_id, trial), max_steps, noise)
            expert_s = time.perf_counter() - t0
            row = {"suite": suite, "task_id": task_id, "trial": trial,
                   "split": "held_out" if trial in settings["held_out"] else "train", "success": success,
                   "steps": int(len(actions)), "frames": 0, "file": None, "expert_s": round(expert_s, 2),
                   "render_s": 0.0}
            if success:
                t1 = time.perf_counter()
                if renderer is None:  # hard resets: each trial's scene is the one its seeding gives an evaluation
                    renderer = LiberoEnv(task, EnvConfig(seeding=settings["seeding"]))
                frames, drift = _render_pass(renderer, seed, trial, actions, sim_states, settings["every"],
                                             settings["image_size"])
                row["replay_drift"] = drift
                if drift > MAX_REPLAY_DRIFT:  # the images would not show the states the labels belong to
                    row["dropped"] = f"replay drifted {drift:.3g} from the expert pass (> {MAX_REPLAY_DRIFT})"
                    logger.warning("%s/%s/%s not kept: %s", suite, task_id, trial, row["dropped"])
                    rows.append(row)
                    continue
                rel = episode_file(suite, task_id, trial)
                path = Path(out) / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npz")
                np.savez_compressed(tmp, actions=actions, labels=labels, sim_states=sim_states, prompt=np.array(task.language),
                                    **frames)
                os.replace(tmp, path)  # a file is either complete or absent
                row.update(frames=int(len(frames["frame_steps"])), file=rel,
                           render_s=round(time.perf_counter() - t1, 2))
            rows.append(row)
    finally:
        cheap.close()
        if renderer is not None:
            renderer.close()
    return rows


# --------------------------------------------------------------------------------------------------------
# Driver


def plan(settings: DemoSettings, done: set[tuple[str, int, int]], chunk: int) -> Iterator[tuple[str, int, list[int]]]:
    for suite, ids in settings.tasks.items():
        for task_id in ids:
            todo = [t for t in settings.trials if (suite, task_id, t) not in done]
            for i in range(0, len(todo), chunk):
                yield suite, task_id, todo[i:i + chunk]


def record_demos(settings: DemoSettings, out: str | Path, workers: int = 2, chunk: int = 10,
                 progress: bool = True) -> list[dict[str, Any]]:
    """Record every (task, trial) of `settings` not yet in `<out>/manifest.jsonl`; returns all rows."""
    out = Path(out)
    _prepare_out(out, settings)
    rows = read_manifest(out)
    done = {(r["suite"], r["task_id"], r["trial"]) for r in rows}
    units = list(plan(settings, done, chunk))
    total = sum(len(u[2]) for u in units)
    if not total:
        logger.info("all %d episodes already recorded in %s", len(done), out)
        return rows
    bar = tqdm(total=total, desc="record-demos", unit="ep", disable=not progress)
    cfg = settings.to_dict()
    ctx = multiprocessing.get_context("spawn")  # one EGL context per fresh process
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool, \
            (out / MANIFEST_FILE).open("a") as manifest:
        pending = {pool.submit(record_chunk, s, t, trials, cfg, str(out)) for s, t, trials in units}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                for row in fut.result():
                    manifest.write(json.dumps(row) + "\n")
                    manifest.flush()
                    rows.append(row)
                    bar.update(1)
                    bar.set_postfix(kept=sum(map(is_kept, rows)))
    bar.close()
    return rows


def summarize(rows: list[dict[str, Any]]) -> str:
    """A per-task table: episodes, kept (expert successes), frames, mean steps, recording seconds."""
    lines = [f"{'suite':<16}{'task':>5}{'split':>10}{'episodes':>10}{'kept':>6}{'frames':>8}{'steps':>7}"
             f"{'expert s':>10}{'render s':>10}"]
    keys = sorted({(r["suite"], r["task_id"], r["split"]) for r in rows})
    for suite, task_id, split in keys:
        sel = [r for r in rows if (r["suite"], r["task_id"], r["split"]) == (suite, task_id, split)]
        kept = [r for r in sel if is_kept(r)]
        lines.append(f"{suite:<16}{task_id:>5}{split:>10}{len(sel):>10}{len(kept):>6}"
                     f"{sum(r['frames'] for r in kept):>8}{np.mean([r['steps'] for r in kept] or [0]):>7.0f}"
                     f"{sum(r['expert_s'] for r in sel):>10.1f}{sum(r['render_s'] for r in sel):>10.1f}")
    return "\n".join(lines)
