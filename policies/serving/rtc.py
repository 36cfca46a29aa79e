"""A session's side of real-time chunking: the chunk being executed, held as a value (like the prefix K/V),
and the guidance of the next query towards it (the math: policies/pi05/rtc.py).

Realtime execution (libero_eval/execution.py) issues a query only once the previous chunk has arrived, so
when query k+1 is issued at env step s, the robot is executing chunk k, issued at step s_k: its leftover is
chunk_k[s - s_k:] (none once the robot ran past its end). The new chunk arrives d steps later and is
executed from its index d, so its first d actions must agree with the leftover's (weight 1), and the rest
of the overlap is pulled towards it with decaying weights. d is this frame's own delay under the variant's
latency model (`RealtimeClock`), known before denoising because a frame's cost depends only on what it
runs (its decision and whether it is guided); the rollout worker computes the same d from the record.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from policies.base import ACTION_DIM, STEP_KEY, PolicyError
from policies.pi05.rtc import Guidance, prefix_weights
from policies.serving.latency import RealtimeClock
from policies.serving.variants import RTCSettings


@dataclasses.dataclass
class ChunkInFlight:
    """The last chunk a session returned, in the model's normalised action space, and its query's env step."""

    actions: Tensor  # [H, A]
    issued: int


@dataclasses.dataclass(frozen=True)
class GuidancePlan:
    """What one RTC query is guided towards (None guidance: nothing left to inpaint, e.g. the first query)."""

    step: int  # env step of this query
    delay: int  # env steps until its chunk arrives
    leftover: int  # actions of the executing chunk not yet executed at `step`
    guided_actions: int  # the overlap that gets weights: min(rtc_horizon, leftover)
    guidance: Guidance | None

    def describe(self) -> dict[str, Any]:
        return {"guided": self.guidance is not None, "delay_steps": self.delay, "leftover": self.leftover,
                "guided_actions": self.guided_actions}


def query_step(observation: dict[str, Any]) -> int:
    step = observation.get(STEP_KEY)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise PolicyError(f"execution rtc needs each query's env step in observation[{STEP_KEY!r}] (an integer "
                          f">= 0), got {step!r}")
    return step


def leftover(chunk: ChunkInFlight | None, step: int) -> Tensor | None:
    """The executing chunk's actions from `step` on ([L, A]), or None when there are none."""
    if chunk is None:
        return None
    offset = step - chunk.issued
    if offset < 0:
        raise PolicyError(f"query at env step {step} precedes the previous query's step {chunk.issued}")
    return chunk.actions[offset:] if offset < len(chunk.actions) else None


def plan_guidance(settings: RTCSettings, chunk: ChunkInFlight | None, step: int, delay_of: Any,
                  horizon: int, action_dim: int) -> GuidancePlan:
    """The guidance of a query at `step`; `delay_of(guided)` is the frame's delay in env steps (its cost
    depends on whether it is guided)."""
    left = leftover(chunk, step)
    if left is None:
        return GuidancePlan(step, delay_of(False), 0, 0, None)
    delay = delay_of(True)
    end = min(settings.rtc_horizon, len(left))
    target = torch.zeros(1, horizon, action_dim, dtype=left.dtype, device=left.device)
    # LeRobot guides towards the robot's (unpadded) actions, zero-padded back to the model's width
    target[0, : len(left), :ACTION_DIM] = left[:horizon, :ACTION_DIM]
    weights = prefix_weights(settings.rtc_schedule, delay, end, horizon).to(left.device)[None, :, None]
    guidance = Guidance(target, weights.to(left.dtype), settings.rtc_max_guidance, settings.rtc_jacobian)
    return GuidancePlan(step, delay, len(left), end, guidance)


def clock_delay(clock: RealtimeClock | None, label: str):
    """`delay_of` for a session's clock (an RTC session must have one)."""
    if clock is None:
        raise PolicyError(f"policy {label!r}: execution rtc needs a realtime clock (its latency profile and the "
                          "env's control rate) when its session is opened")
    return clock.delay_steps


def frozen_deviation(actions: Tensor, plan: GuidancePlan) -> float | None:
    """How far the new chunk's first `delay` actions (the ones the robot never executes: it runs the old
    chunk's meanwhile) are from the leftover's: max |difference| over the robot's action dimensions, in
    normalised units. None when unguided or d = 0."""
    if plan.guidance is None or plan.delay == 0:
        return None
    n = min(plan.delay, plan.leftover)
    target = plan.guidance.target[0, :n, :ACTION_DIM].to(actions.device)
    return float((actions[:n, :ACTION_DIM].float() - target.float()).abs().max())
