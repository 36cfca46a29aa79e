"""Are two run directories the same episodes? For refactors that must not change behaviour: compares every
episode's status, reason, steps and, query by query, decision, reason and signals (exactly, or within
--atol for float signals). Timing fields (latency, wall time) are ignored.

    python launch/compare_runs.py runs/before runs/after [--atol 0]
Exit code 0 when identical, 1 otherwise (each difference printed).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load(run_dir: Path) -> dict[str, dict]:
    out = {}
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["key"]] = row
    return out


def differences(a: dict, b: dict, atol: float) -> list[str]:
    diffs = [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in ("status", "reason", "steps", "seed") if a.get(k) != b.get(k)]
    ra, rb = a.get("records", []), b.get("records", [])
    if len(ra) != len(rb):
        diffs.append(f"queries: {len(ra)} != {len(rb)}")
    for qa, qb in zip(ra, rb):
        for k in ("decision", "reason", "env_step"):
            if qa.get(k) != qb.get(k):
                diffs.append(f"query {qa['index']} {k}: {qa.get(k)!r} != {qb.get(k)!r}")
        sa, sb = qa.get("signals", {}), qb.get("signals", {})
        if set(sa) != set(sb):
            diffs.append(f"query {qa['index']} signal names: {sorted(sa)} != {sorted(sb)}")
        for name in set(sa) & set(sb):
            x, y = sa[name], sb[name]
            if not (x == y or (isinstance(x, float) and isinstance(y, float) and math.isclose(x, y, abs_tol=atol))):
                diffs.append(f"query {qa['index']} signal {name}: {x!r} != {y!r}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--atol", type=float, default=0.0, help="absolute tolerance for float signals (default 0)")
    args = parser.parse_args(argv)
    before, after = load(args.before), load(args.after)
    bad = 0
    for key in sorted(set(before) | set(after)):
        if key not in before or key not in after:
            print(f"{key}: only in {'before' if key in before else 'after'}")
            bad += 1
            continue
        diffs = differences(before[key], after[key], args.atol)
        if diffs:
            bad += 1
            print(f"{key}:\n  " + "\n  ".join(diffs[:20]))
    queries = sum(len(r.get("records", [])) for r in before.values())
    print(f"{len(before)} episodes, {queries} queries compared: "
          f"{'identical' if not bad else f'{bad} episode(s) differ'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
