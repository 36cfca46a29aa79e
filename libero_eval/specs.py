"""Typed records at the engine's boundaries: what to run (EpisodeSpec) and what happened (EpisodeResult)."""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
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
    repeat: int = 0  # repeat r of this (task, init state): its own env seed and noise stream, the same for every variant

    @property
    def seed(self) -> int:
        return episode_seed(self.suite, self.task_id, self.trial, self.repeat)

    @property
    def key(self) -> str:
        """Unique per (policy variant, suite, task, trial, repeat): the result store's primary key (repeat 0
        is not spelled out, so run directories from before repeats keep their keys)."""
        return f"{self.policy_label}/{self.suite}/task{self.task_id:02d}/trial{self.trial:02d}" + repeat_suffix(self.repeat, "/")

    @property
    def file_stem(self) -> str:
        return (f"{self.policy_label}__{self.suite}__task{self.task_id:02d}__trial{self.trial:02d}"
                + repeat_suffix(self.repeat, "__"))


def repeat_suffix(repeat: int, sep: str) -> str:
    return f"{sep}rep{repeat}" if repeat else ""


def pair_key(result) -> tuple[str, int, int, int]:
    """What pairs episodes across variants (and runs): the same task, init state and repeat, so the same
    scene and the same noise stream."""
    return result.suite, result.task_id, result.trial, getattr(result, "repeat", 0)


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
    env_stats: dict[str, Any] = dataclasses.field(default_factory=dict)  # seconds and counts; worker, replica, node
    policy: dict[str, Any] = dataclasses.field(default_factory=dict)
    attempt: int = 1
    finished_at: str = ""
    repeat: int = 0  # EpisodeSpec.repeat (absent in results from before repeats: 0)

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


def infra_error(spec: EpisodeSpec, reason: str, exc: BaseException, attempt: int) -> EpisodeResult:
    """The result of an attempt the infrastructure failed (`reason` one of store.INFRA_REASONS): retried."""
    return EpisodeResult(
        key=spec.key, suite=spec.suite, task_id=spec.task_id, task_name="", trial=spec.trial, repeat=spec.repeat,
        policy_label=spec.policy_label, seed=spec.seed, status="error", success=False, reason=reason, steps=0,
        wall_s=0.0, error=f"{type(exc).__name__}: {exc}", attempt=attempt,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
