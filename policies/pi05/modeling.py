"""Pi0.5 inference in plain PyTorch: tensors in, tensors out.

Mirrors openpi `models_pytorch/pi0_pytorch.py` + `gemma_pytorch.py` (pi05=True) and LeRobot 0.6.1
`policies/pi05/modeling_pi05.py`; the math follows `reference/pi05_spec.md` sections A-C.
Module attribute names mirror the checkpoint names, so `state_dict()` keys are the openpi layout
(`paligemma_with_expert.paligemma.model.vision_tower.vision_model...`) with no remapping.

The inference is split into explicit stages so cache policies can reach inside:
    prefix = model.embed_prefix(images, image_masks, tokens, token_masks)   # SigLIP + text embedding
    prefix_kv = model.compute_prefix_kv(prefix)                            # Gemma-2B, per-layer K/V
    result = model.denoise(prefix_kv, prefix.pad_mask, noise)              # action expert, flow matching
The K/V cache is a value passed between stages, never stored on a module; `denoise` only reads it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.pi05.configuration import CAMERA_NAMES, GemmaConfig, Pi05Config, SiglipConfig
from policies.pi05.sampling import integrate

# openpi gemma.py / pi0_pytorch.py: the additive mask value (finite, so fully masked rows stay finite).
BIG_NEG = -2.3819763e38

# openpi `to_bfloat16_for_selected_params`: parameters that stay float32 when the model runs in bfloat16.
FLOAT32_PARAM_SELECTORS = (
    "patch_embedding",
    "position_embedding",
    "input_layernorm",
    "post_attention_layernorm",
    "model.norm",
    "action_in_proj",
    "action_out_proj",
    "time_mlp_in",
    "time_mlp_out",
)

AttentionLayers = bool | Sequence[int]
# (layer, probs [B, H, Q, Tp] float32, query token indices [Q] or None = all) -> None
AttentionCallback = Callable[[int, Tensor, Tensor | None], None]
# (prefix_kv, prefix_mask [B, Tp], x_t [B, H, A], t [] float32, return_attention) -> (v_t [B, H, A], maps or None)
VelocityPredictor = Callable[..., tuple[Tensor, tuple[Tensor | None, ...] | None]]


# --------------------------------------------------------------------------------------------------------
# Values passed between the stages


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


# --------------------------------------------------------------------------------------------------------
# Small functions


def make_attention_mask(pad_mask: Tensor, ar_mask: Tensor) -> Tensor:
    """openpi `make_attn_mask`: token q attends to token k iff cumsum(ar)[k] <= cumsum(ar)[q], both valid.

    ar_mask all 0 -> bidirectional; [1, 0, 0] -> a new block that sees everything before it and itself;
    all 1 -> causal.
    """
    # pad_mask, ar_mask: [B, T] -> [B, T, T] bool
    cumsum = torch.cumsum(ar_mask.to(torch.int64), dim=1)
    allowed = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = pad_mask[:, None, :] & pad_mask[:, :, None]
    return allowed & valid


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean [B, Q, K] -> additive [B, 1, Q, K]: 0 where allowed, BIG_NEG elsewhere (openpi)."""
    big_neg = max(BIG_NEG, torch.finfo(dtype).min)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask[:, None], zero, torch.tensor(big_neg, dtype=dtype, device=mask.device))


