"""Append-only JSON-lines result store: one line per finished episode, written (and fsynced) at once.

A run directory holds `results.jsonl`, `videos/`, and whatever later stages add. Re-opening a run directory
resumes it: keys already stored are finished and are not run again.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from libero_eval.specs import EpisodeResult

RESULTS_FILE = "results.jsonl"


class ResultStore:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / RESULTS_FILE
        self.videos_dir = self.run_dir / "videos"

    def append(self, result: EpisodeResult) -> None:
        if result.key in self.finished_keys():
            raise ValueError(f"episode {result.key} already has a stored result in {self.path}")
        line = json.dumps(result.to_dict(), sort_keys=True, default=_json_default)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def load(self) -> list[EpisodeResult]:
        if not self.path.exists():
            return []
        results = []
        with open(self.path, encoding="utf-8") as f:
            lines = f.readlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                results.append(EpisodeResult.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                # Only a torn last line (a crash mid-write) is expected; that episode simply reruns.
                warnings.warn(f"{self.path}:{n}: unreadable result line ignored ({exc})", stacklevel=2)
        return results

    def finished_keys(self) -> set[str]:
        return {r.key for r in self.load()}


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
