"""Append-only JSON-lines result store: one line per finished episode, written (and fsynced) at once.

A run directory holds `results.jsonl`, `videos/`, and whatever later stages add. Re-opening a run directory
resumes it: keys with a final result are finished and are not run again.

One outcome per key. A stored result with status `error` and a reason in `INFRA_REASONS` says nothing about
the task (the machinery failed), so it is not final: `finished_keys()` leaves it out (a resume reruns the
episode) and a later line for the same key supersedes it (`load()` returns that later line). Any other result
is final: `append` refuses a second line for its key.

A crash mid-append leaves a last line without its newline. Before its first append a store moves such a torn
tail (or a last line that is not JSON) to `results.torn` and cuts `results.jsonl` back to its last complete
line, so the next result starts on a fresh line instead of being glued to the fragment.
"""
from __future__ import annotations

import json
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from libero_eval.specs import EpisodeResult

RESULTS_FILE = "results.jsonl"
TORN_FILE = "results.torn"

# Reasons of an `error` result that blame the infrastructure, not the policy or the task: the sweep retries
# these (its retryable set), and a stored one is superseded by a later result for the same key.
INFRA_REASONS = frozenset({"env_error", "render_error", "policy_unavailable", "worker_died"})


def is_infra_error(result: EpisodeResult) -> bool:
    """True for a result that a rerun may replace: an error whose reason is an infrastructure one."""
    return result.status == "error" and result.reason in INFRA_REASONS


class ResultStore:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / RESULTS_FILE
        self.videos_dir = self.run_dir / "videos"
        self._tail_checked = False

    def append(self, result: EpisodeResult) -> None:
        """Store `result`; refused when its key already has a final (non-infrastructure-error) result."""
        if not self._tail_checked:  # only the writer repairs: a reader may see another process's write in flight
            self._repair_tail()
            self._tail_checked = True
        stored = {r.key: r for r in self.load()}
        if result.key in stored and not is_infra_error(stored[result.key]):
            raise ValueError(f"episode {result.key} already has a stored result in {self.path}")
        line = json.dumps(result.to_dict(), sort_keys=True, default=_json_default)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def load(self) -> list[EpisodeResult]:
        """One result per key, in the order keys first appear: the first final line, else the last line."""
        if not self.path.exists():
            return []
        results: dict[str, EpisodeResult] = {}
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                result = EpisodeResult.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                # Only a torn last line (a crash mid-write, repaired by the next append) is expected.
                warnings.warn(f"{self.path}:{n}: unreadable result line ignored ({exc})", stacklevel=2)
                continue
            earlier = results.get(result.key)
            if earlier is not None and not is_infra_error(earlier):
                warnings.warn(f"{self.path}:{n}: {result.key} already has a final result; line ignored",
                              stacklevel=2)
                continue
            results[result.key] = result
        return list(results.values())

    def finished_keys(self) -> set[str]:
        """Keys with a final result; an infrastructure error is not one, so a resume reruns that episode."""
        return {r.key for r in self.load() if not is_infra_error(r)}

    def prune_videos(self) -> list[str]:
        """Delete the files in videos/ that no stored result names: partial videos of attempts that were
        killed or interrupted, and of episodes whose result was never stored. One video per stored result,
        nothing else. Call it when no episode of this run directory is running."""
        if not self.videos_dir.is_dir():
            return []
        referenced = {Path(r.video).name for r in self.load() if r.video}
        stray = sorted(p for p in self.videos_dir.iterdir() if p.is_file() and p.name not in referenced)
        for path in stray:
            path.unlink(missing_ok=True)
        return [p.name for p in stray]

    def _repair_tail(self) -> None:
        """Move a torn last line to results.torn (nothing is deleted) and cut results.jsonl after the last
        complete line."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        keep = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
        if keep == len(data) and keep:  # newline-terminated: still torn if the last line is not JSON
            start = data.rfind(b"\n", 0, keep - 1) + 1
            if data[start:keep].strip() and not _is_json(data[start:keep]):
                keep = start
        if keep == len(data):
            return
        fragment = data[keep:]
        entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "file": RESULTS_FILE,
                 "offset": keep, "bytes": len(fragment),
                 "fragment": fragment.decode("utf-8", "surrogateescape")}  # bytes back: encode the same way
        with open(self.run_dir / TORN_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with open(self.path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
        warnings.warn(f"{self.path}: torn last line ({len(fragment)} bytes at offset {keep}, a crash mid-write) "
                      f"moved to {TORN_FILE}; its episode has no stored result", stacklevel=3)


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return False
    return True


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
