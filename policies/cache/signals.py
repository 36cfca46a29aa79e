"""The measurements cache policies decide on: pixel differences, static patches, attention importance
maps and attention entropy. Pure tensor functions (no state), so each is tested on synthetic inputs.

Images are the model inputs, float32 [N_cam, 3, S, S] in [-1, 1]; `UINT8_SCALE` converts differences
back to the 0..255 units of the uint8 camera frames (x = u / 255 * 2 - 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

UINT8_SCALE = 127.5
EPS = 1e-10  # VLA-Cache's epsilon in entropy / normalisation


# ---- pixels


def pixel_mae(images: Tensor, reference: Tensor, cameras: list[int]) -> list[float]:
    """FlashRT's scene-change signal: mean |img_t - img_ref| per camera, in uint8 units (0..255)."""
    # images, reference: [N_cam, 3, S, S] in [-1, 1] -> one float per camera in `cameras`
    return [float((images[c] - reference[c]).abs().mean()) * UINT8_SCALE for c in cameras]


def downsample(images: Tensor, factor: int = 8) -> Tensor:
    """Seed 003's anti-noise step: average-pool by `factor` (224 -> 28), removing pixel noise."""
    # images: [N, 3, S, S] -> [N, 3, S / factor, S / factor]
    return F.avg_pool2d(images, kernel_size=factor, stride=factor)


def pixel_diff(small: Tensor, small_reference: Tensor) -> Tensor:
    """Mean over colour channels of |difference| of downsampled images."""
    # small, small_reference: [N, 3, G, G] -> [N, G, G]
    return (small - small_reference).abs().mean(dim=1)


Scratch = tuple[Tensor, Tensor]  # ([N, 3, S, S], [N, 1, S, S]) buffers reused across frames


def _patch_sum(x: Tensor, patch_size: int, scratch: Tensor | None = None) -> Tensor:
    """Sum over colour channels and each patch's pixels, up to the constant 1 / patch_size^2."""
    # x: [N, 3, S, S] -> [N, P] in row-major patch order (= SigLIP token order)
    return F.avg_pool2d(torch.sum(x, dim=1, keepdim=True, out=scratch), kernel_size=patch_size).flatten(1)


def patch_pixels(images: Tensor, patch_size: int, out: Tensor | None = None,
                 scratch: Scratch | None = None) -> tuple[Tensor, Tensor]:
    """(pixels, patch energy) of model-input images for `patch_cosine`; computed once per frame and kept,
    so the next frame's comparison costs one product per camera.

    Cosine ignores a common scale, so (x + 1) stands for the uint8 value x * 127.5 + 127.5 (the repo
    compares raw non-negative pixels). `out` / `scratch`: buffers to write into instead of allocating (on
    CPU a fresh megabyte tensor costs page faults that outweigh the arithmetic).
    """
    # images: [N, 3, S, S] in [-1, 1] -> pixels [N, 3, S, S] in [0, 2], energy [N, P]
    pixels = torch.add(images, 1.0, out=out)
    product = torch.mul(pixels, pixels, out=scratch[0] if scratch else None)
    return pixels, _patch_sum(product, patch_size, scratch[1] if scratch else None)


def patch_cosine(current: tuple[Tensor, Tensor], previous: tuple[Tensor, Tensor], patch_size: int,
                 scratch: Scratch | None = None) -> Tensor:
    """VLA-Cache: cosine similarity of raw pixel patches between two frames (from `patch_pixels`).

    An all-black patch has similarity 0 (as in the repo), so black padding is never "static".
    """
    # -> [N, P]
    product = torch.mul(current[0], previous[0], out=scratch[0] if scratch else None)
    dot = _patch_sum(product, patch_size, scratch[1] if scratch else None)
    return dot / ((current[1] * previous[1]).sqrt() + 1e-12)


def patch_similarity(images: Tensor, reference: Tensor, patch_size: int) -> Tensor:
    """`patch_cosine` of two image batches [N, 3, S, S] -> [N, P]."""
    return patch_cosine(patch_pixels(images, patch_size), patch_pixels(reference, patch_size), patch_size)


def static_patches(similarity: Tensor, threshold: float, top_k: int) -> Tensor:
    """Indices of the patches with similarity >= threshold, the `top_k` most similar first."""
    # similarity: [P] -> int64 [<= top_k]
    candidates = (similarity >= threshold).nonzero().flatten()
    order = torch.argsort(similarity[candidates], descending=True, stable=True)
    return candidates[order][:top_k]


# ---- attention maps


def importance_grid(key_attention: Tensor, start: int, grid: int) -> Tensor:
    """One camera's tokens of a per-key attention vector as a grid, normalised to sum 1."""
    # key_attention: [Tp] -> [grid, grid]
    tokens = key_attention[start : start + grid * grid].reshape(grid, grid)
    return tokens / (tokens.sum() + EPS)


