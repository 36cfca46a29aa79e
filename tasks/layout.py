"""openpi's scene layouts, reproduced exactly for any (suite, task, trial), in any env, in any order.

Why: LIBERO's `env.seed(s)` is `np.random.seed(s)`, and every hard reset re-places the fixtures (cabinet,
stove, ...) with numpy's global RNG before `set_init_state` restores the objects. The init state does not
fix the fixtures: the same init state seen after two different resets shows the fixtures ~1 cm apart.
openpi's LIBERO evaluation (`examples/libero/main.py`) creates one env per task, calls `env.seed(7)` once
and runs init states 0..49 in order with one hard reset each, so trial k's scene is the one the (k+1)-th
reset after seeding 7 draws. Nothing else in that loop draws from the global RNG (`set_init_state` draws
nothing: checked by the table builder for every entry; env steps draw nothing: checked by the tests).

How: the RNG state before the (k+1)-th reset is MT19937 seeded with 7 and advanced by W_k 32-bit words, plus
the legacy Gaussian cache (`has_gauss`, `cached_gaussian`: robosuite draws normals, which come in pairs).
`openpi_layouts.json` ships (W_k, cache) per (suite, task, trial), measured once by
`libero-eval layout-table` with an env driven exactly as openpi drives it; restoring that state right before
a hard reset gives openpi's layout without replaying the k earlier resets (~4 s each on CPU).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

OPENPI_SEED = 7  # openpi examples/libero/main.py: Args.seed
TABLE_PATH = Path(__file__).resolve().parent / "data" / "openpi_layouts.json"
TABLE_FORMAT = 1
MAX_WORDS = 1 << 20  # a sanity bound on words between two states (a reset draws ~50-80)

# numpy's legacy RandomState state: ("MT19937", key[624] uint32, pos, has_gauss, cached_gaussian)
LegacyState = tuple


class LayoutTableError(LookupError):
    """The table has no entry for a (suite, task, trial), or an entry does not reproduce its RNG state."""


def seeded_state(seed: int = OPENPI_SEED) -> LegacyState:
    """The global RNG's state right after `np.random.seed(seed)` (what LIBERO's env.seed does)."""
    return np.random.RandomState(seed).get_state()


def _advance(key: np.ndarray, pos: int, words: int) -> tuple[np.ndarray, int]:
    bitgen = np.random.MT19937()
    bitgen.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": int(pos)}}
    if words:
        bitgen.random_raw(int(words))
    state = bitgen.state["state"]
    return np.asarray(state["key"], dtype=np.uint32), int(state["pos"])


def words_between(before: LegacyState, after: LegacyState, limit: int = MAX_WORDS) -> int:
    """How many 32-bit MT19937 words lead from `before` to `after` (exact; raises if not within `limit`)."""
    key, pos = np.asarray(before[1], dtype=np.uint32), int(before[2])
    target_key, target_pos = np.asarray(after[1], dtype=np.uint32), int(after[2])
    words = 0
    while words <= limit:
        if np.array_equal(key, target_key) and target_pos >= pos:
            return words + target_pos - pos
        # run to the end of this block, then one word more: the twist that makes the next key
        step = 624 - pos + 1
        key, pos = _advance(key, pos, step)
        words += step
    raise LayoutTableError(f"the RNG state is not reachable within {limit} words of the start state")


def state_at(words: int, gauss: float | None, seed: int = OPENPI_SEED) -> LegacyState:
    """The legacy global-RNG state `words` words after seeding `seed`, with the given Gaussian cache."""
    start = seeded_state(seed)
    key, pos = _advance(np.asarray(start[1], dtype=np.uint32), int(start[2]), words)
    return ("MT19937", key, pos, 0 if gauss is None else 1, 0.0 if gauss is None else float(gauss))


def entry_for(state: LegacyState, seed: int = OPENPI_SEED) -> list:
    """A table entry [words since seeding, cached Gaussian or None] that reproduces `state` exactly."""
    words = words_between(seeded_state(seed), state)
    entry = [words, float(state[4]) if state[3] else None]
    if not same_state(state_at(*entry, seed=seed), state):
        raise LayoutTableError(f"entry {entry} does not reproduce the RNG state it was measured from")
    return entry


def same_state(a: LegacyState, b: LegacyState) -> bool:
    """Bit-identical legacy RNG states (key, position and Gaussian cache)."""
    return (a[0] == b[0] and np.array_equal(np.asarray(a[1]), np.asarray(b[1])) and int(a[2]) == int(b[2])
            and int(a[3]) == int(b[3]) and (not a[3] or float(a[4]) == float(b[4])))


# -- the shipped table ------------------------------------------------------------------------------

def empty_table() -> dict[str, Any]:
    return {"format": TABLE_FORMAT, "seed": OPENPI_SEED, "about": __doc__.split("\n\n")[0], "built_with": {},
            "suites": {}}


def read_table(path: str | Path = TABLE_PATH) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        return empty_table()
    table = json.loads(path.read_text())
    if table.get("format") != TABLE_FORMAT or table.get("seed") != OPENPI_SEED:
        raise LayoutTableError(f"{path}: expected format {TABLE_FORMAT} with seed {OPENPI_SEED}, got format "
                               f"{table.get('format')!r} seed {table.get('seed')!r}")
    return table


def write_table(table: dict[str, Any], path: str | Path = TABLE_PATH) -> None:
    """Atomic: a crash mid-write leaves the previous table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suites = {s: {t: table["suites"][s][t] for t in sorted(table["suites"][s], key=int)}
              for s in sorted(table["suites"])}
    lines = ["{", f'  "format": {table["format"]},', f'  "seed": {table["seed"]},',
             f'  "about": {json.dumps(table["about"])},', f'  "built_with": {json.dumps(table["built_with"])},',
             '  "suites": {']
    for i, (suite, tasks) in enumerate(suites.items()):
        lines.append(f"    {json.dumps(suite)}: {{")
        for j, (task, entries) in enumerate(tasks.items()):
            comma = "," if j < len(tasks) - 1 else ""
            lines.append(f"      {json.dumps(task)}: {json.dumps(entries)}{comma}")
        lines.append("    }" + ("," if i < len(suites) - 1 else ""))
    lines += ["  }", "}", ""]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the table is read by every worker
    os.replace(tmp, path)