def _upcast(x: Tensor) -> Tensor:
    """float32 for bf16/f32 activations (openpi's norm/RoPE precision); float64 stays float64 (tests)."""
    return x if x.dtype == torch.float64 else x.float()


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Rotary tables for the split-halves convention (HF `rotate_half`, openpi `_apply_rope`)."""
    # positions: [B, T] -> cos, sin: [B, 1, T, D] in `dtype` (float32 unless the model runs in float64)
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).to(dtype) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = positions.to(dtype)[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate in float32 and cast back (openpi computes RoPE in f32)."""
    # x: [B, H, T, D]
    x32 = _upcast(x)
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def posemb_sincos(t: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """openpi `create_sinusoidal_pos_embedding`: float64 periods and angles, [sin | cos] (float64; the
    caller casts to the time MLP's dtype, float32 in openpi)."""
    # t: [B] -> [B, dim] float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    scaling = 1.0 / period * 2 * math.pi
    arg = scaling[None, :] * t[:, None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, want_probs: bool
) -> tuple[Tensor, Tensor | None]:
    """Multi-query attention via `scaled_dot_product_attention`.

    When `want_probs`, the softmax map is computed *beside* the SDPA output (not instead of it), so asking
    for attention never changes the actions: cache policies that read maps stay paired with the baseline.
    """
    # q: [B, H, Q, D]; k, v: [B, H_kv, K, D]; mask: [B, 1, Q, K] additive in q.dtype -> out [B, H, Q, D]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    probs = None
    if want_probs:
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # k broadcasts over heads
        probs = torch.softmax(logits + mask.float(), dim=-1)
    return out, probs


def _resolve_layers(request: AttentionLayers, depth: int) -> frozenset[int]:
    if request is True:
        return frozenset(range(depth))
    if request is False or request is None:
        return frozenset()
    layers = frozenset(int(i) if i >= 0 else depth + int(i) for i in request)
    bad = sorted(i for i in layers if not 0 <= i < depth)
    if bad:
        raise ValueError(f"attention layers {bad} out of range for depth {depth}")
    return layers


# --------------------------------------------------------------------------------------------------------
# SigLIP vision tower (HF names: vision_tower.vision_model.{embeddings,encoder.layers,post_layernorm})


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.width)

    def forward(self, pixels: Tensor) -> Tensor:
        # pixels: [N, 3, S, S] -> [N, P, W], in the dtype of the patch embedding (float32 in openpi bf16 mode)
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.width // cfg.num_heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        # x: [N, P, W]
        n, p, _ = x.shape
        q, k, v = (proj(x).view(n, p, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(n, p, -1))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN block: x += MHSA(LN(x)); x += MLP(LN(x))."""

    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.depth))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        # pixels: [N, 3, S, S] -> [N, P, W]
        x = self.embeddings(pixels)
        x = x.to(self.encoder.layers[0].self_attn.q_proj.weight.dtype)  # openpi: stem in f32, then dtype_mm
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class SiglipVisionTower(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)


class PaliGemmaProjector(nn.Module):
    """SigLIP "head": one Linear applied to every token (no scaling of image tokens, spec A.2)."""

    def __init__(self, vision_width: int, text_width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_width, text_width)


# --------------------------------------------------------------------------------------------------------
# Gemma experts


class GemmaRMSNorm(nn.Module):
    """RMSNorm in float32 with the Gemma (1 + weight) convention; returns (y, None) like AdaRMSNorm."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, None]:
        x32 = _upcast(x)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.to(x32.dtype))).to(x.dtype), None


class AdaRMSNorm(nn.Module):
    """pi05 adaRMS: RMSNorm modulated by the time condition; dense output order [scale | shift | gate]."""

    def __init__(self, width: int, cond_width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_width, 3 * width)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # x: [B, T, W]; cond: [B or 1, W_c] (1: shared by every row) -> y: [B, T, W], gate: [B or 1, 1, W]
        if cond is None:
            raise ValueError("AdaRMSNorm needs the time condition `cond`")
        mod = self.dense(cond.to(self.dense.weight.dtype))[:, None, :]
        scale, shift, gate = mod.chunk(3, dim=-1)
        x32 = _upcast(x)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y * (1.0 + scale.to(x32.dtype)) + shift.to(x32.dtype)
        return y.to(x.dtype), gate.to(x.dtype)


