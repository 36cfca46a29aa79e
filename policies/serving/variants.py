"""Policy variants: a label plus one validated, typed configuration per axis, built once from a config entry.

    variant = PolicyVariant.make("adaptive_w3", "adaptive", {"window": 3, "pixel_mae": 6.5})
    variant.policy     # AdaptiveConfig(window=3, pixel_mae=6.5): the policy's own typed config
    variant.denoise    # DenoiseSettings(num_steps=None, ...): Pi0.5 paths only (None for model-free ones)
    variant.execution  # ExecutionSettings(timing="sync", latency="calibrated", ...): every variant
    variant.rtc        # RTCSettings(rtc_schedule="linear", ...): Pi0.5 paths only, used where execution is rtc

A variant's raw parameters are split by axis: the denoising knobs go to `DenoiseSettings`, the rest to the
named policy's config dataclass. A new axis (episode timing, a latency model, noise repeats) is one more
typed field here and one more entry in `AXES`, not a new path through the code. Validation happens in
`make` only; engines and actors take the typed objects as they are.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from policies.base import Policy
from policies.cache import CACHE_POLICY_NAMES, REGISTRY
from policies.expert import ExpertPolicy
from policies.expert.expert import ExpertParams
from policies.pi05.configuration import SCHEDULES, SOLVERS
from policies.pi05.rtc import JACOBIANS, RTC_SCHEDULES
from policies.serving.latency import MEASURED
from policies.simple import HoldConfig, HoldPolicy


class VariantError(ValueError):
    """A variant that cannot be built: unknown name or parameter, or a bad value (named, with what is valid)."""


@dataclasses.dataclass(frozen=True)
class DenoiseSettings:
    """The denoising knobs of every Pi0.5 path (seed 004): steps (None: the checkpoint's), time grid, solver."""

    num_steps: int | None = None
    schedule: str = "linear"
    solver: str = "euler"

    def __post_init__(self) -> None:
        steps = self.num_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"num_steps must be an integer >= 1, got {steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver {self.solver!r}: expected one of {', '.join(SOLVERS)}")

    @property
    def key(self) -> tuple[int | None, str, str]:
        return self.num_steps, self.schedule, self.solver

    def resolved(self, default_steps: int) -> DenoiseSettings:
        """With the checkpoint's step count filled in where the variant left it unset."""
        return self if self.num_steps is not None else dataclasses.replace(self, num_steps=default_steps)


TIMINGS = ("sync", "realtime")
FALLBACKS = ("hold", "repeat_last")
EXECUTIONS = ("naive", "rtc")


@dataclasses.dataclass(frozen=True)
class ExecutionSettings:
    """How the closed loop runs a variant's chunks and prices its frames (every variant, model-free too).

    timing: sync (the simulator waits for the policy) | realtime (it does not: a chunk arrives
    ceil(cost x control rate) env steps after its query; libero_eval/execution.py). latency: the model that
    prices a frame (policies/serving/latency.py): `calibrated`, `measured` or a profile name. fallback: what
    the robot does in realtime when it runs out of actions: hold (zero motion, last gripper command) or
    repeat_last (the last action again). execution (realtime): naive (the new chunk as sampled) | rtc
    (real-time chunking: sampled as an inpainting of the chunk still executing; policies/pi05/rtc.py)."""

    timing: str = "sync"
    latency: str = "calibrated"
    fallback: str = "hold"
    execution: str = "naive"

    def __post_init__(self) -> None:
        if self.timing not in TIMINGS:
            raise ValueError(f"timing: expected one of {', '.join(TIMINGS)}, got {self.timing!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution: expected one of {', '.join(EXECUTIONS)}, got {self.execution!r}")
        if self.execution == "rtc" and self.timing != "realtime":
            raise ValueError(f"execution: rtc inpaints the chunk that keeps executing while the next one is "
                             f"computed; it needs timing realtime, got timing {self.timing!r}")
        if self.execution == "rtc" and self.latency == MEASURED:
            raise ValueError("execution: rtc guides with this frame's delay, which must be known before its "
                             "denoising: use a modelled latency (calibrated or a profile), not measured")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback: expected one of {', '.join(FALLBACKS)}, got {self.fallback!r}")
        if not isinstance(self.latency, str) or not self.latency:
            raise ValueError(f"latency: expected a latency model name, got {self.latency!r}")

    @property
    def key(self) -> tuple[str, str, str]:
        """What a variant is compared within: the baseline of the same timing, latency model and execution."""
        return self.timing, self.latency, self.execution


