"""Pi0.5 (pi05) inference in plain PyTorch, with the stages exposed for cached inference paths.

    from policies.pi05 import Pi05Policy
    policy = Pi05Policy.tiny_random(seed=0)                       # CPU demo, random weights
    policy = Pi05Policy.from_checkpoint("/ckpt/pi05_libero", device="cuda", dtype="bfloat16")

Model stages (`Pi05Model`): embed_prefix -> compute_prefix_kv -> denoise; `sample_actions` composes them.
"""
from policies.pi05.checkpoint import (
    CheckpointError,
    LoadReport,
    build_model,
    load_weights,
    read_checkpoint_dir,
    save_weights,
)
from policies.pi05.configuration import PRESETS, GemmaConfig, Pi05Config, SiglipConfig, pi05_libero, tiny
from policies.pi05.modeling import DenoiseResult, Pi05Inputs, Pi05Model, Prefix, PrefixKV
from policies.pi05.policy import Pi05Policy, noise_seed, sample_noise
from policies.pi05.processing import Normalizer, Pi05Processor, PromptTokenizer
from policies.pi05.sampling import integrate, time_grid

__all__ = [
    "PRESETS",
    "CheckpointError",
    "DenoiseResult",
    "GemmaConfig",
    "LoadReport",
    "Normalizer",
    "Pi05Config",
    "Pi05Inputs",
    "Pi05Model",
    "Pi05Policy",
    "Pi05Processor",
    "Prefix",
    "PrefixKV",
    "PromptTokenizer",
    "SiglipConfig",
    "build_model",
    "integrate",
    "load_weights",
    "noise_seed",
    "pi05_libero",
    "read_checkpoint_dir",
    "sample_noise",
    "save_weights",
    "time_grid",
    "tiny",
]
