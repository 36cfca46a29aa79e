"""What every cache policy shares: the frame it judges, the decision it returns, what it needs from the
model and what it gets back after the frame is computed (definitions: reference/cache_policies.md).

A policy only decides; what an episode remembers lives in its session (`policies/serving/pi05.py`) as a
`CacheState` value the policy makes and reads:
    state = policy.new_state()                  # at session open: the last full frame's K/V, images, maps
    decision = policy.decide(frame, state)      # cheap: images, state and stored maps only, no model call
    ... the engine computes the frame as decided (full / reuse / partial), batched with other sessions ...
    policy.update(frame, decision, outputs, state)   # store what the next decisions compare against
One policy object (config + model layout, validated once) serves every session of its variant. The stored
K/V and maps are values the engine hands over (a reused cache is read-only; the model never writes it).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from policies.pi05.configuration import CAMERA_NAMES, Pi05Config
from policies.pi05.stages import PrefixKV, TokenReuse

DECISIONS = ("full", "reuse", "partial")


class CachePolicyError(ValueError):
    """A cache policy that cannot be built: unknown name, unknown parameter or a bad value (named)."""


@dataclasses.dataclass(frozen=True)
class PrefixLayout:
    """Where things sit in the prefix of one model: camera slots of `tokens_per_camera` tokens, then text."""

    depth: int  # VLM layers
    num_tokens: int  # Tp
    num_cameras: int
    tokens_per_camera: int  # 256 = the 16x16 SigLIP grid
    grid: int  # 16
    patch_size: int  # 14 pixels
    image_size: int  # 224

    @classmethod
    def from_config(cls, config: Pi05Config) -> PrefixLayout:
        grid = config.vision.image_size // config.vision.patch_size
        return cls(depth=config.vlm.depth, num_tokens=config.num_prefix_tokens, num_cameras=config.num_cameras,
                   tokens_per_camera=config.vision.num_patches, grid=grid, patch_size=config.vision.patch_size,
                   image_size=config.vision.image_size)

    @property
    def text_start(self) -> int:
        return self.num_cameras * self.tokens_per_camera

    def camera_tokens(self, camera: int) -> tuple[int, int]:
        """[start, end) of camera slot `camera` (CAMERA_NAMES order)."""
        start = camera * self.tokens_per_camera
        return start, start + self.tokens_per_camera

    @staticmethod
    def camera_name(camera: int) -> str:
        return CAMERA_NAMES[camera]


@dataclasses.dataclass(frozen=True)
class Frame:
    """One query as a policy sees it before any model compute (already preprocessed by the engine)."""

    index: int  # inference index within the episode, 0-based
    images: Tensor  # [N_cam, 3, S, S] float32 model inputs in [-1, 1]
    image_mask: Tensor  # [N_cam] bool, False = empty camera slot (LIBERO's right wrist)
    state: np.ndarray  # [8] float32, normalised with the checkpoint's stats

    @property
    def cameras(self) -> list[int]:
        """Indices of the present camera slots (cam0, cam1, ... in signal names)."""
        return [int(i) for i in self.image_mask.nonzero().flatten()]


@dataclasses.dataclass(frozen=True)
class AttentionNeeds:
    """Attention statistics a frame's computation must return for the policy's `update`.

    Prefix maps are reduced on the fly (see signals.PrefixAttentionStats); action-expert maps come from
    one velocity evaluation (`denoise_eval`, negative counts from the end) of the denoising loop.
    """

    prefix_entropy: frozenset[int] = frozenset()  # VLM layers: head-averaged attention entropy
    prefix_relevance: frozenset[int] = frozenset()  # VLM layers: mean attention of text queries per key
    denoise_layers: frozenset[int] = frozenset()  # action-expert layers: action queries over prefix keys
    denoise_eval: int = -1

    @property
    def prefix(self) -> bool:
        return bool(self.prefix_entropy or self.prefix_relevance)

    @property
    def denoise(self) -> bool:
        return bool(self.denoise_layers)


NO_NEEDS = AttentionNeeds()


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to compute for a frame, and why.

    kind: full | reuse | partial. reason: a stable code (cache_policies.md); numbers go in `signals`
    (floats only) and `thresholds` ({signal name: threshold} for the signals that gated the decision).
    plan: the partial pass (TokenReuse) of a `partial` decision. extra: JSON-serialisable record additions.
    """

    kind: str
    reason: str
    signals: dict[str, float] = dataclasses.field(default_factory=dict)
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    needs: AttentionNeeds = NO_NEEDS
    plan: TokenReuse | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in DECISIONS:
            raise ValueError(f"decision kind {self.kind!r}: expected one of {DECISIONS}")
        if (self.kind == "partial") != (self.plan is not None):
            raise ValueError(f"a {self.kind!r} decision {'needs' if self.kind == 'partial' else 'takes no'} plan")


