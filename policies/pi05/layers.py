"""The SigLIP and Gemma building blocks of Pi0.5 (module names mirror the openpi checkpoint keys) and the
functional pieces they share with the model: masks, RoPE, the time posemb, attention."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.pi05.configuration import GemmaConfig, Pi05Config, SiglipConfig

# openpi gemma.py / pi0_pytorch.py: the additive mask value (finite, so fully masked rows stay finite).
BIG_NEG = -2.3819763e38


# --------------------------------------------------------------------------------------------------------
# Functions


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


def upcast(x: Tensor) -> Tensor:
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
    x32 = upcast(x)
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


def prefix_layer_rest(layer: nn.Module, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, head_dim: int,
                      update_x: bool, want_probs: bool) -> tuple[Tensor, Tensor | None]:
    """A prefix layer after its rotated q/k/v: attention, then the residual and MLP updates of `x` (skipped
    on the last layer, whose output would only feed the discarded final norm). Shared by the full and the
    partial prefix pass; returns (x, attention probabilities or None)."""
    out, probs = None, None
    if update_x or want_probs:
        out, probs = attention(q, k, v, mask, head_dim**-0.5, want_probs=want_probs)
    if update_x:
        x = x + layer.self_attn.output(out)
        h, _ = layer.post_attention_layernorm(x)
        x = x + layer.mlp(h)
    return x, probs


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
        x32 = upcast(x)
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
        x32 = upcast(x)
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

