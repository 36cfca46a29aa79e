"""Paired flow-matching noise: drawn from (episode seed, inference index) only, on the CPU, so the same
episode gets the same noise under every cache policy, in every batch and on every device."""
from __future__ import annotations

import numpy as np
import torch


def noise_seed(seed: int, index: int) -> int:
    """A 64-bit generator seed from (episode seed, inference index) via numpy SeedSequence (stable across
    processes and Python versions, unlike hash())."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed ({seed}) and inference index ({index}) must be >= 0")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def sample_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal float32 noise drawn on the CPU (identical on every device)."""
    gen = torch.Generator(device="cpu").manual_seed(noise_seed(seed, index))
    return torch.randn(shape, generator=gen, dtype=torch.float32)
