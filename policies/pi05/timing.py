"""Timing Pi0.5's stages the same way everywhere (benchmarks/bench_pi05.py, the latency calibration of
policies/serving/latency.py): synthetic inputs shaped like LIBERO's (2 cameras present + 1 masked, a
half-full prompt), each stage as a closure over the outputs of the stages before it, and medians over
repeats with a device sync before every clock read."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from policies.pi05.backends import Pi05Backend
from policies.pi05.configuration import Pi05Config
from policies.pi05.modeling import Pi05Model
from policies.pi05.rtc import JACOBIANS, Guidance, prefix_weights
from policies.pi05.stages import Pi05Inputs


def synthetic_inputs(config: Pi05Config, batch: int, device: torch.device | str) -> tuple[Pi05Inputs, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    images = torch.rand(batch, config.num_cameras, 3, size, size, generator=gen) * 2 - 1
    masks = torch.ones(batch, config.num_cameras, dtype=torch.bool)
    masks[:, -1] = config.num_cameras == 1  # LIBERO: the right wrist slot is empty
    tokens = torch.randint(1, config.vocab_size, (batch, config.max_token_len), generator=gen)
    token_masks = torch.arange(config.max_token_len)[None].expand(batch, -1) < config.max_token_len // 2
    noise = torch.randn(batch, config.action_horizon, config.action_dim, generator=gen)
    inputs = Pi05Inputs(images.to(device), masks.to(device), tokens.to(device), token_masks.to(device))
    return inputs, noise.to(device)


def stage_functions(stages: Pi05Model | Pi05Backend, inputs: Pi05Inputs,
                    noise: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """Each stage as a closure over the outputs of the stages before it (computed once here), run by the
    model itself or by a backend (the same stage API)."""
    prefix = stages.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
    prefix_kv = stages.compute_prefix_kv(prefix)
    t = torch.tensor(1.0, device=noise.device)
    model = stages.model if isinstance(stages, Pi05Backend) else stages
    custom = stages.velocity_predictor(prefix_kv, frozenset()) if isinstance(stages, Pi05Backend) else None
    predict = custom or model.predict_velocity  # the backend's denoising step, or the model's (eager)
    return {
        "vision": lambda: stages.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks),
        "prefix": lambda: stages.compute_prefix_kv(prefix),
        "denoise_step": lambda: predict(prefix_kv, prefix.pad_mask, noise, t, False),
        "denoise": lambda: stages.denoise(prefix_kv, prefix.pad_mask, noise),
        "total": lambda: stages.sample_actions(inputs, noise),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stages(
    fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int
) -> dict[str, dict[str, float]]:
    out = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples.append((time.perf_counter() - start) * 1e3)
        out[name] = {"median_ms": statistics.median(samples), "min_ms": min(samples)}
    return out


def rtc_functions(stages: Pi05Model | Pi05Backend, inputs: Pi05Inputs,
                  noise: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The denoising loop guided by real-time chunking (policies/pi05/rtc.py), both jacobians, towards a
    synthetic leftover (half a chunk, delay 3, linear weights), and the plain loop on the eager model
    (`denoise_eager`: the model jacobian runs eager whatever the backend, so its VJP is priced against it)."""
    prefix = stages.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
    prefix_kv = stages.compute_prefix_kv(prefix)
    eager = stages.model if isinstance(stages, Pi05Backend) else stages
    b, horizon, _ = noise.shape
    target = torch.zeros_like(noise)
    target[:, : horizon // 2] = noise[:, : horizon // 2].flip(-1)
    weights = prefix_weights("linear", 3, horizon // 2, horizon).to(noise.device)[None, :, None].expand(b, -1, -1)
    guided = {jac: Guidance(target, weights, 10.0, jac) for jac in JACOBIANS}
    fns = {f"denoise_rtc_{jac}": (lambda g=g: stages.denoise(prefix_kv, prefix.pad_mask, noise, guidance=g))
           for jac, g in guided.items()}
    return {"denoise_eager": lambda: eager.denoise(prefix_kv, prefix.pad_mask, noise), **fns}
