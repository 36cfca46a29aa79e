"""`Pi05Policy`: the Policy interface over the Pi0.5 model (one episode at a time, every frame full).

Noise is drawn from a torch.Generator seeded by (episode seed, inference index) only, on the CPU, so the
same episode gets the same noise under every cache policy and on every device.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.base import ActionChunk, InferenceRecord, Policy, PolicyError
from policies.pi05.checkpoint import build_model, read_checkpoint_dir
from policies.pi05.configuration import SCHEDULES, SOLVERS, Pi05Config, tiny
from policies.pi05.modeling import Pi05Inputs, Pi05Model, _as_dtype
from policies.pi05.processing import (
    TINY_TOKENIZER,
    Normalizer,
    Pi05Processor,
    PromptTokenizer,
    find_normalizer,
    find_tokenizer,
)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Pi05Policy(Policy):
    """Pi0.5 with the full path on every frame (decision "full", reason "baseline")."""

    name = "pi05"

    def __init__(
        self,
        model: Pi05Model,
        processor: Pi05Processor,
        *,
        label: str,
        checkpoint: str | None = None,
        num_steps: int | None = None,
        schedule: str = "linear",
        solver: str = "euler",
    ) -> None:
        if schedule not in SCHEDULES or solver not in SOLVERS:
            raise PolicyError(f"schedule {schedule!r} / solver {solver!r}: expected one of {SCHEDULES} / {SOLVERS}")
        if num_steps is not None and num_steps < 1:
            raise PolicyError(f"num_steps must be >= 1, got {num_steps}")
        self.model = model.eval()
        self.processor = processor
        self.config: Pi05Config = model.config
        self.device = next(model.parameters()).device
        self.label, self.checkpoint = label, checkpoint
        self.num_steps = num_steps or self.config.num_steps
        self.schedule, self.solver = schedule, solver
        self._episode_id: str | None = None
        self._seed = 0
        self._index = 0

    # ---- construction

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        tokenizer_path: str | Path | None = None,
        asset_id: str | None = None,
        **config_overrides: Any,
    ) -> Pi05Policy:
        """Load weights + config + norm stats + tokenizer from a checkpoint directory (openpi or LeRobot).

        dtype None: the precision the checkpoint records ("bfloat16" for openpi's converter default),
        else float32.
        """
        info = read_checkpoint_dir(path, **config_overrides)
        dtype = _as_dtype(dtype if dtype is not None else (info.precision or "float32"))
        model, _report = build_model(info.config, info.weights, device=device, dtype=dtype)
        tokenizer = PromptTokenizer(tokenizer_path or find_tokenizer(path), info.config.max_token_len)
        normalizer = find_normalizer(path, info.kind, asset_id)
        return cls(model, Pi05Processor(info.config, tokenizer, normalizer), label=f"{info.kind}:{Path(path).name}",
                   checkpoint=str(path))

    @classmethod
    def tiny_random(
        cls,
        seed: int = 0,
        tokenizer_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        **config_overrides: Any,
    ) -> Pi05Policy:
        """The `tiny` architecture with seeded random weights, the shipped tiny tokenizer and identity
        normalisation (no stats exist for random weights; nothing is clipped)."""
        config = dataclasses.replace(tiny(), **config_overrides)
        model = Pi05Model(config).init_random_weights(seed).to(device)
        tokenizer = PromptTokenizer(tokenizer_path or TINY_TOKENIZER, config.max_token_len)
        return cls(model, Pi05Processor(config, tokenizer, Normalizer.identity()), label=f"tiny_random:{seed}")

    # ---- Policy interface

    def reset(self, episode_id: str, seed: int) -> None:
        if seed < 0:
            raise PolicyError(f"episode seed must be >= 0, got {seed}")
        self._episode_id, self._seed, self._index = episode_id, int(seed), 0

    def end_episode(self, episode_id: str) -> None:
        if episode_id == self._episode_id:
            self._episode_id = None

    def noise(self, index: int, batch: int = 1) -> torch.Tensor:
        """The noise of inference `index` of the current episode, [batch, H, 32] on the model device."""
        shape = (batch, self.config.action_horizon, self.config.action_dim)
        return sample_noise(self._seed, index, shape).to(self.device)

    def prepare(self, observation: dict[str, Any]) -> Pi05Inputs:
        inputs, _ = self.processor.prepare([observation], self.device)
        return inputs

    @torch.inference_mode()
    def infer(self, observation: dict[str, Any]) -> ActionChunk:
        if self._episode_id is None:
            raise PolicyError("Pi05Policy.infer called before reset(episode_id, seed)")
        index = self._index
        clock = time.perf_counter
        _sync(self.device)
        t_start = clock()
        inputs = self.prepare(observation)
        noise = self.noise(index)
        _sync(self.device)
        t_vision = clock()
        prefix = self.model.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        _sync(self.device)
        t_prefix = clock()
        prefix_kv = self.model.compute_prefix_kv(prefix)
        _sync(self.device)
        t_denoise = clock()
        result = self.model.denoise(prefix_kv, prefix.pad_mask, noise, self.num_steps, self.schedule, self.solver)
        _sync(self.device)
        t_post = clock()
        actions = self.processor.postprocess(result.actions)[0]
        t_end = clock()
        self._index += 1
        record = InferenceRecord(
            index=index,
            decision="full",
            reason="baseline",
            latency_ms={
                "vision": (t_prefix - t_vision) * 1e3,
                "prefix": (t_denoise - t_prefix) * 1e3,
                "denoise": (t_post - t_denoise) * 1e3,
                "total": (t_end - t_start) * 1e3,
            },
            extra={"prompt_tokens": int(inputs.token_masks.sum())},
        )
        return ActionChunk(actions=actions, record=record)

    def describe(self) -> dict[str, Any]:
        params = next(self.model.vlm.parameters())
        return {
            "name": self.name,
            "label": self.label,
            "checkpoint": self.checkpoint,
            "config": self.config.name,
            "dtype": str(params.dtype).removeprefix("torch."),
            "device": str(self.device),
            "num_steps": self.num_steps,
            "schedule": self.schedule,
            "solver": self.solver,
            "discrete_state_input": self.config.discrete_state_input,
            "normalization": self.processor.normalizer.source,
            "tokenizer": str(self.processor.tokenizer.path),
        }