@dataclasses.dataclass(frozen=True)
class RTCSettings:
    """Real-time chunking's knobs (policies/pi05/rtc.py), used by `execution: rtc` variants. Defaults are
    LeRobot 0.6.1's RTCConfig (the paper's experiments use the exp schedule and beta = 5).

    rtc_schedule: prefix weights zeros | ones | linear | exp. rtc_max_guidance: beta, the clip of the
    guidance weight. rtc_horizon: LeRobot's execution_horizon, how many of the leftover actions are guided
    (clipped to the leftover's length). rtc_jacobian: identity (LeRobot 0.6.1: the weighted error itself)
    | model (the paper: a vector-Jacobian product through the velocity network, eager PyTorch)."""

    rtc_schedule: str = "linear"
    rtc_max_guidance: float = 10.0
    rtc_horizon: int = 10
    rtc_jacobian: str = "identity"

    def __post_init__(self) -> None:
        if self.rtc_schedule not in RTC_SCHEDULES:
            raise ValueError(f"rtc_schedule: expected one of {', '.join(RTC_SCHEDULES)}, got {self.rtc_schedule!r}")
        if self.rtc_jacobian not in JACOBIANS:
            raise ValueError(f"rtc_jacobian: expected one of {', '.join(JACOBIANS)}, got {self.rtc_jacobian!r}")
        if not (self.rtc_max_guidance > 0 and math.isfinite(self.rtc_max_guidance)):
            raise ValueError(f"rtc_max_guidance: expected a weight > 0, got {self.rtc_max_guidance!r}")
        if isinstance(self.rtc_horizon, bool) or not isinstance(self.rtc_horizon, int) or self.rtc_horizon < 1:
            raise ValueError(f"rtc_horizon: expected an integer >= 1, got {self.rtc_horizon!r}")


# Policies without a model: name -> (Policy class, its config dataclass). Pi0.5 cache policies: policies.cache.
MODEL_FREE: dict[str, tuple[type[Policy], type]] = {"hold": (HoldPolicy, HoldConfig), "expert": (ExpertPolicy, ExpertParams)}


@dataclasses.dataclass
class ServedConfig:
    """`served`: whatever the openpi-protocol server of `model.kind: openpi_server` serves (its cache policy
    and denoising are the server's); no parameters of its own, only the execution axis."""


class ServedPolicy:
    """What a rollout worker builds for a `served` variant's queries: images and state, as openpi's clients."""

    needs_images = True
    needs_privileged = False


SERVED = "served"
POLICY_NAMES = (*MODEL_FREE, *CACHE_POLICY_NAMES, SERVED)
# Per-variant axes besides the policy's own parameters: axis -> config class. Pi0.5 paths only ...
AXES: dict[str, type] = {"denoise": DenoiseSettings, "rtc": RTCSettings}
# ... and for every variant
GENERAL_AXES: dict[str, type] = {"execution": ExecutionSettings}


def config_class(name: str) -> type:
    if name in MODEL_FREE:
        return MODEL_FREE[name][1]
    if name in REGISTRY:
        return REGISTRY[name][0]
    if name == SERVED:
        return ServedConfig
    raise VariantError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")