class GemmaAttention(nn.Module):
    """Projections only (no biases); the attention itself is done jointly by the caller (spec A.5)."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)

    def qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # h: [B, T, W] -> q: [B, H, T, D]; k, v: [B, H_kv, T, D]
        b, t, _ = h.shape
        q = self.q_proj(h).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def output(self, attn: Tensor) -> Tensor:
        # attn: [B, H, T, D] -> [B, T, W]
        b, _, t, _ = attn.shape
        attn = attn.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(attn.to(self.o_proj.weight.dtype))


class GemmaMLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_width: int | None) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(cfg)
        self.mlp = GemmaMLP(cfg)
        if cond_width is None:
            self.input_layernorm: nn.Module = GemmaRMSNorm(cfg.width, cfg.rms_norm_eps)
            self.post_attention_layernorm: nn.Module = GemmaRMSNorm(cfg.width, cfg.rms_norm_eps)
        else:
            self.input_layernorm = AdaRMSNorm(cfg.width, cond_width, cfg.rms_norm_eps)
            self.post_attention_layernorm = AdaRMSNorm(cfg.width, cond_width, cfg.rms_norm_eps)


def _gated(y: Tensor, gate: Tensor | None) -> Tensor:
    return y if gate is None else y * gate


class GemmaModel(nn.Module):
    """Decoder stack. The VLM expert has a scaled token embedding; the action expert has none but adaRMS."""

    def __init__(self, cfg: GemmaConfig, vocab_size: int | None, cond_width: int | None) -> None:
        super().__init__()
        self.config = cfg
        if vocab_size is not None:
            self.embed_tokens = nn.Embedding(vocab_size, cfg.width)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, cond_width) for _ in range(cfg.depth))
        if cond_width is None:
            self.norm: nn.Module = GemmaRMSNorm(cfg.width, cfg.rms_norm_eps)
        else:
            self.norm = AdaRMSNorm(cfg.width, cond_width, cfg.rms_norm_eps)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layers[0].self_attn.q_proj.weight.dtype


class PaliGemmaModel(nn.Module):
    def __init__(self, config: Pi05Config) -> None:
        super().__init__()
        self.vision_tower = SiglipVisionTower(config.vision)
        self.multi_modal_projector = PaliGemmaProjector(config.vision.width, config.vlm.width)
        self.language_model = GemmaModel(config.vlm, vocab_size=config.vocab_size, cond_width=None)


class PaliGemma(nn.Module):
    def __init__(self, config: Pi05Config) -> None:
        super().__init__()
        self.model = PaliGemmaModel(config)
        # Tied to embed_tokens (see Pi05Model.tie_weights); never used for actions, kept for the key layout.
        self.lm_head = nn.Linear(config.vlm.width, config.vocab_size, bias=False)


class GemmaExpert(nn.Module):
    def __init__(self, config: Pi05Config) -> None:
        super().__init__()
        self.model = GemmaModel(config.action_expert, vocab_size=None, cond_width=config.action_expert.width)
        # Unused leftover of HF GemmaForCausalLM; present in openpi and LeRobot checkpoints (spec E.2).
        self.lm_head = nn.Linear(config.action_expert.width, config.vocab_size, bias=False)


class PaliGemmaWithExpert(nn.Module):
    def __init__(self, config: Pi05Config) -> None:
        super().__init__()
        self.paligemma = PaliGemma(config)
        self.gemma_expert = GemmaExpert(config)


# --------------------------------------------------------------------------------------------------------
# The model


class Pi05Model(nn.Module):
    """Pi0.5: SigLIP + Gemma-2B prefix expert + Gemma-300M adaRMS action expert (openpi `PI0Pytorch`)."""

    def __init__(self, config: Pi05Config) -> None:
        super().__init__()
        self.config = config
        self.paligemma_with_expert = PaliGemmaWithExpert(config)
        width = config.action_expert.width
        self.action_in_proj = nn.Linear(config.action_dim, width)
        self.action_out_proj = nn.Linear(width, config.action_dim)
        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)
        self.tie_weights()

    # ---- structure helpers

    @property
    def vision(self) -> SiglipVisionTransformer:
        return self.paligemma_with_expert.paligemma.model.vision_tower.vision_model

    @property
    def vlm(self) -> GemmaModel:
        return self.paligemma_with_expert.paligemma.model.language_model

    @property
    def expert(self) -> GemmaModel:
        return self.paligemma_with_expert.gemma_expert.model

    def tie_weights(self) -> None:
        """PaliGemma's lm_head shares the token embedding (re-tie after `to_empty`, which unties)."""
        self.paligemma_with_expert.paligemma.lm_head.weight = self.vlm.embed_tokens.weight

    def set_precision(self, dtype: torch.dtype | str) -> Pi05Model:
        """float32: everything f32. bfloat16: openpi's selection (norms, patch/pos embeddings and the four
        top-level projections stay float32, the rest bf16). Returns self."""
        dtype = _as_dtype(dtype)
        for name, param in self.named_parameters():
            keep32 = dtype == torch.bfloat16 and any(s in name for s in FLOAT32_PARAM_SELECTORS)
            target = torch.float32 if keep32 else dtype
            if param.dtype != target:
                param.data = param.data.to(target)
        return self

    def init_random_weights(self, seed: int) -> Pi05Model:
        """Deterministic random weights with non-trivial norms and adaRMS (checkpoints zero-init those).

        Linear/conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), RMSNorm offsets ~ N(0, 0.1^2), LayerNorm
        weights 1 + N(0, 0.1^2), embeddings ~ N(0, 0.02^2); drawn on CPU in name order, so results do not
        depend on the device.
        """
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in sorted(self.named_parameters(), key=lambda kv: kv[0]):
                if name.endswith("lm_head.weight") and "gemma_expert" not in name:
                    continue  # tied to embed_tokens
                shape = param.shape
                if name.endswith("embed_tokens.weight") or "position_embedding" in name:
                    value = torch.randn(shape, generator=gen) * 0.02
                elif "layer_norm" in name or "post_layernorm" in name:
                    value = torch.randn(shape, generator=gen) * (0.1 if name.endswith("weight") else 0.02)
                    if name.endswith("weight"):
                        value += 1.0
                elif param.ndim == 1 and ("layernorm" in name or name.endswith("norm.weight")):
                    value = torch.randn(shape, generator=gen) * 0.1
                elif param.ndim == 1:
                    value = torch.randn(shape, generator=gen) * 0.02
                else:
                    fan_in = math.prod(shape[1:])
                    value = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
                param.copy_(value)
        return self

    # ---- stage 1: vision + text embedding

    def embed_images(self, images: Tensor) -> Tensor:
        """SigLIP + projector for every camera slot (masked slots are computed too, then masked)."""
        # images: [B, N, 3, S, S] float in [-1, 1] -> [B, N, P, W_vlm]
        b, n = images.shape[:2]
        tokens = self.vision(images.reshape(b * n, *images.shape[2:]))
        projector = self.paligemma_with_expert.paligemma.model.multi_modal_projector.linear
        tokens = projector(tokens.to(projector.weight.dtype))
        return tokens.view(b, n, *tokens.shape[1:])

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Token embedding times sqrt(width), the factor rounded to the embedding dtype (JAX, HF >= 5.4)."""
        # tokens: [B, L] -> [B, L, W_vlm]
        emb = self.vlm.embed_tokens(tokens)
        return emb * torch.tensor(self.config.vlm.width**0.5, dtype=emb.dtype)

    def embed_prefix(
        self,
        images: Tensor,
        image_masks: Tensor,
        tokens: Tensor,
        token_masks: Tensor,
        *,
        encode_images: Callable[[Tensor], Tensor] | None = None,
    ) -> Prefix:
        """openpi `embed_prefix`: [camera 0 tokens, camera 1 tokens, ..., text tokens], bidirectional.

        encode_images: a replacement for `embed_images` with its signature (a compiled or TensorRT vision
        tower, policies/pi05/backends.py); the text embedding and the assembly stay here.
        """
        # images: [B, N, 3, S, S]; image_masks: [B, N] bool; tokens, token_masks: [B, L]
        b, n = images.shape[:2]
        if n != self.config.num_cameras:
            raise ValueError(
                f"expected {self.config.num_cameras} camera slots, got images of shape {tuple(images.shape)}"
            )
        if image_masks.shape != (b, n):
            raise ValueError(f"image_masks shape {tuple(image_masks.shape)} != {(b, n)}")
        if tokens.shape != token_masks.shape or tokens.shape[0] != b:
            raise ValueError(
                f"tokens {tuple(tokens.shape)} / token_masks {tuple(token_masks.shape)} mismatch, batch {b}"
            )
        image_tokens = (encode_images or self.embed_images)(images)  # [B, N, P, W]
        text = self.embed_tokens(tokens)
        dtype = self.vlm.compute_dtype
        p = image_tokens.shape[2]
        embeddings = torch.cat([image_tokens.reshape(b, n * p, -1).to(dtype), text.to(dtype)], dim=1)
        pad_mask = torch.cat([image_masks.bool().repeat_interleave(p, dim=1), token_masks.bool()], dim=1)
        segments = {name: (i * p, (i + 1) * p) for i, name in enumerate(CAMERA_NAMES[:n])}
        segments["text"] = (n * p, n * p + tokens.shape[1])
        return Prefix(
            embeddings=embeddings,
            pad_mask=pad_mask,
            ar_mask=torch.zeros_like(pad_mask),
            positions=torch.cumsum(pad_mask.to(torch.int64), dim=1) - 1,
            segments=segments,
        )

    # ---- stage 2: prefix pass through the VLM expert

    def compute_prefix_kv(
        self,
        prefix: Prefix,
        return_attention: AttentionLayers = False,
        *,
        reuse: TokenReuse | None = None,
        on_attention: AttentionCallback | None = None,
        callback_layers: AttentionLayers = False,
    ) -> PrefixKV:
        """Run the prefix through every VLM layer once and keep each layer's K (after RoPE) and V.

        The last layer's attention output and MLP are skipped: only its K/V are ever read.
        return_attention: True for all layers, or a list of layer indices; maps are [B, H, Q, Tp] float32
        (about depth * 8 * Tp^2 * 4 bytes per sample for all layers: 540 MB at full size, so ask for few).
        on_attention(layer, probs [B, H, Q, Tp], queries [Q] or None): called for each of `callback_layers`
        with the map, which is then dropped; reducing maps as they appear keeps memory at one layer's map.
        reuse: a partial pass (VLA-Cache token reuse, batch 1): from the layer where a token leaves
        `reuse.active` its hidden state is dropped, so no projection, attention query or MLP is computed for
        it in that layer or deeper, and its K/V there are read from `reuse.cache`; the recomputed tokens attend
        to the merged K/V. Queries of a partial pass are the active tokens, in index order (`queries`).
        """
        cfg = self.config.vlm
        want = _resolve_layers(return_attention, cfg.depth)
        hooked = _resolve_layers(callback_layers, cfg.depth) if on_attention is not None else frozenset()
        x = prefix.embeddings.to(self.vlm.compute_dtype)  # [B, Tp, W]
        cos, sin = rope_cos_sin(prefix.positions, cfg.head_dim, cfg.rope_theta, _upcast(x).dtype)
        mask = additive_mask(make_attention_mask(prefix.pad_mask, prefix.ar_mask), x.dtype)  # [B, 1, Tp, Tp]
        if reuse is not None:
            reuse.check(x.shape[0], x.shape[1], cfg.depth)
        active: Tensor | None = None  # [Q] indices of the tokens x holds; None = all Tp
        keys, values, maps = [], [], []
        for i, layer in enumerate(self.vlm.layers):
            if reuse is not None and reuse.active[i] is not None and reuse.active[i] is not active:
                # drop the hidden states of the tokens that leave here (the set only shrinks with depth)
                keep = reuse.active[i].to(x.device)
                rows = keep if active is None else torch.searchsorted(active, keep)
                x = x.index_select(1, rows)
                cos, sin = cos.index_select(2, rows), sin.index_select(2, rows)
                mask = mask.index_select(2, rows)  # [1, 1, Q, Tp]: active queries over all keys
                active = keep
            h, _ = layer.input_layernorm(x)
            q, k, v = layer.self_attn.qkv(h)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if active is not None:
                # merged K/V: fresh for recomputed tokens, the cache's for dropped ones (a new tensor: the
                # cache is never written)
                k = reuse.cache.keys[i].index_copy(2, active, k)
                v = reuse.cache.values[i].index_copy(2, active, v)
            keys.append(k)
            values.append(v)
            updates_x = i < cfg.depth - 1  # the last layer's output would only feed the discarded final norm
            out, probs = None, None
            if updates_x or i in want or i in hooked:
                out, probs = attention(q, k, v, mask, cfg.head_dim**-0.5, want_probs=i in want or i in hooked)
            if i in hooked:
                on_attention(i, probs, active)
            maps.append(probs if i in want else None)
            if updates_x:
                x = x + layer.self_attn.output(out)
                h, _ = layer.post_attention_layernorm(x)
                x = x + layer.mlp(h)
        return PrefixKV(keys=tuple(keys), values=tuple(values), attention=tuple(maps) if want else None)

    # ---- stage 3: denoising with the action expert

    def time_condition(self, t: Tensor) -> Tensor:
        """adaRMS condition: swish(time_mlp_out(swish(time_mlp_in(posemb(t)))))."""
        # t: [B] float32 -> [B, W_expert] float32
        cfg = self.config
        emb = posemb_sincos(t, cfg.action_expert.width, cfg.time_min_period, cfg.time_max_period)
        emb = emb.to(self.time_mlp_in.weight.dtype)
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(emb))))

    def predict_velocity(
        self,
        prefix_kv: PrefixKV,
        prefix_mask: Tensor,
        x_t: Tensor,
        t: Tensor,
        return_attention: AttentionLayers = False,
    ) -> tuple[Tensor, tuple[Tensor | None, ...] | None]:
        """openpi `denoise_step`: one velocity evaluation of the action expert against the prefix K/V."""
        # prefix_mask: [B, Tp] bool; x_t: [B, H, A]; t: [] or [B] float32 -> v_t: [B, H, A] in the dtype of
        # action_out_proj (float32, also in bf16 mode; float64 only for the float64 parity test)
        cfg = self.config.action_expert
        b, horizon, _ = x_t.shape
        want = _resolve_layers(return_attention, cfg.depth)
        if prefix_kv.batch_size != b or prefix_mask.shape != (b, prefix_kv.num_tokens):
            raise ValueError(
                f"batch mismatch: x_t {tuple(x_t.shape)}, prefix_mask {tuple(prefix_mask.shape)}, "
                f"prefix_kv batch {prefix_kv.batch_size} with {prefix_kv.num_tokens} tokens"
            )
        # One flow time for the whole batch (the sampler's case): the condition is computed for a single row
        # and broadcast, so a row's velocity does not depend on the batch size (a [B, W] matmul takes a
        # different CPU kernel at B = 1 than at B > 1 and rounds differently).
        t = t.to(torch.float32)
        shared_t = t.ndim == 0 or bool((t == t.reshape(-1)[0]).all())
        cond = self.time_condition(t.reshape(-1)[:1] if shared_t else t.expand(b))  # [1 or B, W_expert]
        x = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype)).to(self.expert.compute_dtype)

        # pi05 suffix: ar = [1, 0, ..., 0] -> action tokens see all valid prefix tokens and each other.
        suffix_pad = torch.ones(b, horizon, dtype=torch.bool, device=x.device)
        suffix_ar = torch.zeros_like(suffix_pad)
        suffix_ar[:, 0] = True
        mask = torch.cat(
            [prefix_mask[:, None, :].expand(b, horizon, -1), make_attention_mask(suffix_pad, suffix_ar)], dim=2
        )
        mask = additive_mask(mask, x.dtype)  # [B, 1, H, Tp + H]
        positions = prefix_mask.sum(-1, keepdim=True) + torch.cumsum(suffix_pad.to(torch.int64), dim=1) - 1
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, _upcast(x).dtype)

        maps = []
        num_prefix = prefix_kv.num_tokens
        for i, layer in enumerate(self.expert.layers):
            h, gate = layer.input_layernorm(x, cond)
            q, k, v = layer.self_attn.qkv(h)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys = torch.cat([prefix_kv.keys[i], k], dim=2)  # a new tensor: the cache is never written
            values = torch.cat([prefix_kv.values[i], v], dim=2)
            out, probs = attention(q, keys, values, mask, cfg.head_dim**-0.5, want_probs=i in want)
            maps.append(None if probs is None else probs[..., :num_prefix])
            x = x + _gated(layer.self_attn.output(out), gate)
            h, gate = layer.post_attention_layernorm(x, cond)
            x = x + _gated(layer.mlp(h), gate)
        x, _ = self.expert.norm(x, cond)
        v_t = self.action_out_proj(x.to(self.action_out_proj.weight.dtype))
        return v_t, (tuple(maps) if want else None)

    def denoise(
        self,
        prefix_kv: PrefixKV,
        prefix_mask: Tensor,
        noise: Tensor,
        num_steps: int | None = None,
        schedule: str = "linear",
        solver: str = "euler",
        return_attention: AttentionLayers = False,
        *,
        predict_velocity: VelocityPredictor | None = None,
    ) -> DenoiseResult:
        """Flow matching from t = 1 (noise) to t = 0; euler + linear is openpi's sampler bit for bit.

        predict_velocity: a replacement for `self.predict_velocity` with its signature (a compiled or
        TensorRT denoising step, policies/pi05/backends.py); the sampler loop stays here.
        """
        # prefix_mask: [B, Tp] bool; noise: [B, H, A] float32 -> actions [B, H, A] float32 (action_out_proj dtype)
        expected = (prefix_kv.batch_size, self.config.action_horizon, self.config.action_dim)
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise shape {tuple(noise.shape)} != (B, action_horizon, action_dim) = {expected}")
        num_steps = self.config.num_steps if num_steps is None else num_steps
        times: list[float] = []
        maps: list[tuple[Tensor | None, ...]] = []
        predict = predict_velocity or self.predict_velocity

        def velocity(x_t: Tensor, t: Tensor) -> Tensor:
            # a fill on the device rather than a host-to-device copy: the loop stays capturable as a CUDA graph
            t_device = torch.full((), float(t), dtype=torch.float32, device=x_t.device)
            v_t, attn = predict(prefix_kv, prefix_mask, x_t, t_device, return_attention)
            times.append(float(t))
            if attn is not None:
                maps.append(attn)
            return v_t

        actions = integrate(velocity, noise.to(self.action_out_proj.weight.dtype), num_steps, schedule, solver)
        return DenoiseResult(actions=actions, times=tuple(times), attention=tuple(maps) if maps else None)

    # ---- all stages

    def sample_actions(
        self,
        inputs: Pi05Inputs,
        noise: Tensor,
        num_steps: int | None = None,
        schedule: str = "linear",
        solver: str = "euler",
    ) -> Tensor:
        """embed_prefix -> compute_prefix_kv -> denoise; returns normalised actions [B, H, A] float32."""
        prefix = self.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        prefix_kv = self.compute_prefix_kv(prefix)
        return self.denoise(prefix_kv, prefix.pad_mask, noise, num_steps, schedule, solver).actions


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        result = dtype
    else:
        result = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                  "float64": torch.float64}.get(dtype)
        if result is None:
            raise ValueError(f"unsupported dtype {dtype!r}; use 'float32' or 'bfloat16'")
    if result not in (torch.float32, torch.bfloat16, torch.float64):
        raise ValueError(f"unsupported dtype {result}; use torch.float32 or torch.bfloat16")
    return result


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
