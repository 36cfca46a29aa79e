"""Numerical parity with an independent float64 computation written from the spec (sections A-C).

The reference below reads only the state dict and re-derives every step with explicit einsums: patch
unfolding instead of a convolution, hand-written LayerNorm/RMSNorm/adaRMS/GELU-tanh/RoPE, softmax with
-inf masking (rows with no valid key are set to zero rather than uniform, so masked tokens take different
values here than in the model, which must not matter), and openpi's float32 time grid.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from policies.pi05.configuration import Pi05Config
from policies.pi05.stages import Pi05Inputs
from tests.pi05_helpers import random_inputs, random_model, random_noise, small_config

TOL = 1e-9  # float64 on both sides; only the order of operations differs



def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def rms(x, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps)


def rope(x, pos, theta):
    # x: [B, T, N, D]; pos: [B, T]
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [D/2]
    ang = pos[..., None, None].double() * freq  # [B, T, 1, D/2]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * torch.cos(ang) - x2 * torch.sin(ang), x2 * torch.cos(ang) + x1 * torch.sin(ang)], -1)


def softmax_masked(logits, allowed):
    # logits: [..., Q, K]; allowed broadcastable bool. Rows with nothing allowed -> all zeros.
    logits = logits.masked_fill(~allowed, float("-inf"))
    row_max = logits.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(logits - row_max)
    total = e.sum(-1, keepdim=True)
    return torch.where(total > 0, e / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(e))


class Reference:
    """A float64 Pi0.5 from the spec, reading weights by their checkpoint names."""

    def __init__(self, model, cfg: Pi05Config):
        self.w = {k: v.detach().double() for k, v in model.state_dict().items()}
        self.cfg = cfg

    def p(self, name):
        return self.w[name]

    def siglip(self, images):
        cfg, pre = self.cfg.vision, "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
        n, ps, g = images.shape[0], cfg.patch_size, cfg.image_size // cfg.patch_size
        patches = images.reshape(n, 3, g, ps, g, ps).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3 * ps * ps)
        x = patches @ self.p(pre + "embeddings.patch_embedding.weight").reshape(cfg.width, -1).T
        x = x + self.p(pre + "embeddings.patch_embedding.bias") + self.p(pre + "embeddings.position_embedding.weight")
        hd = cfg.width // cfg.num_heads
        for i in range(cfg.depth):
            lp = f"{pre}encoder.layers.{i}."
            h = layer_norm(x, self.p(lp + "layer_norm1.weight"), self.p(lp + "layer_norm1.bias"), cfg.layer_norm_eps)
            q, k, v = (
                (h @ self.p(lp + f"self_attn.{m}_proj.weight").T + self.p(lp + f"self_attn.{m}_proj.bias"))
                .reshape(n, -1, cfg.num_heads, hd)
                for m in "qkv"
            )
            att = torch.softmax(torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(hd), -1)
            o = torch.einsum("bnqk,bknd->bqnd", att, v).reshape(n, -1, cfg.width)
            x = x + o @ self.p(lp + "self_attn.out_proj.weight").T + self.p(lp + "self_attn.out_proj.bias")
            h = layer_norm(x, self.p(lp + "layer_norm2.weight"), self.p(lp + "layer_norm2.bias"), cfg.layer_norm_eps)
            h = gelu_tanh(h @ self.p(lp + "mlp.fc1.weight").T + self.p(lp + "mlp.fc1.bias"))
            x = x + h @ self.p(lp + "mlp.fc2.weight").T + self.p(lp + "mlp.fc2.bias")
        x = layer_norm(x, self.p(pre + "post_layernorm.weight"), self.p(pre + "post_layernorm.bias"),
                       cfg.layer_norm_eps)
        proj = "paligemma_with_expert.paligemma.model.multi_modal_projector.linear."
        return x @ self.p(proj + "weight").T + self.p(proj + "bias")

    def prefix(self, inputs: Pi05Inputs):
        cfg = self.cfg
        b, n = inputs.images.shape[:2]
        img = self.siglip(inputs.images.double().reshape(b * n, *inputs.images.shape[2:])).reshape(b, -1, cfg.vlm.width)
        emb = self.p("paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight")[inputs.tokens]
        x = torch.cat([img, emb * math.sqrt(cfg.vlm.width)], 1)
        valid = torch.cat([inputs.image_masks.repeat_interleave(256, 1), inputs.token_masks], 1)
        pos = valid.long().cumsum(1) - 1
        return x, valid, pos

    def attend(self, q, k, v, allowed):
        # q: [B, Q, N, D]; k, v: [B, K, 1, D]; allowed: [B, Q, K]
        logits = torch.einsum("bqnd,bkd->bnqk", q, k[:, :, 0]) / math.sqrt(q.shape[-1])
        probs = softmax_masked(logits, allowed[:, None])
        return torch.einsum("bnqk,bkd->bqnd", probs, v[:, :, 0])

    def vlm_kv(self, x, valid, pos):
        cfg, keys, values = self.cfg.vlm, [], []
        allowed = valid[:, None, :] & valid[:, :, None]
        for i in range(cfg.depth):
            lp = f"paligemma_with_expert.paligemma.model.language_model.layers.{i}."
            h = rms(x, cfg.rms_norm_eps) * (1 + self.p(lp + "input_layernorm.weight"))
            b, t, _ = h.shape
            q = (h @ self.p(lp + "self_attn.q_proj.weight").T).reshape(b, t, cfg.num_heads, -1)
            q = rope(q, pos, cfg.rope_theta)
            k = rope((h @ self.p(lp + "self_attn.k_proj.weight").T).reshape(b, t, 1, -1), pos, cfg.rope_theta)
            v = (h @ self.p(lp + "self_attn.v_proj.weight").T).reshape(b, t, 1, -1)
            keys.append(k)
            values.append(v)
            o = self.attend(q, k, v, allowed).reshape(b, t, -1)
            x = x + o @ self.p(lp + "self_attn.o_proj.weight").T
            h = rms(x, cfg.rms_norm_eps) * (1 + self.p(lp + "post_attention_layernorm.weight"))
            h = gelu_tanh(h @ self.p(lp + "mlp.gate_proj.weight").T) * (h @ self.p(lp + "mlp.up_proj.weight").T)
            x = x + h @ self.p(lp + "mlp.down_proj.weight").T
        return keys, values

    def adarms(self, x, cond, name):
        mod = cond @ self.p(name + ".dense.weight").T + self.p(name + ".dense.bias")
        w = x.shape[-1]
        scale, shift, gate = mod[:, None, :w], mod[:, None, w: 2 * w], mod[:, None, 2 * w:]
        return rms(x, self.cfg.action_expert.rms_norm_eps) * (1 + scale) + shift, gate

    def velocity(self, keys, values, valid, x_t, t: float):
        cfg = self.cfg.action_expert
        half = cfg.width // 2
        period = self.cfg.time_min_period * (self.cfg.time_max_period / self.cfg.time_min_period) ** torch.linspace(
            0, 1, half, dtype=torch.float64)
        arg = t * 2 * math.pi / period
        emb = torch.cat([torch.sin(arg), torch.cos(arg)])[None].expand(x_t.shape[0], -1)
        silu = lambda z: z * torch.sigmoid(z)  # noqa: E731
        cond = silu(silu(emb @ self.p("time_mlp_in.weight").T + self.p("time_mlp_in.bias"))
                    @ self.p("time_mlp_out.weight").T + self.p("time_mlp_out.bias"))
        x = x_t @ self.p("action_in_proj.weight").T + self.p("action_in_proj.bias")
        b, h_len, _ = x.shape
        pos = valid.long().sum(1, keepdim=True) + torch.arange(h_len)[None]
        allowed = torch.cat([valid[:, None, :].expand(b, h_len, -1), torch.ones(b, h_len, h_len, dtype=torch.bool)], 2)
        for i in range(cfg.depth):
            lp = f"paligemma_with_expert.gemma_expert.model.layers.{i}."
            hs, gate = self.adarms(x, cond, lp + "input_layernorm")
            q = (hs @ self.p(lp + "self_attn.q_proj.weight").T).reshape(b, h_len, cfg.num_heads, -1)
            q = rope(q, pos, cfg.rope_theta)
            k = rope((hs @ self.p(lp + "self_attn.k_proj.weight").T).reshape(b, h_len, 1, -1), pos, cfg.rope_theta)
            v = (hs @ self.p(lp + "self_attn.v_proj.weight").T).reshape(b, h_len, 1, -1)
            o = self.attend(q, torch.cat([keys[i], k], 1), torch.cat([values[i], v], 1), allowed).reshape(b, h_len, -1)
            x = x + (o @ self.p(lp + "self_attn.o_proj.weight").T) * gate
            hs, gate = self.adarms(x, cond, lp + "post_attention_layernorm")
            ff = gelu_tanh(hs @ self.p(lp + "mlp.gate_proj.weight").T) * (hs @ self.p(lp + "mlp.up_proj.weight").T)
            x = x + (ff @ self.p(lp + "mlp.down_proj.weight").T) * gate
        x, _ = self.adarms(x, cond, "paligemma_with_expert.gemma_expert.model.norm")
        return x @ self.p("action_out_proj.weight").T + self.p("action_out_proj.bias")

    def sample(self, inputs, noise, num_steps):
        x, valid, pos = self.prefix(inputs)
        keys, values = self.vlm_kv(x, valid, pos)
        dt = np.float32(-1.0 / num_steps)  # openpi: t accumulates in float32
        t, x_t = np.float32(1.0), noise.double()
        for _ in range(num_steps):
            x_t = x_t + float(dt) * self.velocity(keys, values, valid, x_t, float(t))
            t = np.float32(t + dt)
        return x_t, keys, values, valid


@pytest.fixture(scope="module")
def case():
    cfg = small_config()
    model = random_model(cfg, seed=5, dtype=torch.float64)
    inputs = random_inputs(cfg, batch=2, seed=6)
    inputs = Pi05Inputs(inputs.images.double(), inputs.image_masks, inputs.tokens, inputs.token_masks)
    noise = random_noise(cfg, batch=2, seed=7).double()
    return model, Reference(model, cfg), inputs, noise


def test_prefix_kv_matches_reference_on_valid_tokens(case):
    model, ref, inputs, noise = case
    with torch.no_grad():
        prefix = model.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        kv = model.compute_prefix_kv(prefix)
    x, valid, pos = ref.prefix(inputs)
    assert torch.equal(pos, prefix.positions)
    assert (prefix.embeddings - x).abs().max() < TOL
    keys, values = ref.vlm_kv(x, valid, pos)
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        got_k, got_v = kv.keys[layer][:, 0], kv.values[layer][:, 0]  # [B, Tp, D]
        assert (got_k[valid] - k[:, :, 0][valid]).abs().max() < TOL, layer
        assert (got_v[valid] - v[:, :, 0][valid]).abs().max() < TOL, layer


def test_one_adarms_expert_step_matches_reference(case):
    model, ref, inputs, noise = case
    with torch.no_grad():
        prefix = model.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        kv = model.compute_prefix_kv(prefix)
        v_t, _ = model.predict_velocity(kv, prefix.pad_mask, noise, torch.tensor(0.7))
    x, valid, pos = ref.prefix(inputs)
    keys, values = ref.vlm_kv(x, valid, pos)
    expected = ref.velocity(keys, values, valid, noise, float(np.float32(0.7)))
    assert v_t.dtype == torch.float64
    assert (v_t - expected).abs().max() < TOL
    assert expected.abs().max() > 0.1  # a non-trivial velocity


def test_sample_actions_matches_reference(case):
    model, ref, inputs, noise = case
    with torch.no_grad():
        actions = model.sample_actions(inputs, noise, num_steps=4)
    expected, *_ = ref.sample(inputs, noise, num_steps=4)
    assert (actions - expected).abs().max() < TOL


def test_float32_model_is_close_to_float64_reference(case):
    """The default precision, against the same reference: float32 rounding only."""
    _, ref, inputs, noise = case
    model32 = random_model(small_config(), seed=5)
    inputs32 = Pi05Inputs(inputs.images.float(), inputs.image_masks, inputs.tokens, inputs.token_masks)
    with torch.no_grad():
        actions = model32.sample_actions(inputs32, noise.float(), num_steps=4)
    expected, *_ = ref.sample(inputs, noise, num_steps=4)
    assert (actions.double() - expected).abs().max() < 1e-4