def parameter_types(cls: type) -> dict[str, tuple[type, bool]]:
    """{field: (type, nullable)} of a config dataclass (nullable: `null` selects the documented default)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for field in dataclasses.fields(cls):
        args = typing.get_args(hints[field.name])  # (float, NoneType) for `float | None`, () for a plain type
        base = next(t for t in args if t is not type(None)) if args else hints[field.name]
        out[field.name] = (base, type(None) in args)
    return out


def _type_ok(value: Any, expected: type) -> bool:
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _build(cls: type, params: dict[str, Any], name: str) -> Any:
    types = parameter_types(cls)
    for key, value in params.items():
        expected, nullable = types[key]
        if not (value is None and nullable) and not _type_ok(value, expected):
            raise VariantError(f"policy {name!r} parameter {key!r}: expected {expected.__name__}, got {value!r}")
    coerced = {k: float(v) if types[k][0] is float and isinstance(v, int) else v for k, v in params.items()}
    return cls(**coerced)


@dataclasses.dataclass(frozen=True)
class PolicyVariant:
    """A labelled policy configuration. `params`: the raw parameters as given (labels, results, W&B)."""

    label: str
    name: str
    params: tuple[tuple[str, Any], ...]  # sorted (key, value) pairs
    policy: Any  # the policy's config dataclass (policies.cache.*Config, HoldConfig, ExpertParams)
    denoise: DenoiseSettings | None = None  # Pi0.5 paths only
    execution: ExecutionSettings = ExecutionSettings()
    rtc: RTCSettings | None = None  # Pi0.5 paths only

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def model_free(self) -> bool:
        return self.name in MODEL_FREE

    @property
    def policy_class(self) -> type:
        """The class that declares what a rollout worker must build per query (`needs_images`, ...)."""
        if self.name == SERVED:
            return ServedPolicy
        return MODEL_FREE[self.name][0] if self.model_free else REGISTRY[self.name][1]

    @property
    def needs_images(self) -> bool:
        return self.policy_class.needs_images

    @property
    def needs_privileged(self) -> bool:
        return self.policy_class.needs_privileged

    def describe(self) -> dict[str, Any]:
        rtc = dataclasses.asdict(self.rtc) if self.rtc is not None and self.execution.execution == "rtc" else {}
        return {"label": self.label, "name": self.name, **self.param_dict, **dataclasses.asdict(self.execution), **rtc}

    @classmethod
    def make(cls, label: str, name: str, params: dict[str, Any] | None = None,
             defaults: dict[str, Any] | None = None) -> PolicyVariant:
        """Validate `params` for policy `name` and split them by axis; errors name the key and the value.
        `defaults` fill the general axes' fields the params leave out (the sweep's episode.timing, latency,
        ...); they are not part of `params` (labels, results)."""
        params = dict(params or {})
        policy_cls = config_class(name)
        axes = {**GENERAL_AXES, **({} if name in MODEL_FREE or name == SERVED else AXES)}
        axis_fields = {f.name: axis for axis, c in axes.items() for f in dataclasses.fields(c)}
        valid = set(parameter_types(policy_cls)) | set(axis_fields)
        for key in params:
            if key not in valid:
                raise VariantError(f"policy {name!r} has no parameter {key!r}; valid parameters: "
                                   f"{', '.join(sorted(valid)) or 'none'}")
        try:
            by_axis = {axis: _build(axes[axis], {**{k: v for k, v in (defaults or {}).items() if axis_fields.get(k) == axis},
                                                 **{k: v for k, v in params.items() if axis_fields.get(k) == axis}}, name)
                       for axis in set(axis_fields.values())}
            policy = _build(policy_cls, {k: v for k, v in params.items() if k not in axis_fields}, name)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, VariantError):
                raise
            raise VariantError(f"policy {label!r}: {exc}") from None
        rtc_given = sorted(k for k in params if axis_fields.get(k) == "rtc")
        if rtc_given and by_axis["execution"].execution != "rtc":
            raise VariantError(f"policy {label!r}: {', '.join(rtc_given)} only apply to execution: rtc, and this "
                               f"variant executes {by_axis['execution'].execution!r} (list RTC variants in an entry "
                               "of their own)")
        if name in MODEL_FREE and by_axis["execution"].execution == "rtc":
            raise VariantError(f"policy {label!r}: execution rtc guides a flow model's denoising; {name!r} has "
                               "no model (use execution: naive)")
        if name == SERVED and by_axis["execution"].execution == "rtc":
            raise VariantError(f"policy {label!r}: execution rtc guides the denoising inside the model, which a "
                               "served policy keeps to its server (use execution: naive)")
        return cls(label=label, name=name, params=tuple(sorted(params.items())), policy=policy,
                   denoise=by_axis.get("denoise"), execution=by_axis["execution"], rtc=by_axis.get("rtc"))
