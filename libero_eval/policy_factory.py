"""Build policies and policy engines from names and parameters (the CLI's and the configs' entry point).

Variant names: `hold` (no model: zero motion, gripper open) and the Pi0.5 inference paths (`none` = the
full path every frame; the cache policies join this table as they land in policies/cache/). Denoising
knobs (num_steps, schedule, solver) apply to every Pi0.5 path.
"""
from __future__ import annotations

from typing import Any

from policies.base import Policy
from policies.engine import Engine, PerSessionEngine, PolicyVariant

DENOISE_PARAMS = {"num_steps": int, "schedule": str, "solver": str}
SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid")
SOLVERS = ("euler", "midpoint", "heun", "dpm_solver_2", "rk4")

# name -> {parameter: type}; Pi0.5 paths also take DENOISE_PARAMS
VARIANT_PARAMS: dict[str, dict[str, type]] = {
    "hold": {},
    "none": dict(DENOISE_PARAMS),
}
MODEL_FREE = {"hold"}
POLICY_NAMES = tuple(VARIANT_PARAMS)


class PolicySpecError(ValueError):
    pass


def validate_variant(variant: PolicyVariant) -> None:
    """Unknown names or parameters, or values of the wrong type, fail here (before Ray or a model)."""
    if variant.name not in VARIANT_PARAMS:
        raise PolicySpecError(f"unknown policy {variant.name!r} (label {variant.label!r}); expected one of "
                              f"{', '.join(POLICY_NAMES)}")
    allowed = VARIANT_PARAMS[variant.name]
    for key, value in variant.params:
        if key not in allowed:
            valid = ", ".join(sorted(allowed)) or "none"
            raise PolicySpecError(f"policy {variant.name!r} has no parameter {key!r}; valid parameters: {valid}")
        expected = allowed[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float else isinstance(value, expected) and not isinstance(value, bool)
        if not ok:
            raise PolicySpecError(f"policy {variant.name!r} parameter {key!r}: expected {expected.__name__}, got {value!r}")
    params = variant.param_dict
    if params.get("schedule", "linear") not in SCHEDULES:
        raise PolicySpecError(f"schedule {params['schedule']!r}: expected one of {', '.join(SCHEDULES)}")
    if params.get("solver", "euler") not in SOLVERS:
        raise PolicySpecError(f"solver {params['solver']!r}: expected one of {', '.join(SOLVERS)}")
    if params.get("num_steps", 10) < 1:
        raise PolicySpecError(f"num_steps must be >= 1, got {params['num_steps']}")


def make_policy(name: str, **options: Any) -> Policy:
    """A single-episode policy for `libero-eval run` (sequential, no engine)."""
    validate_variant(PolicyVariant.make(name, name, options))
    if name == "hold":
        from policies.simple import HoldPolicy

        return HoldPolicy(**options)
    raise PolicySpecError(f"policy {name!r} needs a model: use `libero-eval sweep` with a model section")


def make_engine(model: dict[str, Any], variants: list[PolicyVariant], shadow: bool = False) -> Engine:
    """The engine the policy actor runs: sessions of every variant, served from one shared model.
    `shadow`: also compute the full path per frame and record the executed chunk's deviation from it."""
    for v in variants:
        validate_variant(v)
    if all(v.name in MODEL_FREE for v in variants):
        from policies.simple import HoldPolicy

        return PerSessionEngine(lambda variant: HoldPolicy())
    return _pi05_engine(model)


def _pi05_engine(model: dict[str, Any]) -> Engine:
    import torch

    from policies.pi05.policy import Pi05Policy
    from policies.simple import HoldPolicy

    device = model.get("device") or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model.get("kind", "tiny") == "tiny":
        base = Pi05Policy.tiny_random(seed=int(model.get("seed", 0)), device=device)
    else:
        base = Pi05Policy.from_checkpoint(model["checkpoint"], device=device, dtype=model.get("dtype"))

    def factory(variant: PolicyVariant) -> Policy:
        if variant.name == "hold":
            return HoldPolicy()
        p = variant.param_dict
        return Pi05Policy(base.model, base.processor, label=variant.label, checkpoint=base.checkpoint,
                          num_steps=p.get("num_steps"), schedule=p.get("schedule", "linear"),
                          solver=p.get("solver", "euler"))

    return PerSessionEngine(factory)