def resize_map(grid_map: Tensor, size: int) -> Tensor:
    """Bilinear resize of a 2-D map (align_corners=False, as seed 003)."""
    # grid_map: [g, g] -> [size, size]
    return F.interpolate(grid_map[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]


def dilate(grid_map: Tensor, kernel: int = 5) -> Tensor:
    """Seed 003's blind-spot guard: a stride-1 max-pool, so a hot cell heats its kernel x kernel block."""
    # grid_map: [G, G] -> [G, G]
    return F.max_pool2d(grid_map[None, None], kernel_size=kernel, stride=1, padding=kernel // 2)[0, 0]


def attention_entropy(probs: Tensor, valid_queries: Tensor) -> Tensor:
    """VLA-Cache's layer entropy: head-averaged map, rows renormalised, token entropy averaged over queries.

    Only valid queries count (padding and empty-camera rows are uniform over every key, by the mask).
    """
    # probs: [B, H, Q, K]; valid_queries: [B, Q] bool -> [B]
    attn = probs.mean(dim=1)
    attn = attn / (attn.sum(-1, keepdim=True) + EPS)
    token_entropy = -(attn * torch.log(attn + EPS)).sum(-1)  # [B, Q]
    weights = valid_queries.to(token_entropy.dtype)
    return (token_entropy * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)


def query_mean(probs: Tensor, queries: Tensor) -> Tensor:
    """Mean attention per key over the selected queries, averaged over heads."""
    # probs: [B, H, Q, K]; queries: [B, Q] bool -> [B, K]
    attn = probs.mean(dim=1)
    weights = queries.to(attn.dtype)
    return (attn * weights[..., None]).sum(1) / weights.sum(-1, keepdim=True).clamp_min(1.0)


def reuse_schedule(entropy: Tensor, growth_factor: float) -> Tensor:
    """VLA-Cache's layer schedule: reuse = 1 - min-max normalised entropy, rises damped by `growth_factor`.

    Lower entropy (focused attention) -> more reuse. Where reuse would rise from one layer to the next,
    only `growth_factor` of the rise is taken (cumulatively), so the schedule climbs slowly with depth.
    """
    # entropy: [L] -> [L] in [0, 1]
    norm = (entropy - entropy.min()) / (entropy.max() - entropy.min() + EPS)
    raw = (1.0 - norm).tolist()
    out = raw[:1]
    for i in range(1, len(raw)):
        delta = raw[i] - out[i - 1]
        out.append(out[i - 1] + delta * growth_factor if delta > 0 else raw[i])
    return torch.tensor(out, dtype=torch.float32)


def seed_reuse_schedule(entropy: Tensor, growth_factor: float, low: float, high: float) -> Tensor:
    """Seed 000 Phase 3's schedule: min-max normalised entropy e, reuse = e x g + 0.5 x (1 - g), clamped to
    [low, high]. Higher entropy (diffuse attention) -> more reuse: the opposite direction of the repo's."""
    # entropy: [L] -> [L] in [low, high]
    norm = (entropy - entropy.min()) / (entropy.max() - entropy.min() + EPS)
    return torch.clamp(norm * growth_factor + 0.5 * (1.0 - growth_factor), min=low, max=high).float()


def scaled_layers(reference: list[int], reference_depth: int, depth: int) -> list[int]:
    """Layer indices of a `reference_depth`-layer model mapped to `depth` layers (rounded, >= 1, unique)."""
    return sorted({max(1, min(depth - 1, round(layer * depth / reference_depth))) for layer in reference})


class PrefixAttentionStats:
    """A `compute_prefix_kv(on_attention=...)` callback: reduces each prefix attention map as it appears.

    entropy[layer]: [B] attention entropy over the valid queries; relevance[layer]: [B, Tp] mean attention
    of the valid text queries per key (VLA-Cache's text-to-vision relevance, all keys kept).
    """

    def __init__(self, pad_mask: Tensor, text_start: int, entropy_layers: frozenset[int],
                 relevance_layers: frozenset[int]) -> None:
        # pad_mask: [B, Tp] bool
        self.pad_mask = pad_mask
        self.text_start = text_start
        self.entropy_layers, self.relevance_layers = entropy_layers, relevance_layers
        self.entropy: dict[int, Tensor] = {}
        self.relevance: dict[int, Tensor] = {}

    @property
    def layers(self) -> frozenset[int]:
        return self.entropy_layers | self.relevance_layers

    def __call__(self, layer: int, probs: Tensor, queries: Tensor | None) -> None:
        # probs: [B, H, Q, Tp]; queries: [Q] token indices, None = all
        valid = self.pad_mask if queries is None else self.pad_mask.index_select(1, queries)  # [B, Q]
        if layer in self.entropy_layers:
            self.entropy[layer] = attention_entropy(probs, valid)
        if layer in self.relevance_layers:
            index = torch.arange(self.pad_mask.shape[1], device=probs.device) if queries is None else queries
            self.relevance[layer] = query_mean(probs, valid & (index >= self.text_start)[None])


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two flattened tensors in float64; 1 when both are zero."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    denom = float(a64.norm() * b64.norm())
    if denom == 0.0:
        return 1.0 if float(a64.norm()) == float(b64.norm()) else 0.0
    return max(-1.0, min(1.0, float(a64 @ b64) / denom))


def l2(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm())
