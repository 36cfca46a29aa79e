"""Pi0.5 (pi05) inference in plain PyTorch, with the stages exposed for cached inference paths.

Model stages (`Pi05Model`): embed_prefix -> compute_prefix_kv -> denoise; `sample_actions` composes them.
The Policy over it (`Pi05Policy`) is serving's: `policies/serving/policy.py`, which builds on this package.
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
from policies.pi05.modeling import Pi05Model
from policies.pi05.processing import Normalizer, Pi05Processor, PromptTokenizer
from policies.pi05.sampling import integrate, time_grid
from policies.pi05.stages import DenoiseResult, Pi05Inputs, Prefix, PrefixKV

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
    "Pi05Processor",
    "Prefix",
    "PrefixKV",
    "PromptTokenizer",
    "SiglipConfig",
    "build_model",
    "integrate",
    "load_weights",
    "pi05_libero",
    "read_checkpoint_dir",
    "save_weights",
    "time_grid",
    "tiny",
]
