"""Which init states a checkpoint was trained on, and a warning when a sweep evaluates them.

`libero-eval train` writes `training_data.json` into the checkpoints it exports:
    {"init_states": {"libero_spatial": {"0": [0, 1, ...], "1": [...]}}, "demos": "<dataset dirs>"}
(the kept `train`-split episodes of its demo datasets). An episode on one of those init states measures
how well the model reproduces its training data, not how it generalises: its success rate is inflated.
Checkpoints without the file (openpi's, LeRobot's) say nothing, and nothing is warned.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

TRAINING_FILE = "training_data.json"


def read_trained_on(checkpoint: str | Path | None) -> dict[str, dict[int, set[int]]]:
    """{suite: {task: init states}} from a checkpoint directory's training_data.json ({} when absent)."""
    if not checkpoint:
        return {}
    path = Path(checkpoint) / TRAINING_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {suite: {int(task): set(map(int, trials)) for task, trials in tasks.items()}
            for suite, tasks in (data.get("init_states") or {}).items()}


def write_trained_on(directory: str | Path, init_states: dict[str, dict[str, list[int]]], demos: str) -> None:
    (Path(directory) / TRAINING_FILE).write_text(json.dumps({"init_states": init_states, "demos": demos}, indent=2))


def _ranges(values: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def overlap_warning(config: dict[str, Any] | Any, planned: list[tuple[str, int, int]]) -> str | None:
    """A one-paragraph warning when planned (suite, task, trial) episodes use the checkpoint's training init
    states; None otherwise. `config`: a SweepConfig or a stored config dict."""
    model = (config.get("model") or {}) if isinstance(config, dict) else dataclasses.asdict(config.model)
    if model.get("kind") != "checkpoint":
        return None
    trained = read_trained_on(model.get("checkpoint"))
    hits: dict[tuple[str, int], list[int]] = {}
    for suite, task, trial in planned:
        if trial in trained.get(suite, {}).get(task, ()):
            hits.setdefault((suite, task), []).append(trial)
    if not hits:
        return None
    where = "; ".join(f"{suite} task {task}: {_ranges(sorted(set(trials)))}" for (suite, task), trials in sorted(hits.items()))
    held = "; ".join(f"{suite} task {task}: not {_ranges(sorted(trained[suite][task]))}"
                     for (suite, task) in sorted(hits))
    count = sum(len(t) for t in hits.values())
    return (f"{count} of {len(planned)} planned (task, init state) pairs use init states this checkpoint was "
            f"trained on ({where}): their success rates measure recall of the training data and are inflated. "
            f"Held-out init states: {held} (e.g. trials=[40, 41, ...]).")
