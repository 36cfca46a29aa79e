"""Helpers for the pi05 tests: small configs, seeded inputs, tiny checkpoints and a tiny trained tokenizer."""
from __future__ import annotations

import dataclasses
import functools
import io
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from policies.base import IMAGE_KEY, PROMPT_KEY, STATE_KEY, WRIST_IMAGE_KEY
from policies.pi05.configuration import GemmaConfig, Pi05Config, SiglipConfig, tiny
from policies.pi05.modeling import Pi05Model
from policies.pi05.stages import Pi05Inputs

KEYS_FILE = Path(__file__).resolve().parents[1] / "policies" / "pi05" / "assets" / "lerobot061_pi05_keys.json"


def small_config(**overrides) -> Pi05Config:
    """The tiny architecture shrunk further (2 layers, 96-token prompt budget kept at 16) for fast tests."""
    base = tiny()
    cfg = dataclasses.replace(
        base,
        name="test_small",
        vision=SiglipConfig(width=32, depth=2, num_heads=2, mlp_dim=64),
        vlm=GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=8),
        action_expert=GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=8),
        vocab_size=768,
        max_token_len=16,
        action_horizon=5,
    )
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def full_depth_config() -> Pi05Config:
    """pi05_libero's depths (27 SigLIP and 18 Gemma layers, so every checkpoint name exists) at toy widths."""
    return dataclasses.replace(
        small_config(),
        name="test_full_depth",
        vision=SiglipConfig(width=16, depth=27, num_heads=2, mlp_dim=24),
        vlm=GemmaConfig(width=16, depth=18, mlp_dim=24, num_heads=8, num_kv_heads=1, head_dim=4),
        action_expert=GemmaConfig(width=8, depth=18, mlp_dim=16, num_heads=8, num_kv_heads=1, head_dim=4),
        vocab_size=64,
        max_token_len=8,
        action_horizon=3,
    )


def random_model(config: Pi05Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> Pi05Model:
    return Pi05Model(config).init_random_weights(seed).set_precision(dtype).eval()


def random_inputs(config: Pi05Config, batch: int = 2, seed: int = 0) -> Pi05Inputs:
    """Seeded images in [-1, 1], camera masks [T, T, F] (second row [T, F, T] when batch > 1), prompts of
    different lengths."""
    gen = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    images = torch.rand(batch, config.num_cameras, 3, size, size, generator=gen) * 2 - 1
    masks = torch.ones(batch, config.num_cameras, dtype=torch.bool)
    masks[0, -1] = False
    if batch > 1:
        masks[1, 1] = False
    tokens = torch.randint(1, config.vocab_size, (batch, config.max_token_len), generator=gen)
    lengths = torch.tensor([max(1, config.max_token_len // (2 + b % 3)) for b in range(batch)])
    token_masks = torch.arange(config.max_token_len)[None] < lengths[:, None]
    tokens = torch.where(token_masks, tokens, torch.zeros_like(tokens))
    return Pi05Inputs(images, masks, tokens, token_masks)


def random_noise(config: Pi05Config, batch: int = 2, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.action_horizon, config.action_dim, generator=gen)


def observation(seed: int = 0, prompt: str = "put the bowl on the plate") -> dict:
    rng = np.random.default_rng(seed)
    return {
        IMAGE_KEY: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        WRIST_IMAGE_KEY: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        STATE_KEY: rng.normal(size=8).astype(np.float32),
        PROMPT_KEY: prompt,
    }


def lerobot_keys() -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(shape)) for name, shape in json.loads(KEYS_FILE.read_text())]


@functools.cache
def trained_tokenizer_bytes(vocab_size: int = 300) -> bytes:
    """A sentencepiece BPE model trained here on a few LIBERO-like sentences (byte fallback on)."""
    import sentencepiece as spm

    words = ["pick up the black bowl", "place it on the plate", "open the top drawer of the cabinet",
             "put the cream cheese in the bowl", "turn on the stove", "Task:", "State:", "Action:"]
    rng = np.random.default_rng(0)
    sentences = []
    for _ in range(400):
        text = " ".join(rng.choice(words, size=3))
        sentences.append(f"Task: {text}, State: {' '.join(map(str, rng.integers(0, 256, 8)))};\nAction: ")
        sentences.append(f"{text}\n")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, user_defined_symbols=["\n"],
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, num_threads=1, minloglevel=2,
    )
    return buf.getvalue()


def write_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    path.write_bytes(trained_tokenizer_bytes(vocab_size))
    return path


def write_lerobot_processors(directory, mode: str) -> None:
    """The files LeRobot 0.6.1's `save_pretrained` writes for the pi05 pre/post-processors."""
    stats = {"observation.state.mean": torch.full((8,), 0.5), "observation.state.std": torch.full((8,), 2.0),
             "observation.state.q01": torch.zeros(8), "observation.state.q99": torch.ones(8),
             "action.mean": torch.arange(7.0), "action.std": torch.full((7,), 3.0),
             "action.q01": torch.zeros(7), "action.q99": torch.tensor([1.0, 1, 1, 1, 1, 1, 0])}
    norm_map = {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}
    features = {"observation.state": {"type": "STATE", "shape": [8]},
                "observation.images.image": {"type": "VISUAL", "shape": [3, 224, 224]},
                "action": {"type": "ACTION", "shape": [7]}}
    save_file(stats, str(directory / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    save_file(stats, str(directory / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    (directory / "policy_preprocessor.json").write_text(json.dumps({"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "normalizer_processor", "config": {"eps": 1e-8, "features": features, "norm_map": norm_map},
         "state_file": "policy_preprocessor_step_3_normalizer_processor.safetensors"},
        {"registry_name": "pi05_prepare_state_tokenizer_processor_step", "config": {}}]}))
    (directory / "policy_postprocessor.json").write_text(json.dumps({"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor",
         "config": {"eps": 1e-8, "features": {"action": features["action"]}, "norm_map": norm_map},
         "state_file": "policy_postprocessor_step_0_unnormalizer_processor.safetensors"}]}))

