"""Exactness of the cached paths against the plain model (bit for bit where exactness is the claim), and
proof that vla_cache computes fewer tokens per layer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.serving.engine import Request
from policies.serving.policy import Pi05Policy
from tests.cache_helpers import cache_model, engine, moved, processor, run_session, variant
from tests.pi05_helpers import observation

SEED = 5


@pytest.fixture(scope="module")
def model():
    return cache_model()


def plain_actions(model, observations: list[dict], seed: int = SEED) -> list[np.ndarray]:
    """The plain model (Pi05Policy: every frame full) on the same observations and episode seed."""
    policy = Pi05Policy(model, processor(model.config), label="plain")
    policy.reset("plain", seed)
    return [policy.infer(obs).actions for obs in observations]


def test_baseline_paths_are_the_plain_model_bit_for_bit(model):
    observations = [moved(observation(0), step) for step in range(4)]  # a scene that changes every frame
    expected = plain_actions(model, observations)
    eng = engine(model)
    for v in [variant("none"), variant("fixed_window", window=1), variant("adaptive", window=3, pixel_mae=0.0)]:
        chunks = run_session(eng, v, observations, SEED)
        assert [c.record.decision for c in chunks] == ["full"] * 4, v.label
        for got, want in zip(chunks, expected, strict=True):
            assert np.array_equal(got.actions, want), v.label


@pytest.mark.parametrize("v", [
    variant("fixed_window", window=3),
    variant("adaptive", window=3, pixel_mae=6.5),
    variant("attention_drift"),
    variant("vla_cache", relevance="top_k"),
    variant("fixed_window", "fixed_window_heun_cosine", window=3, solver="heun", schedule="cosine", num_steps=4),
], ids=lambda v: v.label)
def test_every_reuse_path_on_a_repeated_observation_equals_the_full_path(model, v):
    observations = [observation(0)] * 3
    chunks = run_session(engine(model), v, observations, SEED)
    assert chunks[0].record.decision == "full" and {c.record.decision for c in chunks[1:]} <= {"reuse", "partial"}
    params = v.param_dict
    plain = Pi05Policy(model, processor(model.config), label="plain", num_steps=params.get("num_steps"),
                       schedule=params.get("schedule", "linear"), solver=params.get("solver", "euler"))
    plain.reset("plain", SEED)
    for chunk in chunks:  # same observation and same noise per index: the stale prefix is not stale
        assert np.array_equal(chunk.actions, plain.infer(observations[0]).actions)


def test_vla_cache_with_every_vision_token_reused_equals_the_cached_prefix(model):
    eng = engine(model)
    v = variant("vla_cache", relevance="top_k", relevance_top_k=0, static_top_k=256, reuse_proportion=1.0)
    eng.open("s", v, SEED)
    obs = observation(0)
    (first,) = eng.infer_batch([Request("s", obs)])
    cached = eng.session("s").state.prefix_kv
    (second,) = eng.infer_batch([Request("s", obs)])
    assert (second.record.decision, second.record.reason) == ("partial", "static_patches")
    assert second.record.extra["tokens_per_layer"][1:] == [784 - 512, 784 - 512]  # every camera token dropped
    merged = eng.session("s").state.prefix_kv
    for layer in range(model.config.vlm.depth):
        assert torch.equal(merged.keys[layer], cached.keys[layer])
        assert torch.equal(merged.values[layer], cached.values[layer])
    assert np.array_equal(second.actions, plain_actions(model, [obs, obs])[1])


def test_vla_cache_really_computes_fewer_tokens_per_layer(model):
    counts: list[int] = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, args, out: counts.append(args[0].shape[1]))
             for layer in model.vlm.layers]
    try:
        eng = engine(model)
        v = variant("vla_cache", relevance="top_k", static_top_k=256, reuse_proportion=0.5)
        eng.open("s", v, SEED)
        records = []
        for step in (0, 0, 1):
            counts.clear()
            (chunk,) = eng.infer_batch([Request("s", moved(observation(0), step))])
            prefix_counts = counts[: model.config.vlm.depth]  # the VLM's q_proj: the prefix pass
            records.append((chunk.record, prefix_counts))
    finally:
        for h in hooks:
            h.remove()
    full, partial, moved_frame = records
    tp = 784
    assert full[0].decision == "full" and full[1] == [tp, tp, tp]
    assert partial[0].decision == "partial" and partial[1] == partial[0].extra["tokens_per_layer"]
    assert partial[1][0] == tp and partial[1][1] < tp and partial[1][2] == partial[1][1]
    skipped = 1 - sum(partial[1]) / (3 * tp)
    assert partial[0].signals["prefix_skipped"] == pytest.approx(skipped) and skipped > 0.05
    # a moving square: its patches are not static, so fewer tokens are dropped than on a still frame
    assert moved_frame[0].decision == "partial" and moved_frame[1][1] > partial[1][1]
    assert moved_frame[0].signals["static_ratio"] < partial[0].signals["static_ratio"]


def test_attention_is_computed_at_the_one_evaluation_a_policy_reads(model, monkeypatch):
    """attention_drift reads the last velocity evaluation's maps: only that evaluation computes them (the
    others run the plain step), the maps equal that evaluation's in an every-evaluation run, and the full
    frame's actions equal the baseline's bit for bit (maps are computed beside the attention output)."""
    from policies.pi05 import modeling  # counting the action expert's softmax maps: this test only

    calls = []
    original = modeling.attention

    def counting(q, k, v, mask, scale, want_probs):
        calls.append(want_probs)
        return original(q, k, v, mask, scale, want_probs)

    eng = engine(model)
    obs = observation(0)
    monkeypatch.setattr(modeling, "attention", counting)
    (drift,) = run_session(eng, variant("attention_drift"), [obs], SEED)
    monkeypatch.setattr(modeling, "attention", original)
    depth = model.config.action_expert.depth
    assert sum(calls) == min(4, depth) and len(calls) == depth * model.config.num_steps  # one evaluation's maps
    (plain,) = run_session(eng, variant("none"), [obs], SEED)
    assert np.array_equal(drift.actions, plain.actions)
    inputs, _ = processor(model.config).prepare([obs])
    prefix = model.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
    prefix_kv = model.compute_prefix_kv(prefix)
    noise = torch.randn(1, model.config.action_horizon, model.config.action_dim, generator=torch.Generator().manual_seed(1))
    every = model.denoise(prefix_kv, prefix.pad_mask, noise, return_attention=[depth - 1])
    one = model.denoise(prefix_kv, prefix.pad_mask, noise, return_attention=[depth - 1], attention_eval=-1)
    assert len(one.attention) == 1 and len(every.attention) == model.config.num_steps
    assert torch.equal(one.attention[0][depth - 1], every.attention[-1][depth - 1])
    assert torch.equal(one.actions, every.actions)
