"""Test helpers: scripted policies and sim-state edits (test doubles never used by the shipped path), and
reading a run directory's stored results."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from policies.base import ActionChunk, InferenceRecord, Policy


class ScriptedPolicy(Policy):
    """Returns chunks cut from a fixed action sequence; optionally runs a hook on each query."""

    name = "scripted"

    def __init__(self, actions: np.ndarray, horizon: int = 10, on_query=None):
        self.actions = np.asarray(actions, dtype=np.float32)
        self.horizon = horizon
        self.on_query = on_query
        self.cursor = 0
        self.index = 0
        self.observations: list[dict] = []

    def reset(self, episode_id: str, seed: int) -> None:
        self.cursor = 0
        self.index = 0
        self.observations = []

    def infer(self, observation):
        self.observations.append(observation)
        if self.on_query is not None:
            self.on_query(self.index)
        chunk = self.actions[self.cursor : self.cursor + self.horizon]
        if len(chunk) < self.horizon:
            pad = np.zeros((self.horizon - len(chunk), 7), dtype=np.float32)
            pad[:, -1] = -1
            chunk = np.concatenate([chunk, pad])
        record = InferenceRecord(index=self.index, decision="full", reason="scripted")
        self.index += 1
        return ActionChunk(chunk, record)

    def advance(self, n: int) -> None:
        self.cursor += n


class ReplanScripted(ScriptedPolicy):
    """Scripted actions that stay aligned with env steps when only `replan` actions per chunk run."""

    def __init__(self, actions, replan: int = 5, **kw):
        super().__init__(actions, **kw)
        self.replan = replan

    def infer(self, observation):
        out = super().infer(observation)
        self.cursor += self.replan
        return out


class CrashingPolicy(Policy):
    name = "crashing"

    def reset(self, episode_id, seed):
        pass

    def infer(self, observation):
        raise RuntimeError("deliberate policy crash")


def read_results(run_dir) -> list[dict]:
    """The stored result lines of a run directory (results.jsonl), as dicts, in file order."""
    text = (Path(run_dir) / "results.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def random_actions(n: int, seed: int = 0, scale: float = 0.4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    actions = np.clip(rng.normal(0.0, scale, size=(n, 7)), -1, 1)
    actions[:, -1] = np.where(np.arange(n) % 40 < 20, -1.0, 1.0)  # open/close the gripper now and then
    return actions.astype(np.float32)


def place_on(env, obj: str, target: str, lift: float = 0.03) -> None:
    """Teleport free-jointed `obj` above the centre of `target` (bodies `<name>_main`), at rest."""
    sim = env.sim
    m = sim.model
    adr = m.get_joint_qpos_addr(f"{obj}_joint0")[0]
    target_pos = sim.data.body_xpos[m.body_name2id(f"{target}_main")]
    sim.data.qpos[adr : adr + 2] = target_pos[:2]
    sim.data.qpos[adr + 2] = target_pos[2] + lift
    sim.data.qvel[:] = 0
    sim.forward()


def set_joint_to_limit(env, joint: str, which: int) -> None:
    sim = env.sim
    m = sim.model
    jid = m.joint_name2id(joint)
    sim.data.qpos[m.jnt_qposadr[jid]] = m.jnt_range[jid][which]
    sim.forward()
