"""Observation dict -> model inputs, and model actions -> LIBERO actions (spec D).

  * images: "observation/image" -> base_0_rgb, "observation/wrist_image" -> left_wrist_0_rgb, and an
    all-zero right_wrist_0_rgb with mask False (openpi `LiberoInputs` for pi0/pi05); uint8 HWC -> float
    [-1, 1] CHW (x / 255 * 2 - 1).
  * state: 8-d, normalised with the checkpoint's stats; it reaches the model only through the prompt, and
    only when `discrete_state_input` is True.
  * prompt: openpi `PaligemmaTokenizer.tokenize` for both formats, sentencepiece ids padded with 0.
  * actions: [H, 32] normalised -> first 7 dims -> unnormalised.
Normalisation follows the source of the stats: openpi `norm_stats.json` (quantiles with +1e-6 in the
range, float64 numpy math) or LeRobot processor files (the mode they record, eps only where the range is 0).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import load_file

from policies.base import ACTION_DIM, IMAGE_KEY, PROMPT_KEY, STATE_KEY, WRIST_IMAGE_KEY, PolicyError
from policies.pi05.configuration import Pi05Config
from policies.pi05.stages import Pi05Inputs

logger = logging.getLogger(__name__)

STATE_BINS = 256  # openpi tokenizer.py: np.digitize over linspace(-1, 1, 257)[:-1]
TOKENIZER_FILES = ("paligemma_tokenizer.model", "tokenizer.model")
TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny_tokenizer.model"

# --------------------------------------------------------------------------------------------------------
# Normalisation

NORM_MODES = ("identity", "quantiles", "quantile10", "mean_std", "min_max")
_INTERVAL_STATS = {"quantiles": ("q01", "q99"), "quantile10": ("q10", "q90"), "min_max": ("min", "max")}
_REQUIRED_STATS = {"quantiles": ("q01", "q99"), "quantile10": ("q10", "q90"), "mean_std": ("mean", "std"),
                   "min_max": ("min", "max"), "identity": ()}


@dataclasses.dataclass(frozen=True)
class FeatureNorm:
    """How one feature (state or actions) is (un)normalised.

    convention "openpi" (`transforms.py`): quantiles (x - q01) / (q99 - q01 + 1e-6) * 2 - 1, z-score
    (x - mean) / (std + 1e-6), in float64. convention "lerobot" (`normalize_processor.py`): quantiles with
    the range replaced by `eps` only where it is 0, mean/std (x - mean) / (std + eps) and inverse
    x * std + mean, in float32.
    """

    mode: str
    stats: Mapping[str, np.ndarray]
    convention: str = "openpi"
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.mode not in NORM_MODES:
            raise ValueError(f"unknown normalisation mode {self.mode!r}; expected one of {NORM_MODES}")
        if self.convention not in ("openpi", "lerobot"):
            raise ValueError(f"unknown normalisation convention {self.convention!r}")
        missing = [k for k in _REQUIRED_STATS[self.mode] if k not in self.stats]
        if missing:
            raise PolicyError(f"{self.mode} normalisation needs stats {missing}; available: {sorted(self.stats)}")

    @property
    def _dtype(self) -> type:
        return np.float64 if self.convention == "openpi" else np.float32

    def _offset_range(self, dims: int) -> tuple[np.ndarray, np.ndarray]:
        """(offset, range) such that normalised = 2 (x - offset) / range - 1 for the interval modes."""
        lo_key, hi_key = _INTERVAL_STATS[self.mode]
        lo, hi = self._stat(lo_key, dims), self._stat(hi_key, dims)
        if self.convention == "openpi":
            return lo, hi - lo + 1e-6
        span = hi - lo
        return lo, np.where(span == 0, self._dtype(self.eps), span)

    def _stat(self, key: str, dims: int) -> np.ndarray:
        value = np.asarray(self.stats[key], dtype=self._dtype).reshape(-1)
        if value.shape[0] < dims:
            raise PolicyError(f"normalisation stat {key!r} has {value.shape[0]} dims, need at least {dims}")
        return value[:dims]

    def normalize(self, x: np.ndarray) -> np.ndarray:
        # x: [..., D] -> [..., D] float32
        x = np.asarray(x, dtype=self._dtype)
        dims = x.shape[-1]
        if self.mode == "identity":
            out = x
        elif self.mode == "mean_std":
            eps = 1e-6 if self.convention == "openpi" else self.eps
            out = (x - self._stat("mean", dims)) / (self._stat("std", dims) + eps)
        else:
            offset, span = self._offset_range(dims)
            out = 2.0 * (x - offset) / span - 1.0 if self.convention == "lerobot" else (x - offset) / span * 2.0 - 1.0
        return out.astype(np.float32)

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        # x: [..., D] -> [..., D] float32
        x = np.asarray(x, dtype=self._dtype)
        dims = x.shape[-1]
        if self.mode == "identity":
            out = x
        elif self.mode == "mean_std":
            std = self._stat("std", dims) + (1e-6 if self.convention == "openpi" else 0.0)
            out = x * std + self._stat("mean", dims)
        else:
            offset, span = self._offset_range(dims)
            out = (x + 1.0) * span / 2.0 + offset if self.convention == "lerobot" else (x + 1.0) / 2.0 * span + offset
        return out.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Normalizer:
    state: FeatureNorm
    actions: FeatureNorm
    source: str  # where the stats came from, for describe()

    @staticmethod
    def identity() -> Normalizer:
        """No stats (tiny random model): state and actions pass through unchanged, nothing is clipped."""
        return Normalizer(FeatureNorm("identity", {}), FeatureNorm("identity", {}), source="identity")


def load_openpi_norm_stats(path: str | Path, mode: str = "quantiles") -> Normalizer:
    """openpi `norm_stats.json`: {"norm_stats": {"state": {mean, std, q01, q99}, "actions": {...}}}.

    pi05 uses quantiles (openpi `use_quantile_norm = model_type != PI0`).
    """
    path = Path(path)
    data = json.loads(path.read_text())
    stats = data.get("norm_stats", data)
    missing = [k for k in ("state", "actions") if k not in stats]
    if missing:
        raise PolicyError(f"{path} lacks norm stats for {missing}; found keys {sorted(stats)}")
    feats = {k: {s: np.asarray(v, dtype=np.float64) for s, v in stats[k].items() if v is not None}
             for k in ("state", "actions")}
    return Normalizer(FeatureNorm(mode, feats["state"]), FeatureNorm(mode, feats["actions"]), source=str(path))


def save_openpi_norm_stats(path: str | Path, state: Mapping[str, Sequence[float]],
                           actions: Mapping[str, Sequence[float]]) -> None:
    """Write stats in the openpi format (used by tests and tiny checkpoints)."""
    as_list = lambda d: {k: [float(x) for x in np.asarray(v).reshape(-1)] for k, v in d.items()}  # noqa: E731
    Path(path).write_text(json.dumps({"norm_stats": {"state": as_list(state), "actions": as_list(actions)}}, indent=2))


def load_lerobot_normalizer(directory: str | Path) -> Normalizer:
    """LeRobot processor files: `policy_preprocessor.json` (normalizer_processor step: norm_map, eps, features)
    with its stats in `<state_file>.safetensors`; actions from the postprocessor's unnormalizer if present."""
    directory = Path(directory)

    def step(file: str, registry_name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        path = directory / file
        if not path.is_file():
            return None
        for entry in json.loads(path.read_text()).get("steps", []):
            if entry.get("registry_name") == registry_name:
                state_file = entry.get("state_file")
                if state_file is None or not (directory / state_file).is_file():
                    raise PolicyError(f"{path}: step {registry_name} has no readable state_file ({state_file})")
                tensors = load_file(str(directory / state_file))
                return entry.get("config", {}), {k: v.float().numpy() for k, v in tensors.items()}
        return None

    pre = step("policy_preprocessor.json", "normalizer_processor")
    post = step("policy_postprocessor.json", "unnormalizer_processor")
    if pre is None and post is None:
        raise PolicyError(f"no LeRobot normalizer_processor/unnormalizer_processor step found in {directory}")

    def feature(found: tuple[dict[str, Any], dict[str, np.ndarray]], ftype: str, default_key: str) -> FeatureNorm:
        config, flat = found
        keys = [k for k, f in config.get("features", {}).items() if f.get("type") == ftype] or [default_key]
        key = keys[0]
        mode = str(config.get("norm_map", {}).get(ftype, "IDENTITY")).lower()
        stats = {name.rsplit(".", 1)[1]: v for name, v in flat.items() if name.rsplit(".", 1)[0] == key}
        if mode != "identity" and not stats:
            raise PolicyError(f"LeRobot normalizer in {directory} has mode {mode} for {key!r} but no stats for it")
        return FeatureNorm(mode, stats, convention="lerobot", eps=float(config.get("eps", 1e-8)))

    state = feature(pre or post, "STATE", "observation.state")  # type: ignore[arg-type]
    actions = feature(post or pre, "ACTION", "action")  # type: ignore[arg-type]
    return Normalizer(state, actions, source=f"lerobot:{directory}")


def find_normalizer(directory: str | Path, kind: str, asset_id: str | None = None) -> Normalizer:
    """The stats a checkpoint directory carries: openpi `assets/<asset_id>/norm_stats.json` (or a
    `norm_stats.json` beside the weights), LeRobot processor files otherwise."""
    directory = Path(directory)
    if kind == "lerobot" or (directory / "policy_preprocessor.json").is_file():
        return load_lerobot_normalizer(directory)
    if asset_id is not None:
        candidates = [directory / "assets" / asset_id / "norm_stats.json"]
    else:
        candidates = sorted((directory / "assets").glob("**/norm_stats.json")) + [directory / "norm_stats.json"]
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise PolicyError(
            f"no norm stats in {directory}: expected assets/<asset_id>/norm_stats.json (openpi LIBERO: "
            f"assets/physical-intelligence/libero/norm_stats.json) or norm_stats.json; looked at "
            f"{[str(c) for c in candidates]}"
        )
    if len(found) > 1:
        names = [str(f.relative_to(directory)) for f in found]
        raise PolicyError(f"several norm stats in {directory}: {names}; pass asset_id to pick one")
    return load_openpi_norm_stats(found[0])


# --------------------------------------------------------------------------------------------------------
# Prompt and tokenizer


def discretize_state(state: np.ndarray) -> np.ndarray:
    """openpi: 256 bins over [-1, 1]; values < -1 go to bin -1, values >= 0.9921875 to 255 (no clipping)."""
    # state: [D] normalised -> [D] int64
    bins = np.linspace(-1, 1, STATE_BINS + 1)[:-1]
    return np.digitize(np.asarray(state), bins=bins) - 1


def clean_prompt(prompt: str) -> str:
    return prompt.strip().replace("_", " ").replace("\n", " ")


def build_prompt(prompt: str, state: np.ndarray | None, discrete_state_input: bool) -> str:
    """The text of the discrete-state format ("Task: ..., State: ...;\\nAction: ") or the cleaned task."""
    text = clean_prompt(prompt)
    if not discrete_state_input:
        return text
    if state is None:
        raise PolicyError("discrete_state_input=True needs the normalised state to build the prompt")
    state_str = " ".join(map(str, discretize_state(state)))
    return f"Task: {text}, State: {state_str};\nAction: "


class PromptTokenizer:
    """openpi `PaligemmaTokenizer`: sentencepiece ids with BOS, right-padded with 0 to `max_len`."""

    def __init__(self, model_file: str | Path, max_len: int) -> None:
        self.path = Path(model_file)
        if not self.path.is_file():
            raise PolicyError(f"sentencepiece model {self.path} not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.max_len = max_len

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(
        self, prompt: str, state: np.ndarray | None, discrete_state_input: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """-> ids [max_len] int64, mask [max_len] bool."""
        text = build_prompt(prompt, state, discrete_state_input)
        if discrete_state_input:
            ids = self.sp.encode(text, add_bos=True)
        else:
            ids = self.sp.encode(text, add_bos=True) + self.sp.encode("\n")
        if len(ids) > self.max_len:
            logger.warning("prompt has %d tokens, truncating to max_token_len=%d: %r", len(ids), self.max_len, text)
            ids = ids[: self.max_len]
        tokens = np.zeros(self.max_len, dtype=np.int64)
        mask = np.zeros(self.max_len, dtype=bool)
        tokens[: len(ids)] = ids
        mask[: len(ids)] = True
        return tokens, mask


def find_tokenizer(directory: str | Path) -> Path:
    directory = Path(directory)
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            return directory / name
    raise PolicyError(
        f"no sentencepiece tokenizer in {directory}: put the PaliGemma tokenizer there as one of {TOKENIZER_FILES} "
        "(openpi downloads it from gs://big_vision/paligemma_tokenizer.model) or pass tokenizer_path"
    )


# --------------------------------------------------------------------------------------------------------
# Images


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """openpi_client `image_tools.resize_with_pad`: keep the aspect ratio, resize (PIL bilinear) to fit,
    centre on black padding. The model's input contract, so the policy side owns it (bit-identical to
    tasks.protocol's, which prepares the observations; tests/test_pi05_processing.py checks both agree)."""
    # image: [h, w, 3] uint8 -> [height, width, 3] uint8
    if image.dtype != np.uint8:
        raise ValueError(f"resize_with_pad expects uint8 images, got {image.dtype}")
    cur_h, cur_w = image.shape[:2]
    if (cur_h, cur_w) == (height, width):
        return image
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    resized = Image.fromarray(image).resize((new_w, new_h), resample=Image.BILINEAR)
    canvas = Image.new(resized.mode, (width, height), 0)
    canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))
    return np.asarray(canvas)


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [size, size, 3] with openpi's `resize_with_pad` (PIL bilinear, aspect kept,
    black padding). The protocol's 224 px images reach a model with a smaller vision input (the shipped
    small Pi0.5 takes 112 px) through here; demos are stored through it."""
    image = np.asarray(image)
    if image.shape[:2] == (size, size) or image.dtype != np.uint8 or image.ndim != 3:
        return image
    return resize_with_pad(image, size, size)


def image_to_model(image: Any, key: str, size: int) -> np.ndarray:
    """uint8 [S, S, 3] -> float32 [3, S, S] in [-1, 1] (openpi `Observation.from_dict`); other square or
    rectangular uint8 sizes are first fitted to S (`fit_image`)."""
    image = fit_image(np.asarray(image), size)
    if image.dtype != np.uint8 or image.shape != (size, size, 3):
        raise PolicyError(
            f"{key!r} must be uint8 [{size}, {size}, 3] (rotated and resized by the task side), "
            f"got {image.dtype} {list(image.shape)}"
        )
    return (image.astype(np.float32) / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)


# --------------------------------------------------------------------------------------------------------
# The whole pre/post-processing


class Pi05Processor:
    """Builds Pi05Inputs from LIBERO observation dicts and turns model outputs into env actions."""

    def __init__(self, config: Pi05Config, tokenizer: PromptTokenizer, normalizer: Normalizer) -> None:
        if tokenizer.vocab_size > config.vocab_size:
            raise PolicyError(
                f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model vocabulary is "
                f"{config.vocab_size}"
            )
        if tokenizer.max_len != config.max_token_len:
            raise PolicyError(f"tokenizer max_len {tokenizer.max_len} != config.max_token_len {config.max_token_len}")
        self.config, self.tokenizer, self.normalizer = config, tokenizer, normalizer

    def normalized_state(self, observation: Mapping[str, Any]) -> np.ndarray:
        state = np.asarray(observation[STATE_KEY], dtype=np.float32).reshape(-1)
        return self.normalizer.state.normalize(state)

    def prepare(
        self, observations: Sequence[Mapping[str, Any]], device: str | torch.device = "cpu"
    ) -> tuple[Pi05Inputs, np.ndarray]:
        """-> (model inputs of the batch, normalised states [B, 8])."""
        cfg = self.config
        size = cfg.vision.image_size
        images = np.zeros((len(observations), cfg.num_cameras, 3, size, size), dtype=np.float32)
        masks = np.zeros((len(observations), cfg.num_cameras), dtype=bool)
        tokens = np.zeros((len(observations), cfg.max_token_len), dtype=np.int64)
        token_masks = np.zeros_like(tokens, dtype=bool)
        states = []
        for b, obs in enumerate(observations):
            missing = [k for k in (IMAGE_KEY, WRIST_IMAGE_KEY, STATE_KEY, PROMPT_KEY) if k not in obs]
            if missing:
                raise PolicyError(f"observation lacks {missing}; it has {sorted(obs)}")
            present = [IMAGE_KEY, WRIST_IMAGE_KEY][: cfg.num_cameras]
            for slot, key in enumerate(present):
                images[b, slot] = image_to_model(obs[key], key, size)
                masks[b, slot] = True
            images[b, len(present):] = -1.0  # absent camera: zero uint8 image -> -1, mask False
            state = self.normalized_state(obs)
            states.append(state)
            tokens[b], token_masks[b] = self.tokenizer.encode(str(obs[PROMPT_KEY]), state, cfg.discrete_state_input)
        inputs = Pi05Inputs(
            images=torch.from_numpy(images).to(device),
            image_masks=torch.from_numpy(masks).to(device),
            tokens=torch.from_numpy(tokens).to(device),
            token_masks=torch.from_numpy(token_masks).to(device),
        )
        return inputs, np.stack(states)

    def postprocess(self, actions: torch.Tensor) -> np.ndarray:
        """[B, H, A] normalised model actions -> [B, H, 7] float32 env actions."""
        robot = actions.detach().to("cpu", torch.float32).numpy()[..., :ACTION_DIM]
        return self.normalizer.actions.unnormalize(robot)
