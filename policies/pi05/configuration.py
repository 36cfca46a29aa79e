"""Sizes and prompt/sampler settings of a Pi0.5 model, with named presets.

Presets (see `reference/pi05_spec.md` section A):
  * `pi05_libero`: the public openpi LIBERO fine-tune (SigLIP So400m/14, Gemma-2B, Gemma-300M action expert,
    action_horizon 10, max_token_len 200, state not in the prompt).
  * `tiny`: the same structure with small widths and depths, for CPU tests and the random-weights demo. Its
    vocabulary is the one of the tiny sentencepiece model shipped in `policies/pi05/assets/`.
  * `small`: the trainable-on-CPU size of the shipped trained checkpoint (`libero-eval train`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

# openpi `model.py` IMAGE_KEYS: the camera slots, in prefix order.
CAMERA_NAMES = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")

PALIGEMMA_VOCAB_SIZE = 257_152  # Gemma's 256,000 + 1,024 <loc> + 128 <seg> tokens
TINY_VOCAB_SIZE = 768  # vocabulary of assets/tiny_tokenizer.model (make_tiny_tokenizer.py)

SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")
SOLVERS = ("euler", "midpoint", "heun", "dpm_solver_2", "rk4")


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """SigLIP vision tower (pre-LN ViT, no pooling head); openpi `siglip.py` variant So400m/14."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SiglipConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(f"SiglipConfig.width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"SiglipConfig.image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """One Gemma expert (multi-query attention, GeGLU, RMSNorm with the (1 + w) convention)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0

    def __post_init__(self) -> None:
        for name in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"GemmaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"GemmaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"GemmaConfig.head_dim ({self.head_dim}) must be even for rotary embeddings")


@dataclasses.dataclass(frozen=True)
class Pi05Config:
    """A Pi0.5 model: vision tower, VLM (prefix) expert, action expert, and the inference settings.

    `discrete_state_input` picks the prompt format: False = openpi `pi05_libero` ("<task>\\n", state unused),
    True = LeRobot / openpi pi05 default ("Task: <task>, State: <256-bin ints>;\\nAction: ").
    """

    name: str
    vision: SiglipConfig
    vlm: GemmaConfig  # expert 0, "paligemma.model.language_model"
    action_expert: GemmaConfig  # expert 1, "gemma_expert.model" (adaRMS-conditioned on the flow time)
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    action_dim: int = 32  # model-internal action/state width (openpi PadStatesAndActions)
    action_horizon: int = 10
    max_token_len: int = 200
    num_steps: int = 10
    discrete_state_input: bool = False
    num_cameras: int = len(CAMERA_NAMES)
    time_min_period: float = 4e-3
    time_max_period: float = 4.0

    def __post_init__(self) -> None:
        vlm, expert = self.vlm, self.action_expert
        # Shared attention concatenates both experts' q/k/v along the sequence axis (spec A.5).
        for name in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(vlm, name) != getattr(expert, name):
                raise ValueError(
                    f"vlm.{name} ({getattr(vlm, name)}) must equal action_expert.{name} ({getattr(expert, name)}): "
                    "both experts share one attention per layer"
                )
        for name in ("vocab_size", "action_dim", "action_horizon", "max_token_len", "num_steps", "num_cameras"):
            if getattr(self, name) < 1:
                raise ValueError(f"Pi05Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_cameras > len(CAMERA_NAMES):
            raise ValueError(f"Pi05Config.num_cameras ({self.num_cameras}) cannot exceed {len(CAMERA_NAMES)}")
        if expert.width % 2:
            raise ValueError(f"action_expert.width ({expert.width}) must be even for the sin/cos time embedding")
        if not 0 < self.time_min_period < self.time_max_period:
            raise ValueError(
                f"need 0 < time_min_period ({self.time_min_period}) < time_max_period ({self.time_max_period})"
            )

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_cameras * self.vision.num_patches + self.max_token_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pi05Config:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Pi05Config fields {unknown}; known fields: {sorted(known)}")
        data["vision"] = SiglipConfig(**data["vision"])
        data["vlm"] = GemmaConfig(**data["vlm"])
        data["action_expert"] = GemmaConfig(**data["action_expert"])
        return cls(**data)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Pi05Config:
        if name not in PRESETS:
            raise ValueError(f"unknown Pi05Config preset {name!r}; presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def pi05_libero() -> Pi05Config:
    """openpi `pi05_libero`: Pi0Config(pi05=True, action_horizon=10, discrete_state_input=False)."""
    return Pi05Config(
        name="pi05_libero",
        vision=SiglipConfig(width=1152, depth=27, num_heads=16, mlp_dim=4304),
        vlm=GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
        action_expert=GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
        vocab_size=PALIGEMMA_VOCAB_SIZE,
        action_horizon=10,
        max_token_len=200,
        discrete_state_input=False,
    )


def tiny() -> Pi05Config:
    """Same structure as pi05_libero (patch 14 on 224 px -> 256 tokens/camera, 8 heads / 1 kv head, equal
    head_dim in both experts, adaRMS expert) at widths that run a full inference on a laptop CPU.

    max_token_len is 64 rather than 200: LIBERO prompts encode to < 64 tokens with the tiny tokenizer,
    even with the 8 state values in the prompt, and the shorter prefix keeps the CPU demo fast.
    """
    return Pi05Config(
        name="tiny",
        vision=SiglipConfig(width=192, depth=4, num_heads=4, mlp_dim=768),
        vlm=GemmaConfig(width=256, depth=4, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=32),
        action_expert=GemmaConfig(width=128, depth=4, mlp_dim=512, num_heads=8, num_kv_heads=1, head_dim=32),
        vocab_size=TINY_VOCAB_SIZE,
        action_horizon=10,
        max_token_len=64,
        discrete_state_input=False,
    )


def small() -> Pi05Config:
    """The architecture of the shipped trained small Pi0.5 (`libero-eval train`): pi05_libero's structure
    (SigLIP ViT, multi-query Gemma experts with equal head_dim, adaRMS action expert, flow matching) at
    widths that train on a 2-core CPU: 112 px images in 16 px patches (7 x 7 = 49 tokens per camera), two
    camera slots (agentview, wrist: no padded third slot), the state in the prompt (LeRobot's format) so
    proprioception reaches the model; 2.35 M parameters (9.4 MB in float32)."""
    return Pi05Config(
        name="small",
        vision=SiglipConfig(width=128, depth=2, num_heads=4, mlp_dim=256, patch_size=16, image_size=112),
        vlm=GemmaConfig(width=128, depth=4, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=32),
        action_expert=GemmaConfig(width=96, depth=4, mlp_dim=384, num_heads=4, num_kv_heads=1, head_dim=32),
        vocab_size=TINY_VOCAB_SIZE,
        action_horizon=10,
        max_token_len=64,
        discrete_state_input=True,
        num_cameras=2,
    )


PRESETS: dict[str, Pi05Config] = {"pi05_libero": pi05_libero(), "tiny": tiny(), "small": small()}
