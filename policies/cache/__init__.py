"""Cache policies for Pi0.5 (definitions: reference/cache_policies.md), chosen by name + parameters:

    policy = make_cache_policy("adaptive", AdaptiveConfig(window=3, pixel_mae=6.5), layout)
    state = policy.new_state()                       # one per session: what decisions compare against
    decision = policy.decide(frame, state)           # full | reuse | partial, reason code, signals
    policy.update(frame, decision, outputs, state)

One file per policy, each with its config dataclass and state beside it; `policies.serving.pi05.Pi05Engine`
serves many sessions of them from one model, in batches. The denoising knobs (num_steps, schedule, solver)
apply to every policy and belong to the variant (`policies.serving.variants.DenoiseSettings`).
"""
from __future__ import annotations

from typing import Any

from policies.cache.adaptive import AdaptiveConfig, AdaptivePolicy
from policies.cache.attention_drift import AttentionDriftConfig, AttentionDriftPolicy
from policies.cache.base import CachePolicy, CachePolicyError, CacheState, Decision, Frame, FrameOutputs, PrefixLayout
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


def make_cache_policy(name: str, config: Any, layout: PrefixLayout) -> CachePolicy:
    """The cache policy `name` with its typed `config` (policies.serving.variants builds and validates it),
    bound to a model's prefix layout; parameters that do not fit the model (layers out of range) raise."""
    if name not in REGISTRY:
        raise CachePolicyError(f"unknown cache policy {name!r}; expected one of {', '.join(CACHE_POLICY_NAMES)}")
    config_cls, policy_cls = REGISTRY[name]
    if not isinstance(config, config_cls):
        raise CachePolicyError(f"cache policy {name!r} takes a {config_cls.__name__}, got {type(config).__name__}")
    try:
        return policy_cls(layout, config)
    except ValueError as exc:
        raise CachePolicyError(f"cache policy {name!r}: {exc}") from None


__all__ = [
    "CACHE_POLICY_NAMES",
    "REGISTRY",
    "CachePolicy",
    "CachePolicyError",
    "CacheState",
    "Decision",
    "Frame",
    "FrameOutputs",
    "PrefixLayout",
    "make_cache_policy",
]
