"""What a frame costs, independent of what it shared a batch with: latency models over a frame's own compute.

A frame's record says what it ran (`extra.compute`: camera images through the vision tower, prefix
token-layers computed out of a full pass's, velocity evaluations of the denoising loop). A `LatencyProfile`
prices those: per-stage times on one device at batch 1, from a measurement (`calibrate`, or
`libero-eval profile`) or a cited source (configs/latency/*.yaml). A frame's cost is the sum over what it
ran:

    cost = images x vision_ms / images_per_frame + prefix_ms x computed / full token-layers
           + velocity evaluations x velocity_eval_ms + VJP evaluations x vjp_eval_ms + overhead_ms

in integer microseconds, so that the realtime closed loop's delays (ceil(cost x control rate) env steps)
are exact. The prefix is priced linearly in the token-layers computed (reuse: 0; a partial pass: its share).
Real-time chunking (policies/pi05/rtc.py) adds work only with its `model` jacobian: a backward pass through
the action expert per guided evaluation (`vjp_evals`, priced `vjp_eval_ms` on top of the evaluation itself);
its `identity` jacobian (LeRobot's) adds a few elementwise ops on a [H, 32] chunk, priced as nothing.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

MEASURED = "measured"  # not a profile: the wall time the policy actor observed (batch-dependent)
CALIBRATED = "calibrated"  # a profile measured once per run directory on the serving device


class LatencyError(ValueError):
    """A latency profile that cannot price frames (missing field, negative time, unknown name)."""


@dataclasses.dataclass(frozen=True)
class LatencyProfile:
    name: str
    vision_ms: float  # all `images_per_frame` camera images through the vision tower (+ prompt embedding)
    prefix_ms: float  # a full prefix pass (every token through every layer), K/V written
    velocity_eval_ms: float  # one velocity evaluation of the action expert over the cached prefix
    images_per_frame: int = 3  # Pi0.5's camera slots (LIBERO: base, wrist, and the padded right wrist)
    overhead_ms: float = 0.0  # per frame, whatever it ran (pre/post-processing, transfers)
    source: str = ""  # where the numbers come from
    device: str = ""  # what they were measured on
    # the extra time of one guided evaluation's vector-Jacobian product (RTC, jacobian model); None: unknown
    vjp_eval_ms: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise LatencyError("a latency profile needs a name")
        for key in ("vision_ms", "prefix_ms", "velocity_eval_ms", "overhead_ms", "vjp_eval_ms"):
            value = getattr(self, key)
            if value is None and key == "vjp_eval_ms":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise LatencyError(f"latency profile {self.name!r}: {key} must be a time in ms >= 0, got {value!r}")
        if isinstance(self.images_per_frame, bool) or not isinstance(self.images_per_frame, int) or self.images_per_frame < 1:
            raise LatencyError(f"latency profile {self.name!r}: images_per_frame must be an integer >= 1, "
                               f"got {self.images_per_frame!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "latency profile") -> "LatencyProfile":
        if not isinstance(data, dict):
            raise LatencyError(f"{where}: expected a mapping, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in data)
        if unknown or missing:
            raise LatencyError(f"{where}: unknown keys {unknown}, missing keys {missing}; expected {sorted(fields)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def stage_us(self) -> dict[str, int]:
        """Stage prices in integer microseconds (the arithmetic every cost is made of)."""
        return {"vision": round(1000 * self.vision_ms), "prefix": round(1000 * self.prefix_ms),
                "velocity_eval": round(1000 * self.velocity_eval_ms), "overhead": round(1000 * self.overhead_ms),
                "vjp_eval": round(1000 * (self.vjp_eval_ms or 0.0))}

    def cost_us(self, compute: dict[str, int] | None) -> int:
        """A frame's cost from what it ran (a record's `extra.compute`); a frame without a model (no compute:
        hold, the scripted expert) costs nothing. Shares (images of the slots, token-layers of a full pass)
        are rounded to the nearest microsecond."""
        if not compute:
            return 0
        price = self.stage_us()
        if compute.get("vjp_evals") and self.vjp_eval_ms is None:
            raise LatencyError(f"latency profile {self.name!r} cannot price RTC's VJP (rtc_jacobian: model): it "
                               "has no vjp_eval_ms; add one (measured: libero-eval profile) or use rtc_jacobian: identity")
        vision = _share(price["vision"], compute.get("vision_images", 0), self.images_per_frame)
        full = compute.get("prefix_token_layers_full") or 0
        prefix = _share(price["prefix"], compute.get("prefix_token_layers", 0), full) if full else 0
        return (vision + prefix + compute.get("velocity_evals", 0) * price["velocity_eval"]
                + compute.get("vjp_evals", 0) * price["vjp_eval"] + price["overhead"])

    def frame_ms(self, num_steps: int = 10, evals_per_step: int = 1) -> float:
        """A full frame's cost (every image, the whole prefix, `num_steps` steps of the solver)."""
        compute = {"vision_images": self.images_per_frame, "prefix_token_layers": 1, "prefix_token_layers_full": 1,
                   "velocity_evals": num_steps * evals_per_step}
        return self.cost_us(compute) / 1000


