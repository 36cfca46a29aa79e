"""The on-disk demonstration dataset: what `libero-eval record-demos` writes and `libero-eval train` reads.

Format (documented in README "Demonstrations"):
  <out>/dataset.json            recording settings (image_size, every, held-out trials, tasks); a resumed
                                recording must use the same ones
  <out>/manifest.jsonl          one line per finished episode (kept or not): suite, task_id, trial, split
                                ("train" | "held_out" by init-state index), success, steps, frames, file,
                                replay_drift (max abs sim-state difference of the rendering replay: 0;
                                above demos.MAX_REPLAY_DRIFT the episode is not kept, `dropped` says why)
  <out>/<suite>/task<NN>/trial<NN>.npz, kept episodes only:
      actions       float32 [T, 7]     the executed actions after the settle steps (the expert's, plus the
                                       perturbation when recorded with --noise)
      labels        float32 [T, 7]     the expert's own action at each step (what training imitates; equal
                                       to `actions` without --noise)
      sim_states    float64 [T + 1, D] flattened MuJoCo state before each action (and the final one)
      frame_steps   int32   [F]        step t of each rendered observation (the state before action t)
      images        uint8   [F, S, S, 3] agentview, protocol-processed, fitted to S = image_size
      wrist_images  uint8   [F, S, S, 3] eye-in-hand, same processing
      states        float32 [F, 8]     the protocol's state vector at those steps
      prompt        str                the task's language instruction

numpy only: recording workers and training both import it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("libero_eval.demos")

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.jsonl"


class DatasetError(ValueError):
    """Not a demo dataset, or not one the model being trained can take."""


class NoEpisodes(DatasetError):
    """A dataset has no kept episode in the requested split."""


def is_kept(row: dict[str, Any]) -> bool:
    """A manifest row whose episode is in the dataset (the expert succeeded and the replay was exact)."""
    return bool(row["success"] and row["file"])


def episode_file(suite: str, task_id: int, trial: int) -> str:
    return f"{suite}/task{task_id:02d}/trial{trial:02d}.npz"


def trained_init_states(demos: str) -> dict[str, dict[str, list[int]]]:
    """{suite: {task: init states}} of the kept train-split episodes of comma-separated dataset dirs (what a
    checkpoint trained on them must not be evaluated on: libero_eval/trained_on.py)."""
    out: dict[str, dict[str, set[int]]] = {}
    for root in (d.strip() for d in demos.split(",") if d.strip()):
        for row in read_manifest(root):
            if is_kept(row) and row["split"] == "train":
                out.setdefault(row["suite"], {}).setdefault(str(row["task_id"]), set()).add(int(row["trial"]))
    return {suite: {task: sorted(trials) for task, trials in sorted(tasks.items(), key=lambda kv: int(kv[0]))}
            for suite, tasks in sorted(out.items())}


def read_manifest(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / MANIFEST_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from an interrupted run: that episode reruns
                logger.warning("skipping a torn manifest line in %s", path)
    return rows


# --------------------------------------------------------------------------------------------------------
# Reading a dataset back as training samples


@dataclasses.dataclass
class DemoSamples:
    """Every rendered frame of the kept episodes of one split, with its action chunk."""

    images: np.ndarray  # [N, 2, S, S, 3] uint8 (agentview, wrist)
    states: np.ndarray  # [N, 8] float32 raw
    chunks: np.ndarray  # [N, H, 7] float32 raw expert actions from the frame's step on (held still past the end)
    prompts: list[str]  # per sample
    all_actions: np.ndarray  # [M, 7] every recorded action (norm stats)
    episodes: int

    def __len__(self) -> int:
        return len(self.states)


def load_demos(root: str | Path, split: str, horizon: int, image_size: int) -> DemoSamples:
    root = Path(root)
    if not (root / DATASET_FILE).is_file():
        raise DatasetError(f"{root} is not a demo dataset (no {DATASET_FILE}); record one with "
                           f"`libero-eval record-demos --out {root}`")
    meta = json.loads((root / DATASET_FILE).read_text())
    if meta["image_size"] != image_size:
        raise DatasetError(f"demos in {root} have {meta['image_size']} px images; the model takes {image_size} px "
                           f"(record with --image-size {image_size})")
    rows = [r for r in read_manifest(root) if is_kept(r) and r["split"] == split]
    images, states, chunks, prompts, actions = [], [], [], [], []
    for row in rows:
        with np.load(root / row["file"]) as z:
            # the expert's own actions are the targets; `actions` (what ran) differ from them in DART demos
            acts = z["labels"] if "labels" in z.files else z["actions"]
            steps = z["frame_steps"]
            hold = np.zeros((horizon, acts.shape[1]), dtype=np.float32)
            hold[:, -1] = acts[-1, -1]  # past the end: stay, gripper as it was
            padded = np.concatenate([acts, hold])
            chunks.append(np.stack([padded[t:t + horizon] for t in steps]))
            images.append(np.stack([z["images"], z["wrist_images"]], axis=1))
            states.append(z["states"])
            prompts += [str(z["prompt"])] * len(steps)
            actions.append(acts)
    if not rows:
        raise NoEpisodes(f"no kept {split!r} episodes in {root}")
    return DemoSamples(images=np.concatenate(images), states=np.concatenate(states),
                       chunks=np.concatenate(chunks).astype(np.float32), prompts=prompts,
                       all_actions=np.concatenate(actions), episodes=len(rows))


def load_datasets(demos: str, split: str, horizon: int, image_size: int) -> DemoSamples:
    """`load_demos` over one or several comma-separated dataset directories, concatenated."""
    roots = [d.strip() for d in demos.split(",") if d.strip()]
    if not roots:
        raise DatasetError("no demo dataset given (--demos DIR[,DIR...])")
    parts = []
    for root in roots:
        try:
            parts.append(load_demos(root, split, horizon, image_size))
        except NoEpisodes:
            if split == "train":
                raise
    if not parts:
        raise NoEpisodes(f"no kept {split!r} episodes in {', '.join(roots)}")
    if len(parts) == 1:
        return parts[0]
    return DemoSamples(images=np.concatenate([p.images for p in parts]),
                       states=np.concatenate([p.states for p in parts]),
                       chunks=np.concatenate([p.chunks for p in parts]), prompts=sum((p.prompts for p in parts), []),
                       all_actions=np.concatenate([p.all_actions for p in parts]),
                       episodes=sum(p.episodes for p in parts))
