"""Pi0.5 checkpoints: safetensors weights in the openpi PyTorch or the LeRobot layout, and their configs.

Layouts (spec E.2, E.3):
  * openpi  (`examples/convert_jax_model_to_pytorch.py`): keys as our `state_dict()`; the tied token
    embedding is stored once, as `paligemma_with_expert.paligemma.lm_head.weight`.
  * lerobot (`lerobot/pi05_*`): the same keys under a `model.` prefix; LeRobot 0.6.1 stores `lm_head` and
    `embed_tokens` as two separate tensors (813 entries).
Both carry an unused `gemma_expert.lm_head.weight`. Weights are read with safetensors only: a checkpoint is
never unpickled.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from policies.base import PolicyError
from policies.pi05.configuration import CAMERA_NAMES, GemmaConfig, Pi05Config, pi05_libero
from policies.pi05.modeling import Pi05Model, as_dtype

logger = logging.getLogger(__name__)

LAYOUTS = ("openpi", "lerobot")
LEROBOT_PREFIX = "model."
EMBED_KEY = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "paligemma_with_expert.paligemma.lm_head.weight"  # tied to EMBED_KEY
EXPERT_LM_HEAD_KEY = "paligemma_with_expert.gemma_expert.lm_head.weight"  # unused at inference
WEIGHTS_FILE = "model.safetensors"
OUR_CONFIG_FILE = "pi05_config.json"  # a full Pi05Config, written for tiny/test checkpoints

_MAX_LISTED = 40


class CheckpointError(PolicyError):
    """The weights do not fit the model; lists every missing, unexpected and mis-shaped tensor."""

    def __init__(
        self,
        path: str | Path,
        layout: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        note: str = "",
    ) -> None:
        self.path, self.layout = str(path), layout
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"checkpoint {self.path} ({layout} layout) does not match the model{note}:"]
        lines += _listing("missing", missing)
        lines += _listing("unexpected", unexpected)
        lines += _listing(
            "mis-shaped", [f"{name}: expected {list(exp)}, found {list(found)}" for name, exp, found in mismatched]
        )
        super().__init__("\n".join(lines))


def _listing(kind: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = [f"    {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        shown.append(f"    ... and {len(items) - _MAX_LISTED} more")
    return [f"  {len(items)} {kind} tensor(s):", *shown]


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a load did: which layout, which tensor filled the embedding, what was skipped."""

    path: str
    layout: str
    num_tensors: int
    file_dtypes: tuple[str, ...]
    embedding_source: str
    expert_lm_head_loaded: bool


def detect_layout(names: Iterable[str], path: str | Path = "<weights>") -> str:
    """lerobot if every key carries the `model.` prefix, openpi if none does; mixed files are an error."""
    names = list(names)
    prefixed = sum(n.startswith(LEROBOT_PREFIX) for n in names)
    if prefixed == len(names) and names:
        return "lerobot"
    if prefixed == 0:
        return "openpi"
    raise CheckpointError(
        path,
        "mixed",
        [],
        [n for n in names if not n.startswith(LEROBOT_PREFIX)],
        [],
        note=f" ({prefixed} of {len(names)} keys start with {LEROBOT_PREFIX!r}; the others are listed as unexpected)",
    )


