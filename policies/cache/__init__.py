"""Cache policies for Pi0.5 (definitions: reference/cache_policies.md), chosen by name + parameters:

    policy = make_cache_policy("adaptive", {"window": 3, "pixel_mae": 6.5}, layout)
    decision = policy.decide(frame)         # full | reuse | partial, reason code, signals
    policy.update(frame, decision, outputs)

One file per policy, each with its config dataclass beside it; `engine.CachedPi05Engine` serves many
sessions of them from one model, in batches. The denoising knobs (num_steps, schedule, solver) apply to
every policy and are the engine's (see `engine.DenoiseSettings`).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from policies.cache.adaptive import AdaptiveConfig, AdaptivePolicy
from policies.cache.attention_drift import AttentionDriftConfig, AttentionDriftPolicy
from policies.cache.base import CachePolicy, CachePolicyError, Decision, Frame, FrameOutputs, PrefixLayout
from policies.cache.fixed_window import FixedWindowConfig, FixedWindowPolicy
from policies.cache.none import NoneConfig, NonePolicy
from policies.cache.vla_cache import VlaCacheConfig, VlaCachePolicy

REGISTRY: dict[str, tuple[type, type[CachePolicy]]] = {
    "none": (NoneConfig, NonePolicy),
    "fixed_window": (FixedWindowConfig, FixedWindowPolicy),
    "adaptive": (AdaptiveConfig, AdaptivePolicy),
    "attention_drift": (AttentionDriftConfig, AttentionDriftPolicy),
    "vla_cache": (VlaCacheConfig, VlaCachePolicy),
}
CACHE_POLICY_NAMES = tuple(REGISTRY)


def _lookup(name: str) -> tuple[type, type[CachePolicy]]:
    if name not in REGISTRY:
        raise CachePolicyError(f"unknown cache policy {name!r}; expected one of {', '.join(CACHE_POLICY_NAMES)}")
    return REGISTRY[name]


def parameter_types(name: str) -> dict[str, tuple[type, bool]]:
    """{parameter: (type, nullable)} of a policy's config (nullable: `null` selects the documented default)."""
    config_cls, _ = _lookup(name)
    hints = typing.get_type_hints(config_cls)
    out = {}
    for field in dataclasses.fields(config_cls):
        hint = hints[field.name]
        args = typing.get_args(hint)  # (float, NoneType) for `float | None`, () for a plain type
        base = next(t for t in args if t is not type(None)) if args else hint
        out[field.name] = (base, type(None) in args)
    return out


def make_config(name: str, params: dict[str, Any]) -> Any:
    """The config dataclass of `name` from `params`; unknown parameters and bad values raise, named."""
    config_cls, _ = _lookup(name)
    valid = parameter_types(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise CachePolicyError(f"cache policy {name!r} has no parameter(s) {unknown}; valid parameters: "
                               f"{', '.join(sorted(valid)) or 'none'}")
    try:
        return config_cls(**params)
    except (TypeError, ValueError) as exc:
        raise CachePolicyError(f"cache policy {name!r}: {exc}") from None


def make_cache_policy(name: str, params: dict[str, Any], layout: PrefixLayout) -> CachePolicy:
    config = make_config(name, params)
    _, policy_cls = _lookup(name)
    try:
        return policy_cls(layout, config)
    except ValueError as exc:  # parameters that do not fit this model (layers out of range, ...)
        raise CachePolicyError(f"cache policy {name!r}: {exc}") from None


__all__ = [
    "CACHE_POLICY_NAMES",
    "REGISTRY",
    "CachePolicy",
    "CachePolicyError",
    "Decision",
    "Frame",
    "FrameOutputs",
    "PrefixLayout",
    "make_cache_policy",
    "make_config",
    "parameter_types",
]
