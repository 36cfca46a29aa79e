"""`adaptive` (FlashRT PR #48, closed unmerged): fixed_window plus a pixel-MAE forced refresh.

pixel_mae = max over cameras of mean |img_t - img_last_full| on the 224x224 uint8 model inputs (0..255).
A frame inside a window is forced full when pixel_mae >= threshold (6.5, the PR's default; 6.0-7.0 was
stable on its 30-frame sample), and a forced full restarts the window. Known: offline cos_min 0.123 ->
0.435 for N=3; in closed loop 21/30 but a refresh on 834 of 867 frames, i.e. no speedup. Threshold 0
forces every frame full (the plain model).
"""
from __future__ import annotations

import dataclasses

from torch import Tensor

from policies.cache.base import Decision, Frame, FrameOutputs, PrefixLayout
from policies.cache.fixed_window import FixedWindowPolicy, FixedWindowState, check_window
from policies.cache.signals import pixel_mae


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """window: N (default 3, the PR's adaptive_cache3); pixel_mae: the forced-refresh threshold."""

    window: int = 3
    pixel_mae: float = 6.5

    def __post_init__(self) -> None:
        check_window(self.window)
        if not 0.0 <= self.pixel_mae <= 255.0:
            raise ValueError(f"pixel_mae threshold must be in [0, 255] (uint8 units), got {self.pixel_mae!r}")


@dataclasses.dataclass
class AdaptiveState(FixedWindowState):
    full_images: Tensor | None = None  # [N_cam, 3, S, S] model inputs of the last full frame


class AdaptivePolicy(FixedWindowPolicy):
    """Reasons: first_frame, scheduled, pixel_mae (forced refresh), window. The images compared against
    are the last full frame's; pixel_mae is recorded on every frame after the first."""

    name = "adaptive"
    FULL_EVERY_FRAME = {"pixel_mae": 0.0}  # pixel_mae >= 0 always refreshes: every frame computed

    def __init__(self, layout: PrefixLayout, config: AdaptiveConfig | None = None) -> None:
        super().__init__(layout, config or AdaptiveConfig())

    def new_state(self) -> AdaptiveState:
        return AdaptiveState()

    def decide(self, frame: Frame, state: AdaptiveState) -> Decision:
        if state.full_images is None:
            return super().decide(frame, state)
        signals = {"pixel_mae": max(pixel_mae(frame.images, state.full_images, frame.cameras))}
        thresholds = {"pixel_mae": self.config.pixel_mae}
        if self.window_start(state):
            return self.decision(state, "full", "scheduled", signals, thresholds)
        if signals["pixel_mae"] >= self.config.pixel_mae:
            return self.decision(state, "full", "pixel_mae", signals, thresholds)
        return self.decision(state, "reuse", "window", signals, thresholds)

    def update(self, frame: Frame, decision: Decision, outputs: FrameOutputs, state: AdaptiveState) -> None:
        super().update(frame, decision, outputs, state)
        if decision.kind == "full":
            state.full_images = frame.images
