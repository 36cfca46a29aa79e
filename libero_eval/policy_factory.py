"""Build policies and policy engines from names and parameters (the CLI's and the configs' entry point).

Variant names: `hold` (no model: zero motion, gripper open), `expert` (the scripted pick-and-place oracle
on privileged state, policies/expert) and the Pi0.5 cache policies of
`policies/cache/` (`none` = the full path every frame, the paired baseline; `fixed_window`, `adaptive`,
`attention_drift`, `vla_cache`). Denoising knobs (num_steps, schedule, solver) apply to every Pi0.5 path.
"""
from __future__ import annotations

from typing import Any

from policies.base import Policy
from policies.cache import CACHE_POLICY_NAMES, CachePolicyError, make_config, parameter_types
from policies.cache.engine import DENOISE_PARAMS, DenoiseSettings
from policies.engine import Engine, PerSessionEngine, PolicyVariant

# name -> {parameter: type}; Pi0.5 paths also take DENOISE_PARAMS
VARIANT_PARAMS: dict[str, dict[str, type]] = {
    "hold": {},
    "expert": {"gain": float, "vmax": float, "carry_vmax": float, "yaw_gain": float, "place_tol": float,
               "funnel": float},
    **{name: {**{k: t for k, (t, _) in parameter_types(name).items()}, **DENOISE_PARAMS}
       for name in CACHE_POLICY_NAMES},
}
# parameters that accept null (their documented default, e.g. a preset's threshold)
NULLABLE: dict[str, set[str]] = {name: {k for k, (_, nullable) in parameter_types(name).items() if nullable}
                                 for name in CACHE_POLICY_NAMES}
MODEL_FREE = {"hold", "expert"}
POLICY_NAMES = tuple(VARIANT_PARAMS)

__all__ = ["MODEL_FREE", "POLICY_NAMES", "VARIANT_PARAMS", "PolicySpecError", "load_pi05", "make_engine",
           "make_model_free", "make_policy", "pi05_engine", "policy_inputs", "validate_variant"]


class PolicySpecError(ValueError):
    pass


def _type_ok(value: Any, expected: type) -> bool:
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def validate_variant(variant: PolicyVariant) -> None:
    """Unknown names or parameters, values of the wrong type or out of range fail here (before Ray or a
    model); the message lists what is valid."""
    if variant.name not in VARIANT_PARAMS:
        raise PolicySpecError(f"unknown policy {variant.name!r} (label {variant.label!r}); expected one of "
                              f"{', '.join(POLICY_NAMES)}")
    allowed = VARIANT_PARAMS[variant.name]
    for key, value in variant.params:
        if key not in allowed:
            valid = ", ".join(sorted(allowed)) or "none"
            raise PolicySpecError(f"policy {variant.name!r} has no parameter {key!r}; valid parameters: {valid}")
        if value is None and key in NULLABLE.get(variant.name, ()):
            continue
        if not _type_ok(value, allowed[key]):
            raise PolicySpecError(f"policy {variant.name!r} parameter {key!r}: expected {allowed[key].__name__}, "
                                  f"got {value!r}")
    if variant.name in MODEL_FREE:
        try:
            make_model_free(variant)
        except ValueError as exc:
            raise PolicySpecError(f"policy {variant.label!r}: {exc}") from None
        return
    try:
        _, params = DenoiseSettings.split(variant.param_dict, default_steps=10)
        make_config(variant.name, params)
    except (ValueError, CachePolicyError) as exc:
        raise PolicySpecError(f"policy {variant.label!r}: {exc}") from None


def make_model_free(variant: PolicyVariant) -> Policy:
    """A policy without a model (one per session): hold or the scripted expert."""
    if variant.name == "hold":
        from policies.simple import HoldPolicy

        return HoldPolicy(**variant.param_dict)
    if variant.name == "expert":
        from policies.expert import ExpertPolicy

        return ExpertPolicy(**variant.param_dict)
    raise PolicySpecError(f"policy {variant.name!r} needs a model")


def policy_inputs(name: str) -> tuple[bool, bool]:
    """(needs_images, needs_privileged) of a variant name: what a rollout worker must build per query."""
    if name == "hold":
        return False, False
    if name == "expert":
        return False, True
    return True, False


def make_policy(name: str, **options: Any) -> Policy:
    """A single-episode policy for `libero-eval run` (sequential, no engine)."""
    variant = PolicyVariant.make(name, name, options)
    validate_variant(variant)
    if name in MODEL_FREE:
        return make_model_free(variant)
    raise PolicySpecError(f"policy {name!r} needs a model: use `libero-eval sweep` with a model section")


def make_engine(model: dict[str, Any], variants: list[PolicyVariant], shadow: bool = False,
                replan_steps: int = 5) -> Engine:
    """The engine the policy actor runs: sessions of every variant, served from one shared model.
    `shadow`: also compute the full path per frame and record the executed chunk's deviation from it (over
    the whole chunk and over its first `replan_steps` actions, the ones the episode executes)."""
    for v in variants:
        validate_variant(v)
    if all(v.name in MODEL_FREE for v in variants):
        return PerSessionEngine(make_model_free)
    return pi05_engine(model, shadow=shadow, replan_steps=replan_steps)


def load_pi05(model: dict[str, Any]):
    """The shared Pi0.5 (a `Pi05Policy` holding model + processor) of a sweep's `model` section."""
    import torch

    from policies.pi05.policy import Pi05Policy

    device = model.get("device") or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model.get("kind", "tiny") == "tiny":
        return Pi05Policy.tiny_random(seed=int(model.get("seed", 0)), device=device)
    return Pi05Policy.from_checkpoint(model["checkpoint"], device=device, dtype=model.get("dtype"))


def pi05_engine(model: dict[str, Any], shadow: bool = False, replan_steps: int = 5) -> Engine:
    """The batched engine over the shared Pi0.5, its stages run by the section's `backend` (eager, compile,
    tensorrt: policies/pi05/backends.py); a non-eager backend is named in the engine's label."""
    from policies.cache.engine import CachedPi05Engine
    from policies.pi05.backends import BackendOptions, make_backend

    base = load_pi05(model)
    backend = make_backend(base.model, BackendOptions.from_model_section(model))
    label = base.label if backend.name == "eager" else f"{base.label}@{backend.name}"
    return CachedPi05Engine(base.model, base.processor, shadow=shadow, simple_factory=make_model_free,
                            label=label, executed_steps=replan_steps, backend=backend)
