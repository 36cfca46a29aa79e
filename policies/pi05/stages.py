"""The values passed between the Pi0.5 stages (inputs, embedded prefix, prefix K/V, token-reuse plan,
denoising result) and the attention-layer request type the stages share."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

AttentionLayers = bool | Sequence[int]
# (layer, probs [B, H, Q, Tp] float32, query token indices [Q] or None = all) -> None
AttentionCallback = Callable[[int, Tensor, Tensor | None], None]
# (prefix_kv, prefix_mask [B, Tp], x_t [B, H, A], t [] float32, return_attention) -> (v_t [B, H, A], maps or None)
VelocityPredictor = Callable[..., tuple[Tensor, tuple[Tensor | None, ...] | None]]


def resolve_layers(request: AttentionLayers, depth: int) -> frozenset[int]:
    """An attention-layer request (True = all, False/None = none, indices, negative from the end) -> layer set."""
    if request is True:
        return frozenset(range(depth))
    if request is False or request is None:
        return frozenset()
    layers = frozenset(int(i) if i >= 0 else depth + int(i) for i in request)
    bad = sorted(i for i in layers if not 0 <= i < depth)
    if bad:
        raise ValueError(f"attention layers {bad} out of range for depth {depth}")
    return layers


@dataclasses.dataclass(frozen=True)
class Pi05Inputs:
    """Model inputs of a batch, already preprocessed (see `processing.py`)."""

    images: Tensor  # [B, N_cam, 3, 224, 224] float32 in [-1, 1]
    image_masks: Tensor  # [B, N_cam] bool, False = camera absent (its tokens are masked out)
    tokens: Tensor  # [B, L] int64 prompt token ids, right-padded with 0
    token_masks: Tensor  # [B, L] bool, False = padding


@dataclasses.dataclass(frozen=True)
class Prefix:
    """The embedded prefix: image tokens of every camera slot, then the text tokens.

    `segments` maps each part ("base_0_rgb", ..., "text") to its [start, end) token range, so cache policies
    can address one camera's 256 tokens.
    """

    embeddings: Tensor  # [B, Tp, W_vlm]
    pad_mask: Tensor  # [B, Tp] bool, True = valid token (present camera / non-pad text)
    ar_mask: Tensor  # [B, Tp] bool, openpi's autoregressive mask: all False = bidirectional prefix
    positions: Tensor  # [B, Tp] int64, cumsum(pad_mask) - 1 (masked tokens repeat the previous position)
    segments: dict[str, tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class PrefixKV:
    """Per-layer keys (after RoPE) and values of the prefix, plus attention maps when asked for.

    Read-only by contract: `denoise` concatenates new K/V to copies, so one PrefixKV can serve any number
    of denoising runs (and reuse frames). A writer must clone first.
    """

    keys: tuple[Tensor, ...]  # per layer [B, H_kv, Tp, D]
    values: tuple[Tensor, ...]  # per layer [B, H_kv, Tp, D]
    # per layer [B, H, Tp, Tp] float32 (queries x keys, softmax over keys), None for layers not requested
    attention: tuple[Tensor | None, ...] | None = None

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def select(self, index: Tensor | Sequence[int]) -> PrefixKV:
        """The rows `index` of the batch (K/V only), e.g. to split a batched prefix pass into sessions."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.keys[0].device)
        return PrefixKV(
            keys=tuple(k.index_select(0, index) for k in self.keys),
            values=tuple(v.index_select(0, index) for v in self.values),
        )

    @staticmethod
    def concat(parts: Sequence[PrefixKV]) -> PrefixKV:
        """Stack the K/V of several sessions along the batch axis (they must have the same Tp)."""
        if not parts:
            raise ValueError("PrefixKV.concat needs at least one part")
        lengths = sorted({p.num_tokens for p in parts})
        if len(lengths) != 1:
            raise ValueError(f"PrefixKV.concat needs equal prefix lengths, got {lengths}")
        return PrefixKV(
            keys=tuple(torch.cat(ks, 0) for ks in zip(*(p.keys for p in parts), strict=True)),
            values=tuple(torch.cat(vs, 0) for vs in zip(*(p.values for p in parts), strict=True)),
        )


@dataclasses.dataclass(frozen=True)
class TokenReuse:
    """The plan of a partial prefix pass (VLA-Cache): which tokens each VLM layer recomputes.

    `active[l]` holds the sorted indices of the tokens layer l computes, None = every token; the sets only
    shrink with depth (a token dropped at layer l is never recomputed deeper), and in the layers where a
    token is not active its K/V come from `cache`, the running per-layer cache of the previous frame.
    """

    cache: PrefixKV  # batch 1, per layer [1, H_kv, Tp, D]
    active: tuple[Tensor | None, ...]  # per layer: int64 [Q_l] sorted token indices, or None (all tokens)

    def tokens_per_layer(self, num_tokens: int) -> list[int]:
        return [num_tokens if a is None else int(a.numel()) for a in self.active]

    def check(self, batch: int, num_tokens: int, depth: int) -> None:
        if batch != 1:
            raise ValueError(f"a partial prefix pass serves one sample at a time, got batch {batch}")
        if len(self.active) != depth or len(self.cache.keys) != depth:
            raise ValueError(f"TokenReuse has {len(self.active)} layer plans and {len(self.cache.keys)} cached "
                             f"layers for a model of depth {depth}")
        if self.cache.num_tokens != num_tokens or self.cache.batch_size != 1:
            raise ValueError(f"cache of {self.cache.batch_size} x {self.cache.num_tokens} tokens cannot serve a "
                             f"prefix of 1 x {num_tokens} tokens")
        previous: Tensor | None = None
        for layer, a in enumerate(self.active):
            if a is None:
                if previous is not None:
                    raise ValueError(f"layer {layer} computes every token after layer {layer - 1} dropped some")
                continue
            if a.numel() and (int(a.min()) < 0 or int(a.max()) >= num_tokens or bool((a[1:] <= a[:-1]).any())):
                raise ValueError(f"layer {layer}: active tokens must be sorted unique indices in [0, {num_tokens})")
            if previous is not None and not bool(torch.isin(a, previous).all()):
                raise ValueError(f"layer {layer} recomputes tokens dropped at a shallower layer; the dropped set "
                                 "may only grow with depth")
            previous = a


@dataclasses.dataclass(frozen=True)
class DenoiseResult:
    """Actions from the flow-matching sampler and, when asked for, attention of every velocity evaluation."""

    actions: Tensor  # [B, H, A] float32, normalised actions (t = 0)
    times: tuple[float, ...]  # flow time t of each velocity evaluation, in order
    # attention[e][l]: [B, H_heads, H_act, Tp] float32, action queries over the prefix keys (a slice of the
    # softmax over [prefix; action] keys, so rows sum to <= 1); None for layers not requested.
    attention: tuple[tuple[Tensor | None, ...], ...] | None = None
