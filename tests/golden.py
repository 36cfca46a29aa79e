"""Golden frames: what the cameras show at a fixed init state, to catch silent rendering changes.

Regenerate deliberately (and look at the PNGs) with: python -m tests.golden
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).parent / "data" / "golden"
# one task of each suite, trial 0: openpi's layout where the shipped table has it (the four main suites), the
# paired per-episode seed's for libero_90
GOLDEN_CASES = [("libero_spatial", 0), ("libero_object", 0), ("libero_goal", 0), ("libero_10", 0), ("libero_90", 0)]
PER_EPISODE_SUITES = ("libero_90",)
CAMERAS = {"agentview_image": "agentview", "robot0_eye_in_hand_image": "wrist"}


def golden_path(suite: str, task_id: int, camera: str) -> Path:
    return GOLDEN_DIR / f"{suite}_task{task_id}_trial0_{camera}.png"


def render_init_frames(suite: str, task_id: int) -> dict[str, np.ndarray]:
    from libero_eval.seeding import episode_seed
    from tasks import registry
    from tasks.env import EnvConfig, LiberoEnv

    config = EnvConfig(seeding="per_episode" if suite in PER_EPISODE_SUITES else "openpi")
    with LiberoEnv(registry.get_task(suite, task_id), config) as env:
        raw = env.reset(episode_seed(suite, task_id, 0), registry.init_state(suite, task_id, 0), observe=True, trial=0)
    return {short: np.array(raw[key]) for key, short in CAMERAS.items()}


def compare(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    return {
        "max": float(diff.max()),
        "mean": float(diff.mean()),
        "frac_over_8": float((diff.max(axis=-1) > 8).mean()),
    }


def main() -> None:
    import imageio.v2 as imageio

    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for suite, task_id in GOLDEN_CASES:
        for camera, image in render_init_frames(suite, task_id).items():
            path = golden_path(suite, task_id, camera)
            imageio.imwrite(path, image)
            print("wrote", path)


if __name__ == "__main__":
    main()