@dataclasses.dataclass(frozen=True)
class FrameOutputs:
    """What the engine computed for a frame, handed to `update` (batch-1 values owned by the session)."""

    prefix_kv: PrefixKV  # the K/V the frame's actions were denoised against (merged K/V for partial)
    prefix_mask: Tensor  # [1, Tp] bool
    prefix_entropy: dict[int, float] = dataclasses.field(default_factory=dict)  # layer -> entropy
    prefix_relevance: dict[int, Tensor] = dataclasses.field(default_factory=dict)  # layer -> [Tp]
    denoise_attention: dict[int, Tensor] = dataclasses.field(default_factory=dict)  # layer -> [H, H_act, Tp]


@dataclasses.dataclass
class CacheState:
    """One session's memory: the prefix K/V (and pad mask) that `reuse` frames denoise against. Policies
    extend it with what their decisions compare against (images, state, attention maps, counters)."""

    prefix_kv: PrefixKV | None = None
    prefix_mask: Tensor | None = None

    def reuse_kv(self) -> tuple[PrefixKV, Tensor]:
        """The stored K/V and pad mask a `reuse` decision denoises against."""
        if self.prefix_kv is None or self.prefix_mask is None:
            raise RuntimeError("reuse decided before any full frame was stored")
        return self.prefix_kv, self.prefix_mask

    def nbytes(self) -> int:
        """Memory held for the session (stored K/V, images and maps)."""
        return tensor_bytes(*(getattr(self, f.name) for f in dataclasses.fields(self)))


class CachePolicy(abc.ABC):
    """A cache policy's decisions for every session of one variant. Subclasses: one file each, with their
    config dataclass and their `CacheState` subclass beside them. Pi0.5 paths read the cameras."""

    name: ClassVar[str]
    needs_images: ClassVar[bool] = True
    needs_privileged: ClassVar[bool] = False
    needs: AttentionNeeds = NO_NEEDS  # attention a frame's computation returns for `update`

    def __init__(self, layout: PrefixLayout) -> None:
        self.layout = layout

    def new_state(self) -> CacheState:
        return CacheState()

    @abc.abstractmethod
    def decide(self, frame: Frame, state: CacheState) -> Decision: ...

    @abc.abstractmethod
    def update(self, frame: Frame, decision: Decision, outputs: FrameOutputs, state: CacheState) -> None: ...


def tensor_bytes(*values: Any) -> int:
    """Bytes of the tensors / PrefixKVs among `values`, looking into tuples and dicts (None skipped)."""
    total = 0
    for v in values:
        if isinstance(v, PrefixKV):
            total += v.nbytes
        elif isinstance(v, Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (tuple, list)):
            total += tensor_bytes(*v)
        elif isinstance(v, dict):
            total += tensor_bytes(*v.values())
    return total


class LastFullPolicy(CachePolicy):
    """A policy whose reuse frames denoise against the prefix K/V of the last full frame."""

    def update(self, frame: Frame, decision: Decision, outputs: FrameOutputs, state: CacheState) -> None:
        if decision.kind == "full":
            state.prefix_kv, state.prefix_mask = outputs.prefix_kv, outputs.prefix_mask
