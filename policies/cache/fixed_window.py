"""`fixed_window` (FlashRT `cache_frames=N`): a full frame, then N-1 frames that reuse its prefix K/V.

Frames are counted k = 1, 2, ... within an episode; frame k is full when (k - 1) mod N == 0 (frames 1,
N+1, 2N+1, ...). The other frames skip vision and the prefix entirely and denoise, with their own fresh
noise, against the whole prefix K/V of the last full frame: its images and prompt are stale together.
N = 1 is the baseline. Known result (FlashRT, libero_spatial, 30 episodes): N=1 24/30, N=2 22/30,
N=3 11/30; offline action cosine vs full, N=3: mean 0.961 but min 0.123 (the "cosine cliff").
"""
from __future__ import annotations

import dataclasses

from policies.cache.base import CacheState, Decision, Frame, FrameOutputs, LastFullPolicy, PrefixLayout


def check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (frames per full frame), got {window!r}")


@dataclasses.dataclass(frozen=True)
class FixedWindowConfig:
    """window: N of FlashRT's cache=N (default 2, the mildest reuse FlashRT measured)."""

    window: int = 2

    def __post_init__(self) -> None:
        check_window(self.window)


@dataclasses.dataclass
class FixedWindowState(CacheState):
    frames_in_window: int = 0  # frames served since (and including) the last full frame


class FixedWindowPolicy(LastFullPolicy):
    """Reasons: first_frame (frame 1), scheduled (a window start), window (reuse inside a window).

    `frames_in_window` counts the frames served since (and including) the last full frame, so a full frame
    restarts the count; subclasses that force a full frame restart the window by the same rule.
    """

    name = "fixed_window"

    def __init__(self, layout: PrefixLayout, config: FixedWindowConfig | None = None) -> None:
        self.config = config or FixedWindowConfig()
        super().__init__(layout)

    def new_state(self) -> FixedWindowState:
        return FixedWindowState()

    def window_start(self, state: FixedWindowState) -> bool:
        """Whether the next frame k satisfies (k - 1) mod N == 0 (k counted from the window's full frame)."""
        return state.frames_in_window % self.config.window == 0

    @staticmethod
    def decision(state: FixedWindowState, kind: str, reason: str, signals=None, thresholds=None) -> Decision:
        """A decision recording the frame's position in its window (1 = the full frame)."""
        position = 1 if kind == "full" else state.frames_in_window + 1
        return Decision(kind, reason, signals or {}, thresholds or {}, extra={"window_position": position})

    def decide(self, frame: Frame, state: FixedWindowState) -> Decision:
        if state.prefix_kv is None:
            return self.decision(state, "full", "first_frame")
        if self.window_start(state):
            return self.decision(state, "full", "scheduled")
        return self.decision(state, "reuse", "window")

    def update(self, frame: Frame, decision: Decision, outputs: FrameOutputs, state: FixedWindowState) -> None:
        super().update(frame, decision, outputs, state)
        state.frames_in_window = 1 if decision.kind == "full" else state.frames_in_window + 1
