"""Typed records at the engine's boundaries: what to run (EpisodeSpec) and what happened (EpisodeResult)."""
from __future__ import annotations

import dataclasses
from typing import Any

from libero_eval.seeding import episode_seed

STATUSES = ("success", "failure", "error")


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    suite: str
    task_id: int
    trial: int  # index of the init state, 0..49
    policy_label: str  # names the policy variant (cache policy + parameters) in results, videos, W&B
    max_steps: int  # policy actions, settle steps not counted

    @property
    def seed(self) -> int:
        return episode_seed(self.suite, self.task_id, self.trial)

    @property
    def key(self) -> str:
        """Unique per (policy variant, suite, task, trial): the result store's primary key."""
        return f"{self.policy_label}/{self.suite}/task{self.task_id:02d}/trial{self.trial:02d}"

    @property
    def file_stem(self) -> str:
        return f"{self.policy_label}__{self.suite}__task{self.task_id:02d}__trial{self.trial:02d}"


@dataclasses.dataclass
class EpisodeResult:
    key: str
    suite: str
    task_id: int
    task_name: str
    trial: int
    policy_label: str
    seed: int
    status: str  # success | failure | error
    success: bool
    reason: str  # success: "done"; failure: "max_steps" | "env_exception"; error: "policy_error" | "env_error" | ...
    steps: int  # policy actions executed
    wall_s: float
    error: str | None = None  # "ExceptionType: message" for failures by exception and for errors
    video: str | None = None  # path relative to the run directory
    video_frames: int = 0
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one per inference
    env_stats: dict[str, float] = dataclasses.field(default_factory=dict)
    policy: dict[str, Any] = dataclasses.field(default_factory=dict)
    attempt: int = 1
    finished_at: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.success != (self.status == "success"):
            raise ValueError(f"success={self.success} contradicts status={self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EpisodeResult":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
