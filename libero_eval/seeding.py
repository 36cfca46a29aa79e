"""Paired seeds: everything random in an episode depends only on (suite, task, trial[, inference index]).

Never on the cache policy or the worker, so that policies differ only by their cache path.
"""
from __future__ import annotations

import hashlib


def episode_seed(suite: str, task_id: int, trial: int, repeat: int = 0) -> int:
    """A stable 31-bit seed (env.seed before reset, and the policy's noise stream). Repeat r > 0 of an
    episode gets its own; repeat 0 keeps the seed episodes had before repeats existed."""
    tail = f"/r{int(repeat)}" if repeat else ""
    digest = hashlib.sha256(f"libero-eval/{suite}/{int(task_id)}/{int(trial)}{tail}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