@functools.lru_cache(maxsize=1)
def _shipped() -> dict[str, Any]:
    return read_table(TABLE_PATH)


def missing(cases: list[tuple[str, int, int]], table: dict[str, Any] | None = None) -> list[tuple[str, int, int]]:
    """The (suite, task, trial) among `cases` the table has no entry for."""
    suites = (table or _shipped())["suites"]
    return [(s, t, k) for s, t, k in cases if k >= len(suites.get(s, {}).get(str(t), []))]


def digest(cases: list[tuple[str, int, int]], table: dict[str, Any] | None = None) -> str:
    """sha256 of the table entries of `cases` (a run directory records it: a rebuilt table is noticed)."""
    suites = (table or _shipped())["suites"]

    def entry(suite: str, task_id: int, trial: int) -> list | None:
        entries = suites.get(suite, {}).get(str(task_id), [])
        return entries[trial] if trial < len(entries) else None

    return hashlib.sha256(json.dumps([[s, t, k, entry(s, t, k)] for s, t, k in sorted(cases)]).encode()).hexdigest()


def openpi_state(suite: str, task_id: int, trial: int, table: dict[str, Any] | None = None) -> LegacyState:
    """The global-RNG state openpi's evaluation has right before the hard reset of (suite, task, trial)."""
    if missing([(suite, task_id, trial)], table):
        raise LayoutTableError(
            f"no openpi layout for {suite} task {task_id} trial {trial} in {TABLE_PATH.name}: build it with "
            f"`libero-eval layout-table --suites {suite} --tasks {task_id}` or set env.seeding: per_episode")
    words, gauss = (table or _shipped())["suites"][suite][str(task_id)][trial]
    return state_at(words, gauss)
