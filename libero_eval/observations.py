"""The recorded-observation format: one episode's policy queries as one compressed npz.

Episodes run with `record_observations` write <run_dir>/observations/<episode>.npz (libero_eval.episode);
`libero-eval replay` and benchmarks/bench_cache.py read them back. Arrays: image and wrist_image [T, H, W, 3]
uint8, state [T, 8] float32, env_step [T] int64, prompt (str), seed (int64), key (str).

This module depends on numpy and the observation keys only (no config, no episode), so both the episode
loop and the replay tool can import it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from policies.base import IMAGE_KEY, PROMPT_KEY, STATE_KEY, WRIST_IMAGE_KEY

OBSERVATIONS_DIR = "observations"  # inside a run directory
REQUIRED_ARRAYS = ("image", "wrist_image", "state", "env_step", "prompt", "seed")


@dataclasses.dataclass
class Sequence:
    """One recorded episode: its observations in query order and the episode seed (paired noise)."""

    name: str
    seed: int
    observations: list[dict[str, Any]]
    env_steps: list[int]


def save_observations(path: str | Path, spec: Any, recorded: list[tuple[int, dict[str, Any]]]) -> Path:
    """Write an episode's (env step, observation) pairs as one compressed npz (atomically). `spec` needs
    `.seed` and `.key` (an EpisodeSpec)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "image": np.stack([np.asarray(obs[IMAGE_KEY], np.uint8) for _, obs in recorded]),  # [T, H, W, 3]
        "wrist_image": np.stack([np.asarray(obs[WRIST_IMAGE_KEY], np.uint8) for _, obs in recorded]),
        "state": np.stack([np.asarray(obs[STATE_KEY], np.float32) for _, obs in recorded]),  # [T, 8]
        "env_step": np.array([step for step, _ in recorded], np.int64),
        "prompt": np.array(str(recorded[0][1][PROMPT_KEY])),
        "seed": np.array(int(spec.seed), np.int64),
        "key": np.array(spec.key),
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    tmp.replace(path)
    return path


def load_sequence(path: str | Path) -> Sequence:
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        missing = sorted(set(REQUIRED_ARRAYS) - set(data.files))
        if missing:
            raise ValueError(f"{path} is not a recorded observation sequence: it lacks {missing}")
        prompt = str(data["prompt"])
        observations = [{IMAGE_KEY: image, WRIST_IMAGE_KEY: wrist, STATE_KEY: state, PROMPT_KEY: prompt}
                        for image, wrist, state in zip(data["image"], data["wrist_image"], data["state"], strict=True)]
        return Sequence(path.stem, int(data["seed"]), observations, [int(s) for s in data["env_step"]])
