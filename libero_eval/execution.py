"""How chunks become actions in closed loop, and what each frame costs.

**sync** (openpi's protocol): the simulator waits for the policy. A chunk is queried, its first
`replan_steps` actions run, the next query follows.

**realtime**: the simulator does not wait. This is the "naive asynchronous" execution of Black et al. 2025,
*Real-Time Execution of Action Chunking Flow Policies* (Physical Intelligence), with a deterministic clock:
- at most one query in flight; query k+1 is issued `replan_steps` env steps after query k was issued, or
  when chunk k arrives if that is later; its observation is the one at the step it is issued;
- a chunk whose frame costs c arrives d = ceil(c x control rate) steps after its query (integer
  microseconds; LIBERO's control rate is 20 Hz); from then on the robot executes it from index d (its
  first d actions belong to the past);
- until then the robot keeps executing the previous chunk past its replan point; past the chunk's last
  action it runs the fallback: `hold` (zero motion with the last gripper command; LIBERO's dummy action
  would open the gripper) or `repeat_last` (the last action again);
- the first query of an episode waits its d steps too (on the fallback); delay steps count towards
  max_steps.
A frame's cost comes from the variant's latency model (policies/serving/latency.py), never from a clock,
so a realtime episode is as deterministic and as paired as a synchronous one.

**realtime, execution rtc** runs the same clock; only the chunks differ: each is sampled as an inpainting
of the chunk still executing (real-time chunking; policies/serving/rtc.py), for the delay d this executor
then applies (the policy actor prices the frame with the same latency model, before denoising it).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from policies.serving.latency import CALIBRATED, MEASURED, LatencyError, LatencyProfile, delay_steps, read_profile
from policies.serving.variants import ExecutionSettings

LATENCY_DIR = Path(__file__).resolve().parent.parent / "configs" / "latency"
CONTROL_HZ = 20.0  # LIBERO's control rate (robosuite control_freq=20): the env reports its own

LatencyModel = LatencyProfile | str  # a profile, or MEASURED


def profile_names() -> list[str]:
    return sorted(p.stem for p in LATENCY_DIR.glob("*.yaml"))


def load_named_profile(name: str) -> LatencyProfile:
    """A profile by name (configs/latency/<name>.yaml) or by path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return read_profile(path)
    if (LATENCY_DIR / f"{name}.yaml").is_file():
        return read_profile(LATENCY_DIR / f"{name}.yaml")
    raise LatencyError(f"unknown latency model {name!r}: expected {CALIBRATED}, {MEASURED}, a profile in "
                       f"configs/latency/ ({', '.join(profile_names()) or 'none'}) or a path to a profile YAML")


def check_latency_name(name: str) -> None:
    """Fail early (config load) on a latency model that does not exist or does not parse."""
    if name not in (CALIBRATED, MEASURED):
        load_named_profile(name)


def check_prices_vjp(name: str) -> None:
    """RTC with the model jacobian needs a latency model that prices its VJP (calibrated measures it)."""
    if name not in (CALIBRATED, MEASURED) and load_named_profile(name).vjp_eval_ms is None:
        raise LatencyError(f"profile {name!r} has no vjp_eval_ms, so it cannot price rtc_jacobian: model (a VJP "
                           "per guided evaluation); add one with its source, or use rtc_jacobian: identity")


def frame_cost_us(record: dict[str, Any], model: LatencyModel) -> int:
    """A query's cost under `model`: its own compute priced by a profile, or the actor's wall time."""
    if model == MEASURED:
        return round(1000 * float((record.get("latency_ms") or {}).get("total", 0.0)))
    return model.cost_us((record.get("extra") or {}).get("compute"))


@dataclasses.dataclass
class _Pending:
    actions: np.ndarray
    arrives: int  # env step at which the chunk is there
    issued: int  # env step of its query (the chunk's index 0)
    record: dict[str, Any]