@dataclasses.dataclass(frozen=True)
class RealtimeClock:
    """What an RTC session needs to know its own frame's delay before denoising: the variant's latency
    profile and the env's control rate (delay = delay_steps(profile.cost_us(compute), control_hz))."""

    profile: LatencyProfile
    control_hz: float

    def delay_steps(self, compute: dict[str, int]) -> int:
        return delay_steps(self.profile.cost_us(compute), self.control_hz)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.to_dict(), "control_hz": self.control_hz}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RealtimeClock":
        return cls(LatencyProfile.from_dict(data["profile"], "realtime clock"), float(data["control_hz"]))


def _share(price_us: int, part: int, whole: int) -> int:
    return (price_us * int(part) * 2 + int(whole)) // (2 * int(whole))  # round(price x part / whole), exactly


def delay_steps(cost_us: int, control_hz: float) -> int:
    """Env steps until a chunk whose frame cost `cost_us` arrives: ceil(cost x control rate), exactly."""
    if cost_us <= 0:
        return 0
    period_us = 1_000_000 / control_hz
    if period_us == int(period_us):
        return -(-cost_us // int(period_us))
    return math.ceil(cost_us * control_hz / 1_000_000)


def read_profile(path: str | Path) -> LatencyProfile:
    path = Path(path)
    if not path.is_file():
        raise LatencyError(f"latency profile file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LatencyError(f"{path} is not valid YAML: {exc}") from None
    return LatencyProfile.from_dict(data, str(path))


def write_profile(profile: LatencyProfile, path: str | Path, comment: str = "") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    path.write_text(head + yaml.safe_dump(profile.to_dict(), sort_keys=False))


def calibrate(stages, config, device, repeats: int = 5, warmup: int = 1, name: str = CALIBRATED) -> LatencyProfile:
    """Per-stage medians at batch 1 on `device` (policies.pi05.timing: the same machinery as
    benchmarks/bench_pi05.py): the vision tower over all camera slots, one full prefix pass, and the
    checkpoint's denoising loop (Euler, `config.num_steps` velocity evaluations) divided by its evaluations,
    so the loop's own per-step work is in the price. `vjp_eval_ms`: the loop guided by RTC with the model
    jacobian (eager PyTorch on any backend) minus the eager plain loop, per evaluation. `stages` is a
    Pi05Model or a backend over it."""
    import torch  # the policies package's model layer pulls torch; the profile arithmetic above does not

    from policies.pi05.timing import rtc_functions, stage_functions, synthetic_inputs, time_stages  # (same reason)

    inputs, noise = synthetic_inputs(config, 1, device)
    with torch.inference_mode():
        fns = stage_functions(stages, inputs, noise)
        fns = {k: fns[k] for k in ("vision", "prefix", "denoise")}
        rtc = rtc_functions(stages, inputs, noise)
        fns.update({"denoise_eager": rtc["denoise_eager"], "denoise_vjp": rtc["denoise_rtc_model"]})
        timed = time_stages(fns, torch.device(device), warmup, repeats)
    vjp = max(0.0, timed["denoise_vjp"]["median_ms"] - timed["denoise_eager"]["median_ms"]) / config.num_steps
    return LatencyProfile(name=name, vision_ms=round(timed["vision"]["median_ms"], 4),
                          prefix_ms=round(timed["prefix"]["median_ms"], 4),
                          velocity_eval_ms=round(timed["denoise"]["median_ms"] / config.num_steps, 4),
                          images_per_frame=int(config.num_cameras), overhead_ms=0.0,
                          source=f"calibrated: median of {repeats} runs per stage at batch 1 (policies/serving/latency.py)",
                          device=str(device), vjp_eval_ms=round(vjp, 4))