def read_tensor_shapes(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from the safetensors header, without reading any tensor data."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        out = {}
        for name in f.keys():
            sl = f.get_slice(name)
            out[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        return out


def _to_model_name(name: str, layout: str) -> str | None:
    if layout == "lerobot":
        return name[len(LEROBOT_PREFIX):] if name.startswith(LEROBOT_PREFIX) else None
    return name


def validate_weights(model: Pi05Model, path: str | Path, layout: str = "auto") -> tuple[str, dict[str, str]]:
    """Check names and shapes against `model` (which may live on the meta device); raise CheckpointError.

    Returns the layout and a map model name -> file name of the tensors to load.
    """
    header = read_tensor_shapes(path)
    if layout == "auto":
        layout = detect_layout(header, path)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected 'auto' or one of {LAYOUTS}")
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    to_file: dict[str, str] = {}
    unexpected, mismatched = [], []
    for file_name, (shape, _dtype) in header.items():
        name = _to_model_name(file_name, layout)
        if name is None or name not in expected:
            unexpected.append(file_name)
        elif shape != expected[name]:
            mismatched.append((file_name, expected[name], shape))
        else:
            to_file[name] = file_name
    present = set(to_file) | {_to_model_name(n, layout) for n, *_ in mismatched}
    # The tied embedding may come under either name; the expert's lm_head is unused and optional.
    optional = {EXPERT_LM_HEAD_KEY}
    if EMBED_KEY in present:
        optional.add(LM_HEAD_KEY)
    if LM_HEAD_KEY in present:
        optional.add(EMBED_KEY)
    prefix = LEROBOT_PREFIX if layout == "lerobot" else ""
    missing = [prefix + name for name in expected if name not in present | optional]
    if missing or unexpected or mismatched:
        raise CheckpointError(path, layout, missing, sorted(unexpected), mismatched)
    return layout, to_file


@torch.no_grad()
def load_weights(model: Pi05Model, path: str | Path, layout: str = "auto") -> LoadReport:
    """Validate, then copy every tensor into `model` (casting to each parameter's dtype), one at a time."""
    layout, to_file = validate_weights(model, path, layout)
    params = model.state_dict(keep_vars=True)
    embedding_source = EMBED_KEY if EMBED_KEY in to_file else LM_HEAD_KEY
    dtypes = set()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name, file_name in to_file.items():
            if name == LM_HEAD_KEY and embedding_source == EMBED_KEY:
                continue  # tied: embed_tokens wins, as in LeRobot's loader
            tensor = f.get_tensor(file_name)
            dtypes.add(str(tensor.dtype).removeprefix("torch."))
            params[name].copy_(tensor)
        if EXPERT_LM_HEAD_KEY not in to_file:
            params[EXPERT_LM_HEAD_KEY].zero_()
    return LoadReport(
        path=str(path),
        layout=layout,
        num_tensors=len(to_file),
        file_dtypes=tuple(sorted(dtypes)),
        embedding_source=embedding_source,
        expert_lm_head_loaded=EXPERT_LM_HEAD_KEY in to_file,
    )


def save_weights(model: Pi05Model, path: str | Path, layout: str = "openpi", dtype: torch.dtype | None = None) -> None:
    """Write `model` as the converters do: openpi stores the tied embedding once (as lm_head); lerobot
    prefixes `model.` and stores lm_head and embed_tokens as two tensors (LeRobot 0.6.1)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    tensors = {}
    for name, tensor in model.state_dict().items():
        if layout == "openpi" and name == EMBED_KEY:
            continue
        tensor = tensor.detach().to("cpu", dtype or tensor.dtype).clone().contiguous()
        tensors[(LEROBOT_PREFIX if layout == "lerobot" else "") + name] = tensor
    save_file(tensors, str(path), metadata={"format": "pt", "layout": layout})


# --------------------------------------------------------------------------------------------------------
# Checkpoint directories and their configs


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """Where a checkpoint directory keeps things and what its config says."""

    directory: Path
    kind: str  # "openpi" | "lerobot" | "pi05" (our own pi05_config.json)
    weights: Path
    config: Pi05Config
    raw_config: dict[str, Any]
    precision: str | None  # dtype recorded by the converter/trainer, if any


_VARIANTS = {
    "gemma_2b": pi05_libero().vlm,
    "gemma_300m": pi05_libero().action_expert,
}


def _variant(name: str, role: str) -> GemmaConfig:
    if name not in _VARIANTS:
        raise PolicyError(f"unknown {role} variant {name!r} in checkpoint config; known: {sorted(_VARIANTS)}")
    return _VARIANTS[name]


def read_checkpoint_dir(directory: str | Path, **overrides: Any) -> CheckpointInfo:
    """Find the weights and build the Pi05Config a checkpoint directory describes.

    Order: `pi05_config.json` (ours, a full config) > LeRobot `config.json` ("type": "pi05") > openpi
    `config.json` (converter output: action_dim, action_horizon, variants, precision). The prompt format
    (`discrete_state_input`) is part of the checkpoint: LeRobot always puts the state in the prompt; an
    openpi config may record it as "discrete_state_input" and otherwise defaults to pi05_libero's False.
    `overrides` replace config fields last (e.g. discrete_state_input=True for an openpi DROID fine-tune).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PolicyError(f"checkpoint directory {directory} does not exist")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        found = sorted(p.name for p in directory.glob("*.safetensors"))
        raise PolicyError(f"no {WEIGHTS_FILE} in {directory} (safetensors files there: {found or 'none'})")
    ours, theirs = directory / OUR_CONFIG_FILE, directory / "config.json"
    raw: dict[str, Any] = {}
    precision = None
    if ours.is_file():
        raw = json.loads(ours.read_text())
        config, kind = Pi05Config.from_dict(raw), "pi05"
    elif theirs.is_file():
        raw = json.loads(theirs.read_text())
        base = pi05_libero()
        if raw.get("type") == "pi05":
            kind = "lerobot"
            visual = [k for k, f in raw.get("input_features", {}).items() if f.get("type") == "VISUAL"]
            if visual and visual[:2] != ["observation.images.image", "observation.images.image2"][: len(visual)]:
                logger.warning(
                    "LeRobot camera features %s: slot 0 receives observation/image (agentview) and slot 1 "
                    "observation/wrist_image; check that this matches the fine-tune's camera order", visual
                )
            num_images = len(visual)
            num_cameras = num_images + int(raw.get("empty_cameras", 0)) or base.num_cameras
            if num_cameras > len(CAMERA_NAMES):
                raise PolicyError(f"LeRobot config has {num_cameras} cameras; at most {len(CAMERA_NAMES)} supported")
            image_size = int(raw.get("image_resolution", [224, 224])[0])
            config = dataclasses.replace(
                base,
                name=f"lerobot:{directory.name}",
                vision=dataclasses.replace(base.vision, image_size=image_size) if image_size != 224 else base.vision,
                vlm=_variant(raw.get("paligemma_variant", "gemma_2b"), "paligemma"),
                action_expert=_variant(raw.get("action_expert_variant", "gemma_300m"), "action expert"),
                action_dim=int(raw.get("max_action_dim", 32)),
                action_horizon=int(raw.get("chunk_size", 50)),
                max_token_len=int(raw.get("tokenizer_max_length", 200)),
                num_steps=int(raw.get("num_inference_steps", 10)),
                discrete_state_input=True,
                num_cameras=num_cameras,
                time_min_period=float(raw.get("min_period", 4e-3)),
                time_max_period=float(raw.get("max_period", 4.0)),
            )
            precision = raw.get("dtype")
        elif "paligemma_variant" in raw or "action_horizon" in raw:
            kind = "openpi"
            config = dataclasses.replace(
                base,
                name=f"openpi:{directory.name}",
                vlm=_variant(raw.get("paligemma_variant", "gemma_2b"), "paligemma"),
                action_expert=_variant(raw.get("action_expert_variant", "gemma_300m"), "action expert"),
                action_dim=int(raw.get("action_dim", 32)),
                action_horizon=int(raw.get("action_horizon", base.action_horizon)),
                discrete_state_input=bool(raw.get("discrete_state_input", False)),
            )
            precision = raw.get("precision")
        else:
            raise PolicyError(
                f"{theirs} is neither a LeRobot pi05 config (\"type\": \"pi05\") nor an openpi converter config "
                f"(\"paligemma_variant\"/\"action_horizon\"); keys: {sorted(raw)}"
            )
    else:
        raise PolicyError(f"no {OUR_CONFIG_FILE} or config.json in {directory}: cannot tell the model size")
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return CheckpointInfo(directory=directory, kind=kind, weights=weights, config=config, raw_config=raw,
                          precision=precision)


def build_model(
    config: Pi05Config,
    weights: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    layout: str = "auto",
) -> tuple[Pi05Model, LoadReport]:
    """Validate on the meta device first (no memory), then allocate on `device` in `dtype` and load."""
    with torch.device("meta"):
        model = Pi05Model(config)
    model.set_precision(as_dtype(dtype))
    validate_weights(model, weights, layout)
    model.to_empty(device=device)
    model.tie_weights()
    report = load_weights(model, weights, layout)
    logger.info("built %s on %s (%s): %s", config.name, device, dtype, report)
    return model.eval(), report
