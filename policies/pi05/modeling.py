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
This file holds `Pi05Model`; the stage values are in `stages.py`, the SigLIP/Gemma layers in `layers.py`,
the partial (token-reuse) prefix pass in `partial_prefix.py`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.pi05.configuration import CAMERA_NAMES, Pi05Config
from policies.pi05.layers import (
    GemmaModel,
    PaliGemmaWithExpert,
    SiglipVisionTransformer,
    additive_mask,
    apply_rope,
    attention,
    make_attention_mask,
    prefix_layer_rest,
    posemb_sincos,
    rope_cos_sin,
    upcast,
)
from policies.pi05.partial_prefix import partial_prefix_kv
from policies.pi05.rtc import Guidance, guided_velocity
from policies.pi05.sampling import EVALUATIONS_PER_STEP, integrate
from policies.pi05.stages import (
    AttentionCallback,
    AttentionLayers,
    DenoiseResult,
    Pi05Inputs,
    Prefix,
    PrefixKV,
    TokenReuse,
    VelocityPredictor,
    resolve_layers,
)

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
        dtype = as_dtype(dtype)
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
        It runs in `partial_prefix.py`; the loop below is the full pass.
        """
        cfg = self.config.vlm
        want = resolve_layers(return_attention, cfg.depth)
        hooked = resolve_layers(callback_layers, cfg.depth) if on_attention is not None else frozenset()
        x = prefix.embeddings.to(self.vlm.compute_dtype)  # [B, Tp, W]
        cos, sin = rope_cos_sin(prefix.positions, cfg.head_dim, cfg.rope_theta, upcast(x).dtype)
        mask = additive_mask(make_attention_mask(prefix.pad_mask, prefix.ar_mask), x.dtype)  # [B, 1, Tp, Tp]
        if reuse is not None:
            reuse.check(x.shape[0], x.shape[1], cfg.depth)
            return partial_prefix_kv(self.vlm, x, cos, sin, mask, reuse, want, hooked, on_attention)
        keys, values, maps = [], [], []
        for i, layer in enumerate(self.vlm.layers):
            h, _ = layer.input_layernorm(x)
            q, k, v = layer.self_attn.qkv(h)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys.append(k)
            values.append(v)
            x, probs = prefix_layer_rest(layer, x, q, k, v, mask, cfg.head_dim, i < cfg.depth - 1,
                                         i in want or i in hooked)
            if i in hooked:
                on_attention(i, probs, None)
            maps.append(probs if i in want else None)
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
        want = resolve_layers(return_attention, cfg.depth)
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
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, upcast(x).dtype)

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
        guidance: Guidance | None = None,
        attention_eval: int | None = None,
        predict_attention: VelocityPredictor | None = None,
    ) -> DenoiseResult:
        """Flow matching from t = 1 (noise) to t = 0; euler + linear is openpi's sampler bit for bit.

        predict_velocity: a replacement for `self.predict_velocity` with its signature (a compiled or
        TensorRT denoising step, policies/pi05/backends.py); the sampler loop stays here.
        guidance: real-time chunking (policies/pi05/rtc.py): every velocity evaluation is guided towards the
        leftover chunk. Its `model` jacobian differentiates the velocity: eager PyTorch only.
        attention_eval: the one velocity evaluation (negative: from the end) whose maps are returned; the
        others compute none (`attention` then holds that evaluation only). None: every evaluation's.
        predict_attention: the step used at that evaluation (default: `predict_velocity`, else the model's).
        Maps are computed beside the attention output, so asking for them never changes the actions.
        """
        # prefix_mask: [B, Tp] bool; noise: [B, H, A] float32 -> actions [B, H, A] float32 (action_out_proj dtype)
        expected = (prefix_kv.batch_size, self.config.action_horizon, self.config.action_dim)
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise shape {tuple(noise.shape)} != (B, action_horizon, action_dim) = {expected}")
        num_steps = self.config.num_steps if num_steps is None else num_steps
        times: list[float] = []
        maps: list[tuple[Tensor | None, ...]] = []
        predict = predict_velocity or self.predict_velocity
        dtype = self.action_out_proj.weight.dtype
        if guidance is not None:
            if tuple(guidance.target.shape) != expected:
                raise ValueError(f"guidance target {tuple(guidance.target.shape)} != noise shape {expected}")
            guidance = guidance.to(noise.device, dtype)
            if guidance.jacobian == "model" and prefix_kv.keys[0].is_inference():
                with torch.inference_mode(False):  # autograd cannot save inference tensors for backward
                    prefix_kv = PrefixKV(keys=tuple(k.clone() for k in prefix_kv.keys),
                                         values=tuple(v.clone() for v in prefix_kv.values))

        total = num_steps * EVALUATIONS_PER_STEP[solver]
        wanted = None if attention_eval is None or not return_attention else attention_eval % total
        counter = [0]

        def evaluate(x_t: Tensor, t: float) -> Tensor:
            # a fill on the device rather than a host-to-device copy: the loop stays capturable as a CUDA graph
            t_device = torch.full((), t, dtype=torch.float32, device=x_t.device)
            index, counter[0] = counter[0], counter[0] + 1
            if wanted is None:
                v_t, attn = predict(prefix_kv, prefix_mask, x_t, t_device, return_attention)
            elif index == wanted:
                v_t, attn = (predict_attention or predict)(prefix_kv, prefix_mask, x_t, t_device, return_attention)
            else:
                v_t, attn = predict(prefix_kv, prefix_mask, x_t, t_device, False)
            if attn is not None:
                maps.append(tuple(None if m is None else m.detach() for m in attn))
            return v_t

        def velocity(x_t: Tensor, t: Tensor) -> Tensor:
            times.append(float(t))
            if guidance is None:
                return evaluate(x_t, float(t))
            return guided_velocity(lambda x: evaluate(x, float(t)), x_t, float(t), guidance)

        actions = integrate(velocity, noise.to(dtype), num_steps, schedule, solver)
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


def _gated(y: Tensor, gate: Tensor | None) -> Tensor:
    return y if gate is None else y * gate


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
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
