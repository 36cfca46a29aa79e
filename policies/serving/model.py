"""The `model` section of a sweep (`ModelConfig`) and what it builds: the shared Pi0.5 with its processor,
and the engine the policy actor serves (`make_engine`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from policies.pi05.backends import BackendOptions
from policies.pi05.checkpoint import build_model, read_checkpoint_dir
from policies.pi05.configuration import tiny
from policies.pi05.modeling import Pi05Model, as_dtype
from policies.pi05.processing import (
    TINY_TOKENIZER,
    Normalizer,
    Pi05Processor,
    PromptTokenizer,
    find_normalizer,
    find_tokenizer,
)
from policies.pi05.tensorrt import make_backend
from policies.serving.engine import Engine
from policies.serving.openpi_remote import OpenpiServerEngine
from policies.serving.pi05 import EXECUTED_STEPS, Pi05Engine
from policies.serving.variants import PolicyVariant

MODEL_KINDS = ("tiny", "checkpoint", "openpi_server")
DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass
class ModelConfig:
    """Which Pi0.5 the policy actor serves and how its stages run (README "GPU backends")."""

    kind: str = "tiny"  # tiny: the tiny Pi0.5 with random weights | checkpoint: a real checkpoint directory
    checkpoint: str | None = None
    seed: int = 0  # weights seed of the tiny random model
    device: str = "auto"  # auto: cuda if available else cpu
    dtype: str | None = None  # null: the checkpoint's precision (float32 for tiny)
    backend: str = "eager"  # eager | compile (torch.compile) | tensorrt (engines from launch/build_engines.py)
    compile_mode: str = "default"  # torch.compile's mode (reduce-overhead, max-autotune, ...: backends.COMPILE_MODES)
    cuda_graphs: bool = True  # compile/tensorrt on CUDA: the denoising loop as one CUDA graph per batch shape
    engine_dir: str | None = None  # tensorrt: the directory launch/build_engines.py wrote
    # openpi_server: a policy served over openpi's websocket protocol (openpi's serve_policy.py, libero-eval serve)
    url: str | None = None  # ws://host:port
    api_key_env: str | None = None  # the environment variable holding its API key (never the key itself)
    timeout_s: float = 300.0  # a request unanswered this long is an infrastructure failure (retried)

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        if self.kind == "openpi_server" and not (isinstance(self.url, str) and self.url.startswith(("ws://", "wss://"))):
            raise ValueError(f"url: model.kind openpi_server needs the server's address as ws://host:port, got {self.url!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {self.device!r}")
        self.backend_options()  # raises, naming the key, for a bad backend setting

    def backend_options(self) -> BackendOptions:
        return BackendOptions.from_model_section(dataclasses.asdict(self))

    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


@dataclasses.dataclass
class LoadedModel:
    model: Pi05Model
    processor: Pi05Processor
    label: str  # "<kind>:<directory name>" or "tiny_random:<seed>"
    checkpoint: str | None = None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                    tokenizer_path: str | Path | None = None, asset_id: str | None = None,
                    **config_overrides: Any) -> LoadedModel:
    """Weights + config + norm stats + tokenizer from a checkpoint directory (openpi or LeRobot). dtype
    None: the precision the checkpoint records ("bfloat16" for openpi's converter default), else float32."""
    info = read_checkpoint_dir(path, **config_overrides)
    dtype = as_dtype(dtype if dtype is not None else (info.precision or "float32"))
    model, _report = build_model(info.config, info.weights, device=device, dtype=dtype)
    tokenizer = PromptTokenizer(tokenizer_path or find_tokenizer(path), info.config.max_token_len)
    normalizer = find_normalizer(path, info.kind, asset_id)
    return LoadedModel(model, Pi05Processor(info.config, tokenizer, normalizer), f"{info.kind}:{Path(path).name}",
                       str(path))


def tiny_random(seed: int = 0, tokenizer_path: str | Path | None = None, device: str | torch.device = "cpu",
                **config_overrides: Any) -> LoadedModel:
    """The `tiny` architecture with seeded random weights, the shipped tiny tokenizer and identity
    normalisation (no stats exist for random weights; nothing is clipped)."""
    config = dataclasses.replace(tiny(), **config_overrides)
    model = Pi05Model(config).init_random_weights(seed).to(device)
    tokenizer = PromptTokenizer(tokenizer_path or TINY_TOKENIZER, config.max_token_len)
    return LoadedModel(model, Pi05Processor(config, tokenizer, Normalizer.identity()), f"tiny_random:{seed}")


def load_model(config: ModelConfig) -> LoadedModel:
    if config.kind == "openpi_server":
        raise ValueError(f"model.kind openpi_server: the model lives on its server ({config.url}); this needs a "
                         "model loaded here (model.kind tiny or checkpoint)")
    if config.kind == "tiny":
        return tiny_random(seed=config.seed, device=config.torch_device())
    return load_checkpoint(config.checkpoint, device=config.torch_device(), dtype=config.dtype)


def make_engine(model: ModelConfig, variants: list[PolicyVariant], shadow: bool = False,
                executed_steps: int = EXECUTED_STEPS) -> Engine:
    """The engine the policy actor runs: sessions of every variant, served from one shared model (none is
    loaded when every variant is model-free). `shadow`: also compute the full path per frame and record the
    executed chunk's deviation from it (over the whole chunk and its first `executed_steps` actions). A
    non-eager backend is named in the engine's label. Every Pi0.5 variant is bound to the model here, so a
    parameter that does not fit it fails at start, not in the first episode."""
    if all(v.model_free for v in variants):
        return Engine()
    if model.kind == "openpi_server":
        return OpenpiServerEngine(model.url, model.api_key_env, model.timeout_s)
    loaded = load_model(model)
    backend = make_backend(loaded.model, model.backend_options())
    label = loaded.label if backend.name == "eager" else f"{loaded.label}@{backend.name}"
    engine = Pi05Engine(loaded.model, loaded.processor, shadow=shadow, label=label, executed_steps=executed_steps,
                        backend=backend)
    for variant in variants:
        if not variant.model_free:
            engine.bind(variant)
    return engine
