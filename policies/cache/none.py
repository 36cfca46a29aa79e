"""`none`: the baseline. Every frame runs vision, the prefix and the denoising loop.

The prefix K/V is computed once per frame and read by all of its denoising steps: that is standard
Pi0.5, not a cache policy. Nothing is stored between frames.
"""
from __future__ import annotations

import dataclasses

from policies.cache.base import CachePolicy, CacheState, Decision, Frame, FrameOutputs, PrefixLayout


@dataclasses.dataclass(frozen=True)
class NoneConfig:
    """No parameters (the denoising knobs apply to every policy and live in the engine)."""


class NonePolicy(CachePolicy):
    name = "none"

    def __init__(self, layout: PrefixLayout, config: NoneConfig | None = None) -> None:
        self.config = config or NoneConfig()
        super().__init__(layout)

    def decide(self, frame: Frame, state: CacheState) -> Decision:
        return Decision("full", "baseline")

    def update(self, frame: Frame, decision: Decision, outputs: FrameOutputs, state: CacheState) -> None:
        pass
