"""Helpers for the cache-policy and engine tests: a small 3-layer Pi0.5, its engine, scripted frames."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from policies.base import IMAGE_KEY, WRIST_IMAGE_KEY
from policies.cache import make_cache_policy
from policies.cache.base import CachePolicy, Decision, Frame, FrameOutputs, PrefixLayout
from policies.serving.engine import Request
from policies.serving.pi05 import Pi05Engine
from policies.serving.variants import PolicyVariant
from policies.pi05.configuration import Pi05Config
from policies.pi05.modeling import Pi05Model
from policies.pi05.processing import TINY_TOKENIZER, Normalizer, Pi05Processor, PromptTokenizer
from policies.pi05.stages import PrefixKV
from tests.pi05_helpers import random_model, small_config


def cache_config() -> Pi05Config:
    """small_config with 3 layers per expert: vla_cache then has a pruning layer (1) before the last."""
    cfg = small_config()
    return dataclasses.replace(cfg, name="test_cache", vlm=dataclasses.replace(cfg.vlm, depth=3),
                               action_expert=dataclasses.replace(cfg.action_expert, depth=3))


def cache_model(seed: int = 0) -> Pi05Model:
    return random_model(cache_config(), seed=seed)


def processor(config: Pi05Config) -> Pi05Processor:
    return Pi05Processor(config, PromptTokenizer(TINY_TOKENIZER, config.max_token_len), Normalizer.identity())


def engine(model: Pi05Model, shadow: bool = False) -> Pi05Engine:
    return Pi05Engine(model, processor(model.config), shadow=shadow)


def variant(name: str, label: str | None = None, **params) -> PolicyVariant:
    return PolicyVariant.make(label or name, name, params)


def run_session(eng: Pi05Engine, v: PolicyVariant, observations: list[dict], seed: int = 5,
                session: str = "s") -> list:
    """Serve `observations` one by one in a fresh session; returns the ActionChunks."""
    eng.open(session, v, seed)
    out = []
    for obs in observations:
        (result,) = eng.infer_batch([Request(session, obs)])
        if isinstance(result, BaseException):
            raise result
        out.append(result)
    eng.close(session)
    return out


def moved(obs: dict, step: int, size: int = 40) -> dict:
    """`obs` with a bright square moved `step` times by 20 px across the agentview (a changing scene)."""
    image = obs[IMAGE_KEY].copy()
    y = 20 + 20 * step
    image[y : y + size, 60 : 60 + size] = 255
    return {**obs, IMAGE_KEY: image, WRIST_IMAGE_KEY: obs[WRIST_IMAGE_KEY]}


# ---- policy-level (no model)


def layout() -> PrefixLayout:
    return PrefixLayout.from_config(cache_config())


def frame(index: int, images: torch.Tensor | None = None, state: np.ndarray | None = None, seed: int = 0) -> Frame:
    """A frame with 2 present cameras + the empty slot, images in [-1, 1]."""
    if images is None:
        images = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    state = np.zeros(8, np.float32) if state is None else np.asarray(state, np.float32)
    return Frame(index=index, images=images, image_mask=torch.tensor([True, True, False]), state=state)


def fake_kv(lay: PrefixLayout, value: float = 0.0) -> PrefixKV:
    shape = (1, 1, lay.num_tokens, 4)
    return PrefixKV(keys=tuple(torch.full(shape, value) for _ in range(lay.depth)),
                    values=tuple(torch.full(shape, value) for _ in range(lay.depth)))


def outputs_for(decision: Decision, lay: PrefixLayout, kv_value: float = 0.0,
                denoise_hot: int | None = None) -> FrameOutputs:
    """What the engine would hand back: a fake K/V, uniform prefix stats, and an action-attention map that
    is uniform (or all on token `denoise_hot`)."""
    needs = decision.needs
    per_key = torch.full((lay.num_tokens,), 1.0 / lay.num_tokens)
    if denoise_hot is not None:
        per_key = torch.zeros(lay.num_tokens)
        per_key[denoise_hot] = 1.0
    return FrameOutputs(
        prefix_kv=fake_kv(lay, kv_value),
        prefix_mask=torch.ones(1, lay.num_tokens, dtype=torch.bool),
        prefix_entropy={layer: float(1 + layer) for layer in needs.prefix_entropy},
        prefix_relevance={layer: per_key.clone() for layer in needs.prefix_relevance},
        denoise_attention={layer: per_key.expand(2, 3, -1).clone() for layer in needs.denoise_layers},
    )


class Driven:
    """A cache policy with one session's state, called as the engine calls it (decide / update)."""

    def __init__(self, policy: CachePolicy):
        self.policy, self.state = policy, policy.new_state()

    def decide(self, f: Frame) -> Decision:
        return self.policy.decide(f, self.state)

    def update(self, f: Frame, d: Decision, outputs: FrameOutputs) -> None:
        self.policy.update(f, d, outputs, self.state)

    def reset(self) -> None:
        """A new session: what the engine does when an episode starts."""
        self.state = self.policy.new_state()

    def reuse_kv(self):
        return self.state.reuse_kv()

    def nbytes(self) -> int:
        return self.state.nbytes()

    def __getattr__(self, name):
        return getattr(self.policy, name)


def driven(name: str, **params) -> Driven:
    """Cache policy `name` on the test layout, parameters validated as a config entry's are."""
    return Driven(make_cache_policy(name, PolicyVariant.make(name, name, params).policy, layout()))


def drive(policy, frames: list[Frame], lay: PrefixLayout, **outputs_kw) -> list[Decision]:
    """decide + update over a scripted frame sequence (a bare CachePolicy gets a fresh session state)."""
    policy = policy if isinstance(policy, Driven) else Driven(policy)
    decisions = []
    for f in frames:
        d = policy.decide(f)
        policy.update(f, d, outputs_for(d, lay, **outputs_kw))
        decisions.append(d)
    return decisions
