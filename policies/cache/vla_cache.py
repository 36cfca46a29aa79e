"""`vla_cache` (seed 000; VLA-Cache, arXiv 2502.02175, repo siyuhsu/vla-cache): token-level K/V reuse.

Compared against the PREVIOUS frame and the running per-layer K/V cache its computation left behind:
  1. static patches, per camera: cosine similarity of raw 14x14 pixel patches (the 16x16 SigLIP token
     grid) >= 0.996; at most the 150 most similar;
  2. task relevance: the previous frame's attention of the text tokens over each camera's tokens at one
     VLM layer (head-averaged), normalised per camera; the seed keeps static patches with importance
     < 0.001 (at most 120, least important first); `relevance: top_k` is the repo's rule instead (evict the
     120 most-attended patches of the camera from the static set);
  3. layer schedule: per-layer attention entropy of the previous frame (every layer but the last),
     reuse = 1 - min-max normalised entropy, rises damped by growth factor 0.55;
  4. reuse, with the repo's semantics: at each pruning layer l the first max(1, int(reuse[l] * n)) of the
     n reusable tokens are dropped from the hidden states; the dropped set only grows with depth; a dropped
     token is never recomputed deeper, its K/V there come from the running cache (so they can be several
     frames old: ages are recorded), and the recomputed tokens attend to the merged K/V. Vision runs in
     full (the repo's too); the compute saved is proportional to the token-layers dropped.
Scaled to the token grid: the seed's and repo's counts are for SigLIP's 256 tokens per camera; here they
are fractions of the model's tokens per camera (`static_fraction` 150/256, `relevance_fraction` 120/256)
and the importance threshold is a share of the uniform attention 1/tokens_per_camera (`importance_share`
0.256 = 0.001 x 256). On a 256-token grid that is exactly 150, 120 and 0.001; on the shipped small model's
49 tokens per camera it is 29, 23 and 0.0052 (0.001 there sat far below the uniform 0.02 and nothing ever
passed). `static_top_k`, `relevance_top_k`, `importance_threshold` set absolute values instead.
The default relevance rule is the repo's (`relevance: top_k`: evict the relevance_fraction most-attended
tokens of each camera), not seed 000's threshold: on the shipped small model the text-to-vision attention
is nearly flat (every token held 0.53-1.52x the uniform share, measured on two held-out episodes), so no
token falls under the seed's 0.256x and `threshold` never reuses there; the repo's rule is scale-free and
reuses (replay: 98% partial frames, 10.6% of the prefix compute skipped). `relevance: threshold` remains
seed 000's rule, as written.
Layer schedules (`layer_schedule`):
  * repo (default): the reference repository's, as above: entropy of every layer but the last, reuse =
    1 - min-max normalised entropy with damped rises, applied at the pruning layers; relevance at the
    repo's layer 15 of 32 scaled to the depth;
  * seed_000: seed 000 Phase 3 as written: min-max normalised entropy of every layer, reuse = entropy x g +
    0.5 x (1 - g) (higher entropy -> more reuse) clamped to [0.3, 0.95], applied at every layer from 1
    (layer 0 computes every token: the running cache starts there); relevance from the last layer.
Choices beyond seed and repo (the issue's "record any further choice"):
  * pruning layers (repo schedule) default to the repo's [2, 6, 9, 11] of OpenVLA's 32 scaled to the model
    depth (round(l * depth / 32), at least 1): [1, 3, 5, 6] for Pi0.5's 18;
  * the reusable tokens of all cameras are ordered by ascending importance (least task-relevant dropped
    first), where the repo drops in token order;
  * the entropy averages only valid query tokens (padding rows are uniform by the mask), and over the
    recomputed tokens in a partial pass (the others have no query there); a pruning layer at the last layer
    takes the last scheduled proportion;
  * only present cameras' tokens are candidates; text and empty camera slots are always recomputed;
  * a frame whose camera set differs from the previous frame's is full (`camera_change`): the cached
    post-RoPE keys would sit at other positions;
  * a frame with static patches but none left after the relevance filter is full (`no_reusable_patches`).
Pi0.5's prefix attention is bidirectional (OpenVLA's is causal): stale tokens influence fresh ones both
ways, which the shadow deviation makes visible.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from policies.cache.base import (
    AttentionNeeds,
    CachePolicy,
    CacheState,
    Decision,
    Frame,
    FrameOutputs,
    PrefixLayout,
    tensor_bytes,
)
from policies.cache.signals import (
    patch_cosine,
    patch_pixels,
    reuse_schedule,
    scaled_layers,
    seed_reuse_schedule,
    static_patches,
)
from policies.pi05.stages import TokenReuse

RELEVANCE_MODES = ("threshold", "top_k")
LAYER_SCHEDULES = ("repo", "seed_000")
REPO_TOKENS = 256  # SigLIP's 16x16 tokens per camera: the grid the seed's and repo's counts are for
SEED_REUSE_RANGE = (0.3, 0.95)  # seed 000 Phase 3's clamp
REPO_DEPTH = 32  # OpenVLA's Llama-2 layers, the repo's frame of reference
REPO_PRUNING_LAYERS = [2, 6, 9, 11]
REPO_RELEVANCE_LAYER = 15


def parse_layers(text: str) -> list[int]:
    """'1,3,5,6' -> [1, 3, 5, 6] ('' -> [])."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"pruning_layers must be comma-separated integers like '1,3,5,6', got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class VlaCacheConfig:
    """Defaults: seed 000's VLACacheManager (0.996, 150 and 120 of 256 tokens, 0.001 of 256 tokens' attention,
    0.55) scaled to the model's tokens per camera, the repo's relevance rule and the repo's layers."""

    similarity: float = 0.996
    static_fraction: float = 150 / REPO_TOKENS  # per camera, of its tokens
    static_top_k: int | None = None  # an absolute count instead
    relevance: str = "top_k"  # top_k (repo; the default, module docstring) | threshold (seed 000)
    importance_share: float = 0.001 * REPO_TOKENS  # the threshold, in units of the uniform share 1/tokens
    importance_threshold: float | None = None  # an absolute threshold instead
    relevance_fraction: float = 120 / REPO_TOKENS  # per camera: kept at most (threshold) / evicted (top_k)
    relevance_top_k: int | None = None  # an absolute count instead
    relevance_layer: int | None = None  # None: repo: its 15 of 32 scaled to the depth; seed_000: the last
    layer_schedule: str = "repo"  # repo | seed_000 (module docstring)
    growth_factor: float = 0.55
    pruning_layers: str = ""  # '' : repo: its [2, 6, 9, 11] of 32 scaled to the depth; seed_000: every layer
    reuse_proportion: float | None = None  # None: the entropy schedule; a number: that proportion everywhere

    def __post_init__(self) -> None:
        if not -1.0 <= self.similarity <= 1.0:
            raise ValueError(f"similarity must be a cosine in [-1, 1], got {self.similarity!r}")
        for name in ("static_top_k", "relevance_top_k"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("static_fraction", "relevance_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a fraction of the tokens per camera in [0, 1], got "
                                 f"{getattr(self, name)!r}")
        if self.relevance not in RELEVANCE_MODES:
            raise ValueError(f"relevance {self.relevance!r}: expected one of {RELEVANCE_MODES}")
        if self.layer_schedule not in LAYER_SCHEDULES:
            raise ValueError(f"layer_schedule {self.layer_schedule!r}: expected one of {', '.join(LAYER_SCHEDULES)}")
        if self.importance_threshold is not None and not 0.0 <= self.importance_threshold <= 1.0:
            raise ValueError(f"importance_threshold must be in [0, 1], got {self.importance_threshold!r}")
        if self.importance_share < 0:
            raise ValueError(f"importance_share must be >= 0, got {self.importance_share!r}")
        if not 0.0 <= self.growth_factor <= 1.0:
            raise ValueError(f"growth_factor must be in [0, 1], got {self.growth_factor!r}")
        if self.reuse_proportion is not None and not 0.0 <= self.reuse_proportion <= 1.0:
            raise ValueError(f"reuse_proportion must be in [0, 1] or null, got {self.reuse_proportion!r}")
        if self.relevance_layer is not None and self.relevance_layer < 0:
            raise ValueError(f"relevance_layer must be >= 0, got {self.relevance_layer!r}")
        if any(layer < 1 for layer in parse_layers(self.pruning_layers)):
            raise ValueError(f"pruning_layers must be >= 1 (layer 0 always computes every token), "
                             f"got {self.pruning_layers!r}")


@dataclasses.dataclass
class VlaCacheState(CacheState):
    """The previous frame: its images and patch pixels, the running per-layer K/V its computation left
    (`prefix_kv`, batch 1), the age of every (layer, token) K/V and its attention statistics."""

    prev_images: Tensor | None = None  # [N_cam, 3, S, S]
    prev_block: tuple[int, int] | None = None  # camera slots [start, end) of `prev_pixels`
    prev_pixels: tuple[Tensor, Tensor] | None = None  # `patch_pixels` of those slots
    frame_pixels: tuple[int, tuple[int, int], tuple[Tensor, Tensor]] | None = None  # from `decide`
    buffers: tuple[Tensor, Tensor] | None = None  # pixels of this frame / of the previous one
    scratch: tuple[Tensor, Tensor] | None = None  # products and channel sums
    ages: Tensor | None = None  # [L, Tp] int32: frames since each (layer, token) K/V was computed
    entropy: Tensor | None = None  # [L - 1] of the previous frame
    relevance: Tensor | None = None  # [Tp] text-query attention per key, previous frame
    prev_cameras: tuple[int, ...] | None = None  # the previous frame's present camera slots

    def nbytes(self) -> int:  # prev_pixels / frame_pixels are views into `buffers`
        return tensor_bytes(self.prev_images, self.buffers, self.scratch, self.prefix_kv, self.ages, self.entropy,
                            self.relevance)


class VlaCachePolicy(CachePolicy):
    """Reasons: first_frame, camera_change, no_static_patches, no_reusable_patches (full); static_patches
    (partial)."""

    name = "vla_cache"

    def __init__(self, layout: PrefixLayout, config: VlaCacheConfig | None = None) -> None:
        self.config = config = config or VlaCacheConfig()
        depth, per_camera = layout.depth, layout.tokens_per_camera
        seed = config.layer_schedule == "seed_000"
        self.static_top_k = (config.static_top_k if config.static_top_k is not None
                             else round(config.static_fraction * per_camera))
        self.relevance_top_k = (config.relevance_top_k if config.relevance_top_k is not None
                                else round(config.relevance_fraction * per_camera))
        self.importance_threshold = (config.importance_threshold if config.importance_threshold is not None
                                     else config.importance_share / per_camera)
        default_pruning = list(range(1, depth)) if seed else scaled_layers(REPO_PRUNING_LAYERS, REPO_DEPTH, depth)
        self.pruning_layers = parse_layers(config.pruning_layers) or default_pruning
        bad = [layer for layer in self.pruning_layers if layer >= depth]
        if bad:
            raise ValueError(f"pruning_layers {bad} out of range for a model of depth {depth} (valid 1..{depth - 1})")
        default_relevance = depth - 1 if seed else scaled_layers([REPO_RELEVANCE_LAYER], REPO_DEPTH, depth)[0]
        self.relevance_layer = config.relevance_layer if config.relevance_layer is not None else default_relevance
        if self.relevance_layer >= depth:
            raise ValueError(f"relevance_layer {self.relevance_layer} out of range for depth {depth}")
        # the repo's entropy skips the last layer ([:-1]); seed 000 takes every layer
        self.entropy_layers = list(range(depth)) if seed else list(range(max(1, depth - 1)))
        self.needs = AttentionNeeds(prefix_entropy=frozenset(self.entropy_layers),
                                    prefix_relevance=frozenset({self.relevance_layer}))
        super().__init__(layout)

    def new_state(self) -> VlaCacheState:
        return VlaCacheState()

    # ---- decision

    def decide(self, frame: Frame, state: VlaCacheState) -> Decision:
        if state.prev_images is None or state.prefix_kv is None or state.relevance is None or state.entropy is None:
            return Decision("full", "first_frame", needs=self.needs)
        cams = frame.cameras
        if state.prev_cameras != tuple(cams):  # stale post-RoPE keys would sit at other positions
            return Decision("full", "camera_change", needs=self.needs)
        per_camera = self.layout.tokens_per_camera
        block = (cams[0], cams[-1] + 1)  # the present slots as one view (LIBERO: 0, 1): no copies per frame
        pixels = self.block_pixels(frame.images, block, state)
        state.frame_pixels = (frame.index, block, pixels)  # kept as the next frame's reference by `update`
        previous = (state.prev_pixels if state.prev_block == block  # else the camera mask changed: measure again
                    else patch_pixels(state.prev_images[block[0] : block[1]], self.layout.patch_size))
        similarity = patch_cosine(pixels, previous, self.layout.patch_size, state.scratch)  # [slots in block, P]
        rows = similarity[[cam - block[0] for cam in cams]]  # [N_present, P]
        statics = [static_patches(row, self.config.similarity, self.static_top_k) for row in rows]
        n_vision = len(cams) * per_camera
        # static_ratio counts every patch above the threshold (before the top-k cap), as the seed's V1 check
        signals = {"static_ratio": int((rows >= self.config.similarity).sum()) / n_vision}
        if not any(len(s) for s in statics):
            return Decision("full", "no_static_patches", signals, needs=self.needs)
        tokens, importance = self.reusable(cams, statics, state.relevance)
        signals["reusable_ratio"] = len(tokens) / n_vision
        if not len(tokens):
            return Decision("full", "no_reusable_patches", signals, needs=self.needs)
        ordered = tokens[torch.argsort(importance, stable=True)]  # least task-relevant first
        plan, dropped = self.plan(ordered, state)
        ages = torch.cat([state.ages[layer, ordered[:n]] + 1 for layer, n in enumerate(dropped) if n])
        extra = {
            "per_layer_reuse": [n / self.layout.num_tokens for n in dropped],
            "tokens_per_layer": plan.tokens_per_layer(self.layout.num_tokens),
            "token_age_mean": float(ages.float().mean()),
            "token_age_max": int(ages.max()),
        }
        return Decision("partial", "static_patches", signals, needs=self.needs, plan=plan, extra=extra)

    def block_pixels(self, images: Tensor, block: tuple[int, int], state: VlaCacheState) -> tuple[Tensor, Tensor]:
        """`patch_pixels` of the slots `block`, written into whichever of two buffers does not hold the
        previous frame's pixels (no megabyte allocations per frame)."""
        x = images[block[0] : block[1]]
        if state.buffers is None or state.buffers[0].shape != x.shape:
            state.buffers = (torch.empty_like(x), torch.empty_like(x))
            state.scratch = (torch.empty_like(x), torch.empty_like(x[:, :1]))
        held = state.prev_pixels[0] if state.prev_pixels is not None else None
        free = state.buffers[1] if held is state.buffers[0] else state.buffers[0]
        return patch_pixels(x, self.layout.patch_size, out=free, scratch=state.scratch)

    def reusable(self, cams: list[int], statics: list[Tensor], relevance: Tensor) -> tuple[Tensor, Tensor]:
        """Static patches left after the relevance filter, as prefix token indices, with their importance."""
        tokens, importance = [], []
        for cam, static in zip(cams, statics, strict=True):
            start, end = self.layout.camera_tokens(cam)
            imp = relevance[start:end] / (relevance[start:end].sum() + 1e-10)  # [256], sums to 1
            if self.config.relevance == "threshold":
                keep = static[imp[static] < self.importance_threshold]
                keep = keep[torch.argsort(imp[keep], stable=True)][: self.relevance_top_k]
            else:
                evicted = torch.argsort(imp, descending=True, stable=True)[: self.relevance_top_k]
                keep = static[~torch.isin(static, evicted)]
            tokens.append(keep + start)
            importance.append(imp[keep])
        return torch.cat(tokens), torch.cat(importance)

    def schedule(self, entropy: Tensor) -> list[float]:
        """Reuse proportion per layer (the last layer takes the last scheduled value)."""
        if self.config.reuse_proportion is not None:
            return [self.config.reuse_proportion] * self.layout.depth
        if self.config.layer_schedule == "seed_000":
            return seed_reuse_schedule(entropy, self.config.growth_factor, *SEED_REUSE_RANGE).tolist()
        proportions = reuse_schedule(entropy, self.config.growth_factor).tolist()
        return proportions + proportions[-1:] * (self.layout.depth - len(proportions))

    def plan(self, ordered: Tensor, state: VlaCacheState) -> tuple[TokenReuse, list[int]]:
        """Tokens each layer recomputes: the first n_l of `ordered` are dropped from layer l on."""
        proportions = self.schedule(state.entropy)
        dropped, count = [], 0
        for layer in range(self.layout.depth):
            if layer in self.pruning_layers:
                count = max(count, max(1, int(proportions[layer] * len(ordered))))  # the set only grows
            dropped.append(min(count, len(ordered)))
        keep = torch.ones(self.layout.num_tokens, dtype=torch.bool, device=ordered.device)
        active: list[Tensor | None] = []
        for layer, n in enumerate(dropped):
            if n == 0:
                active.append(None)
            elif layer and dropped[layer - 1] == n:
                active.append(active[-1])  # same object: the model keeps its hidden states as they are
            else:
                keep[ordered[:n]] = False
                active.append(keep.nonzero().flatten())
        return TokenReuse(cache=state.prefix_kv, active=tuple(active)), dropped

    # ---- state

    def update(self, frame: Frame, decision: Decision, outputs: FrameOutputs, state: VlaCacheState) -> None:
        state.prev_images, state.prev_cameras = frame.images, tuple(frame.cameras)
        if state.frame_pixels is not None and state.frame_pixels[0] == frame.index:
            _, state.prev_block, state.prev_pixels = state.frame_pixels
        else:  # decided without comparing (first frame): measure now for the next frame
            cams = frame.cameras
            state.prev_block = (cams[0], cams[-1] + 1)
            state.prev_pixels = self.block_pixels(frame.images, state.prev_block, state)
        state.frame_pixels = None
        state.prefix_kv, state.prefix_mask = outputs.prefix_kv, outputs.prefix_mask
        if decision.kind == "partial":
            ages = state.ages + 1
            for layer, active in enumerate(decision.plan.active):
                if active is None:
                    ages[layer] = 0
                else:
                    ages[layer, active] = 0
            state.ages = ages
        else:
            state.ages = torch.zeros(self.layout.depth, self.layout.num_tokens, dtype=torch.int32,
                                     device=outputs.prefix_kv.keys[0].device)
        if outputs.prefix_entropy and self.relevance_layer in outputs.prefix_relevance:
            state.entropy = torch.tensor([outputs.prefix_entropy[layer] for layer in self.entropy_layers])
            state.relevance = outputs.prefix_relevance[self.relevance_layer].float()
        else:
            state.entropy = state.relevance = None  # no maps: the next frame is full again
