"""The Policy interface: what the episode loop calls, and what every policy returns per inference.

Observation contract (built by `tasks.protocol`, openpi's LIBERO client keys):
    "observation/image"        uint8 [224, 224, 3]  agentview, rotated 180 degrees, resized with pad
    "observation/wrist_image"  uint8 [224, 224, 3]  eye-in-hand camera, same processing
    "observation/state"        float32 [8]          eef pos (3), axis-angle (3), gripper qpos (2)
    "prompt"                   str                  the task's language instruction
    "privileged"               dict (optional)      simulator state for oracle policies only; learned
                                                    policies must never read it
    "env_step"                 int                  the env step of this query (realtime chunking reads it
                                                    to know how much of the executing chunk is left)
Actions: float32 [H, 7] (6-d delta end-effector pose + gripper, -1 open / +1 close), sent raw to the env.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any

import numpy as np

IMAGE_KEY = "observation/image"
WRIST_IMAGE_KEY = "observation/wrist_image"
STATE_KEY = "observation/state"
PROMPT_KEY = "prompt"
PRIVILEGED_KEY = "privileged"
STEP_KEY = "env_step"

ACTION_DIM = 7


class PolicyError(RuntimeError):
    """A policy could not produce an action (bad checkpoint, bad observation, internal failure)."""


@dataclasses.dataclass
class InferenceRecord:
    """What happened in one policy query: the decision, why, the signals behind it and what it cost.

    `decision` is one of full | reuse | partial | expert | fixed (policies without a model say what they
    are). `reason` is a stable code (see reference/cache_policies.md); numbers go in `signals`.
    """

    index: int  # inference index within the episode, 0-based
    decision: str
    reason: str
    signals: dict[str, float] = dataclasses.field(default_factory=dict)
    latency_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ActionChunk:
    actions: np.ndarray  # float32 [H, 7]
    record: InferenceRecord

    def __post_init__(self) -> None:
        self.actions = np.asarray(self.actions, dtype=np.float32)
        if self.actions.ndim != 2 or self.actions.shape[1] != ACTION_DIM:
            raise PolicyError(f"action chunk must have shape [H, {ACTION_DIM}], got {self.actions.shape}")


class Policy(abc.ABC):
    """One policy serving one episode at a time (the Ray policy actor multiplexes sessions later).

    `reset(episode_id, seed)` starts an episode; `seed` depends only on (suite, task, trial), so a policy
    that samples noise derives it from (seed, inference index) and runs are paired across cache policies.
    """

    name: str = "policy"
    # What the episode loop must build for this policy: camera images cost renders (skipped when False);
    # the privileged simulator state is only for oracles (tasks.privileged).
    needs_images: bool = True
    needs_privileged: bool = False

    @abc.abstractmethod
    def reset(self, episode_id: str, seed: int) -> None: ...

    @abc.abstractmethod
    def infer(self, observation: dict[str, Any]) -> ActionChunk: ...

    def end_episode(self, episode_id: str) -> None:
        """Free per-episode state. Default: nothing to free."""

    def describe(self) -> dict[str, Any]:
        """Parameters that identify this policy in results (label, checkpoint, cache settings)."""
        return {"name": self.name}