class ChunkExecutor:
    """Which action runs at each env step, given the chunks queried so far (module docstring)."""

    def __init__(self, execution: ExecutionSettings, replan_steps: int, control_hz: float = CONTROL_HZ,
                 gripper: float = -1.0):
        self.realtime = execution.timing == "realtime"
        self.fallback = execution.fallback
        self.replan_steps = replan_steps
        self.control_hz = control_hz
        self.current: np.ndarray | None = None
        self.current_issued = 0
        self.current_record: dict[str, Any] | None = None
        self.pending: _Pending | None = None
        self.next_query = 0
        self.last_action = np.array([0.0] * 6 + [gripper], dtype=np.float32)  # the robot's last command

    def query_due(self, step: int) -> bool:
        self._deliver(step)  # a chunk arriving at this step frees the slot for the next query
        return self.pending is None and step >= self.next_query

    def issue(self, step: int, actions: np.ndarray, cost_us: int, record: dict[str, Any]) -> int:
        """A query at `step` whose chunk costs `cost_us`; returns the env step of the next query (whose
        observation must be rendered). Fills the record's `delay_steps` (and `fallback_actions` later)."""
        delay = delay_steps(cost_us, self.control_hz) if self.realtime else 0
        record["delay_steps"] = delay
        record["fallback_actions"] = 0
        self.pending = _Pending(np.asarray(actions, dtype=np.float32), step + delay, step, record)
        if self.realtime:
            self.next_query = step + max(self.replan_steps, delay)
        else:  # openpi's queue: the first replan_steps actions (fewer if the chunk is shorter)
            self.next_query = step + min(self.replan_steps, len(actions))
        self._deliver(step)
        return self.next_query

    def action(self, step: int) -> tuple[np.ndarray, bool]:
        """(action to run at `step`, whether it is the fallback)."""
        self._deliver(step)
        index = step - self.current_issued
        if self.current is not None and 0 <= index < len(self.current):
            self.last_action = self.current[index]
            return self.last_action, False
        if self.pending is not None:
            self.pending.record["fallback_actions"] += 1
        elif self.current_record is not None:
            self.current_record["fallback_actions"] += 1
        if self.fallback == "repeat_last":
            return self.last_action, True
        return np.array([0.0] * 6 + [float(self.last_action[6])], dtype=np.float32), True

    def _deliver(self, step: int) -> None:
        if self.pending is not None and step >= self.pending.arrives:
            p, self.pending = self.pending, None
            self.current, self.current_issued, self.current_record = p.actions, p.issued, p.record


# -- the latency models of a run directory ------------------------------------------------------------

LATENCY_FILE = "latency.json"  # in the run directory: every latency model its variants use, as resolved


def resolve_latencies(names: set[str], run_dir: str | Path,
                      calibrate: Callable[[], dict[str, Any] | None]) -> dict[str, LatencyModel | None]:
    """Each latency model by name, fixed once per run directory: read from <run_dir>/latency.json when a
    resumed sweep already resolved it (so costs and realtime delays never change within a run), else
    resolved now and stored there. `calibrated` runs `calibrate()` (the policy actor's model on its device,
    batch 1); None where there is no model to time (model-free variants: their frames cost nothing)."""
    path = Path(run_dir) / LATENCY_FILE
    stored: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    out: dict[str, LatencyModel | None] = {}
    for name in sorted(names):
        if name not in stored:
            if name == MEASURED:
                stored[name] = MEASURED
            elif name == CALIBRATED:
                stored[name] = calibrate()
            else:
                stored[name] = load_named_profile(name).to_dict()
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stored, indent=2))
            os.replace(tmp, path)
        value = stored[name]
        out[name] = value if value is None or value == MEASURED else LatencyProfile.from_dict(value, f"{path}: {name}")
    return out


def stored_latencies(run_dir: str | Path) -> dict[str, Any]:
    """<run_dir>/latency.json as stored ({} for run directories made before latency models existed)."""
    path = Path(run_dir) / LATENCY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
