"""Policies without a model: for smoke runs and tests of the harness itself."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from policies.base import ACTION_DIM, ActionChunk, InferenceRecord, Policy


@dataclasses.dataclass(frozen=True)
class HoldConfig:
    horizon: int = 10  # actions per chunk


class HoldPolicy(Policy):
    """Holds still with the gripper open: zero delta pose, gripper -1. Succeeds only if the scene does."""

    name = "hold"
    needs_images = False

    def __init__(self, horizon: int = 10):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.horizon = horizon
        self._index = 0

    def reset(self, episode_id: str, seed: int) -> None:
        self._index = 0

    def infer(self, observation: dict[str, Any]) -> ActionChunk:
        actions = np.zeros((self.horizon, ACTION_DIM), dtype=np.float32)
        actions[:, -1] = -1.0
        record = InferenceRecord(index=self._index, decision="fixed", reason="hold")
        self._index += 1
        return ActionChunk(actions, record)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "horizon": self.horizon}
