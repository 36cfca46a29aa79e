"""`Pi05Policy`: the Policy interface over the serving engine, one episode at a time, every frame full (the
`none` variant with the given denoising knobs): the same code path a sweep's policy actor runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from policies.base import ActionChunk, Policy, PolicyError
from policies.pi05.modeling import Pi05Model
from policies.pi05.processing import Pi05Processor
from policies.pi05.stages import Pi05Inputs
from policies.serving.engine import Request
from policies.serving.model import LoadedModel, load_checkpoint, tiny_random
from policies.serving.noise import sample_noise
from policies.serving.pi05 import Pi05Engine
from policies.serving.variants import PolicyVariant, VariantError


class Pi05Policy(Policy):
    """Pi0.5 with the full path on every frame (decision "full", reason "baseline")."""

    name = "pi05"
    _SESSION = "episode"

    def __init__(self, model: Pi05Model, processor: Pi05Processor, *, label: str, checkpoint: str | None = None,
                 num_steps: int | None = None, schedule: str = "linear", solver: str = "euler") -> None:
        knobs = {"schedule": schedule, "solver": solver, **({} if num_steps is None else {"num_steps": num_steps})}
        try:
            self.variant = PolicyVariant.make(label, "none", knobs)
        except VariantError as exc:
            raise PolicyError(str(exc)) from None
        self.engine = Pi05Engine(model, processor, label=label)
        self.model, self.processor, self.config = self.engine.model, processor, model.config
        self.device = self.engine.device
        self.label, self.checkpoint = label, checkpoint
        self.denoise = self.engine.bind(self.variant)[1]
        self._seed: int | None = None

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, **options: Any) -> Pi05Policy:
        return cls(loaded.model, loaded.processor, label=loaded.label, checkpoint=loaded.checkpoint, **options)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                        **load_options: Any) -> Pi05Policy:
        """A checkpoint directory (openpi or LeRobot; see `policies.serving.model.load_checkpoint`)."""
        return cls.from_loaded(load_checkpoint(path, device=device, dtype=dtype, **load_options))

    @classmethod
    def tiny_random(cls, seed: int = 0, device: str | torch.device = "cpu", **config_overrides: Any) -> Pi05Policy:
        return cls.from_loaded(tiny_random(seed=seed, device=device, **config_overrides))

    # ---- Policy interface

    def reset(self, episode_id: str, seed: int) -> None:
        self.engine.open(self._SESSION, self.variant, seed)
        self._seed = int(seed)

    def end_episode(self, episode_id: str) -> None:
        self.engine.close(self._SESSION)
        self._seed = None

    def infer(self, observation: dict[str, Any]) -> ActionChunk:
        if self._seed is None:
            raise PolicyError("Pi05Policy.infer called before reset(episode_id, seed)")
        (result,) = self.engine.infer_batch([Request(self._SESSION, observation)])
        if isinstance(result, BaseException):
            raise result
        return result

    def noise(self, index: int, batch: int = 1) -> torch.Tensor:
        """The noise of inference `index` of the current episode, [batch, H, 32] on the model device."""
        if self._seed is None:
            raise PolicyError("Pi05Policy.noise called before reset(episode_id, seed)")
        shape = (batch, self.config.action_horizon, self.config.action_dim)
        return sample_noise(self._seed, index, shape).to(self.device)

    def prepare(self, observation: dict[str, Any]) -> Pi05Inputs:
        inputs, _ = self.processor.prepare([observation], self.device)
        return inputs

    def describe(self) -> dict[str, Any]:
        params = next(self.model.vlm.parameters())
        return {
            "name": self.name,
            "label": self.label,
            "checkpoint": self.checkpoint,
            "config": self.config.name,
            "dtype": str(params.dtype).removeprefix("torch."),
            "device": str(self.device),
            "num_steps": self.denoise.num_steps,
            "schedule": self.denoise.schedule,
            "solver": self.denoise.solver,
            "discrete_state_input": self.config.discrete_state_input,
            "normalization": self.processor.normalizer.source,
            "tokenizer": str(self.processor.tokenizer.path),
        }
