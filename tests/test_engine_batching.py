"""Pi05Engine: batching never changes an episode's actions, sessions with different decisions share a
batch, shadow mode only observes, errors stay with their request, records carry what the report reads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from policies.base import STATE_KEY, ActionChunk, PolicyError
from libero_eval.execution import frame_cost_us, load_named_profile
from policies.serving.engine import Engine, Request, SessionLost
from policies.serving.model import ModelConfig, make_engine
from policies.serving.pi05 import Pi05Engine
from tests.cache_helpers import cache_model, engine, moved, run_session, variant
from tests.pi05_helpers import observation

# Sessions whose decisions differ frame by frame: full every frame, a window, a drift gate, token reuse,
# and two denoising variants (different solver / schedule / steps: different denoise groups).
VARIANTS = [
    variant("none"),
    variant("fixed_window", window=2),
    variant("attention_drift", drift_threshold=0.02),
    variant("vla_cache", relevance="top_k"),
    variant("none", "none_heun", solver="heun", num_steps=4),
    variant("adaptive", "adaptive_cosine", window=3, pixel_mae=3.0, schedule="cosine"),
]
FRAMES = 4
THOR = load_named_profile("thor_trt_fp8")


def episode(i: int) -> list[dict]:
    """Session i's observations: its own scene, a square moving every other frame."""
    return [moved(observation(10 + i), step // 2) for step in range(FRAMES)]


@pytest.fixture(scope="module")
def model():
    return cache_model()


@pytest.fixture(scope="module")
def batched(model):
    """Every session's frame t served in one batch of len(VARIANTS) requests (seed 100 + i)."""
    eng = engine(model)
    for i, v in enumerate(VARIANTS):
        eng.open(v.label, v, 100 + i)
    per_frame = []
    for t in range(FRAMES):
        results = eng.infer_batch([Request(v.label, episode(i)[t]) for i, v in enumerate(VARIANTS)])
        per_frame.append(results)
    return per_frame


def test_batch_of_many_sessions_is_bit_identical_to_one_by_one(model, batched):
    eng = engine(model)
    max_diff = 0.0
    for i, v in enumerate(VARIANTS):
        alone = run_session(eng, v, episode(i), seed=100 + i)
        for t in range(FRAMES):
            together = batched[t][i]
            assert isinstance(together, ActionChunk)
            assert (together.record.decision, together.record.reason) == (alone[t].record.decision,
                                                                        alone[t].record.reason)
            assert together.record.signals.keys() == alone[t].record.signals.keys()
            assert together.record.extra["compute"] == alone[t].record.extra["compute"]  # its own work only
            assert frame_cost_us(together.record.to_dict(), THOR) == frame_cost_us(alone[t].record.to_dict(), THOR)
            max_diff = max(max_diff, float(np.abs(together.actions - alone[t].actions).max()))
    assert max_diff == 0.0  # bit-identical (the measured max difference, stated in the engine docstring)


def test_a_reuse_frame_served_with_full_frames_costs_what_it_ran(batched):
    """The batch's wall time is shared; the modelled cost is the frame's own: a reuse frame next to full
    frames is billed the denoising loop only, as when it is served alone."""
    full, reuse = batched[1][0].record, batched[1][1].record  # none (full) and fixed_window (reuse), one batch
    assert (full.decision, reuse.decision) == ("full", "reuse")
    assert full.latency_ms["total"] == reuse.latency_ms["total"]  # one batch, one wall time
    assert frame_cost_us(full.to_dict(), THOR) == 174_000  # 17 + 52 + 10 x 10.2 + 3 (the tiny model: 10 steps)
    assert frame_cost_us(reuse.to_dict(), THOR) == 105_000


def test_one_batch_mixes_full_reuse_and_partial_decisions(batched):
    decisions = [chunk.record.decision for chunk in batched[1]]
    assert {"full", "reuse", "partial"} <= set(decisions)
    assert decisions[0] == "full" and decisions[1] == "reuse" and decisions[3] == "partial"
    assert [c.record.index for c in batched[2]] == [2] * len(VARIANTS)
    # denoising variants really differ from the default path on the same observation
    assert not np.array_equal(batched[0][0].actions, batched[0][4].actions)


def test_records_carry_stage_latencies_signals_and_json_extras(batched):
    for chunk in batched[1]:
        r = chunk.record
        assert {"decide", "vision", "prefix", "denoise", "total"} <= set(r.latency_ms)
        assert r.latency_ms["total"] >= r.latency_ms["denoise"] > 0
        assert all(isinstance(v, float) for v in r.signals.values())
        assert 0.0 <= r.signals["prefix_skipped"] <= 1.0
        json.dumps(r.to_dict())
    reuse = batched[1][1].record
    assert (reuse.latency_ms["vision"], reuse.latency_ms["prefix"], reuse.signals["prefix_skipped"]) == (0, 0, 1.0)
    tp = 3 * 784  # token-layers of a full prefix pass: 3 layers x 784 tokens
    assert reuse.extra["compute"] == {"vision_images": 0, "prefix_token_layers": 0, "prefix_token_layers_full": tp,
                                      "velocity_evals": 10}
    full = batched[1][0].record
    assert full.extra["compute"] == {"vision_images": 3, "prefix_token_layers": tp, "prefix_token_layers_full": tp,
                                     "velocity_evals": 10}
    heun = batched[1][4].record  # 4 heun steps: 2 velocity evaluations each
    assert heun.extra["compute"]["velocity_evals"] == 8
    drift = batched[1][2].record
    assert drift.extra["thresholds"] == {"state_drift": 0.23, "weighted_drift": 0.02}
    partial = batched[1][3].record
    assert len(partial.extra["per_layer_reuse"]) == 3 and 0 < partial.signals["prefix_skipped"] < 1
    assert partial.extra["compute"]["prefix_token_layers"] == sum(partial.extra["tokens_per_layer"])
    assert partial.extra["compute"]["vision_images"] == 3


def test_shadow_mode_only_observes(model, batched):
    eng = engine(model, shadow=True)
    for i, v in enumerate(VARIANTS):
        eng.open(v.label, v, 100 + i)
    for t in range(FRAMES):
        results = eng.infer_batch([Request(v.label, episode(i)[t]) for i, v in enumerate(VARIANTS)])
        for i, (shadowed, plain) in enumerate(zip(results, batched[t], strict=True)):
            assert np.array_equal(shadowed.actions, plain.actions)
            assert shadowed.record.decision == plain.record.decision
            s = shadowed.record.signals
            assert {"shadow_cos", "shadow_l2", "shadow_cos_executed", "shadow_l2_executed"} <= set(s)
            assert "shadow" in shadowed.record.latency_ms
            if shadowed.record.decision == "full":
                assert (s["shadow_cos"], s["shadow_l2"]) == (1.0, 0.0)
    # a reuse frame (fixed_window, last frame) is measured against the full path with the same noise
    full_path = run_session(engine(model), variant("none"), episode(1), seed=101)
    reuse = results[1]
    assert reuse.record.decision == "reuse"
    executed, reference = reuse.actions.astype(np.float64), full_path[FRAMES - 1].actions.astype(np.float64)
    assert reuse.record.signals["shadow_l2"] == pytest.approx(np.linalg.norm(executed - reference), rel=1e-6)
    assert reuse.record.signals["shadow_l2_executed"] == pytest.approx(
        np.linalg.norm(executed[:5] - reference[:5]), rel=1e-6)


def test_a_bad_request_fails_alone(model):
    eng = engine(model)
    eng.open("good", variant("none"), 1)
    bad_obs = {k: v for k, v in observation(0).items() if k != STATE_KEY}
    eng.open("other", variant("none"), 1)
    results = eng.infer_batch([Request("good", observation(0)), Request("missing", observation(0)),
                               Request("other", bad_obs), Request("good", observation(1))])
    assert isinstance(results[0], ActionChunk) and results[0].record.extra["batch_size"] == 4
    assert isinstance(results[1], SessionLost) and "no open session 'missing'" in str(results[1])
    assert isinstance(results[2], PolicyError) and "observation/state" in str(results[2])
    assert isinstance(results[3], PolicyError) and "two requests in one batch" in str(results[3])
    (again,) = eng.infer_batch([Request("other", observation(0))])
    assert again.record.index == 0  # a failed request does not advance its session


def test_evaluations_per_step_match_the_solvers(model):
    from policies.pi05.sampling import EVALUATIONS_PER_STEP
    from tests.pi05_helpers import random_inputs, random_noise

    inputs, noise = random_inputs(model.config, batch=1), random_noise(model.config, batch=1)
    with torch.no_grad():
        prefix = model.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        kv = model.compute_prefix_kv(prefix)
        for solver, per_step in EVALUATIONS_PER_STEP.items():
            assert len(model.denoise(kv, prefix.pad_mask, noise, num_steps=3, solver=solver).times) == 3 * per_step


def test_open_checks_parameters_against_the_model(model):
    eng = engine(model)
    with pytest.raises(PolicyError, match=r"attention_step 8 out of range for 8 velocity evaluations \(4 heun"):
        eng.open("a", variant("attention_drift", attention_step=8, num_steps=4, solver="heun"), 1)
    eng.open("a", variant("attention_drift", attention_step=-8, num_steps=4, solver="heun"), 1)
    with pytest.raises(ValueError, match=r"relevance_layer 3 out of range for depth 3"):
        eng.open("b", variant("vla_cache", relevance_layer=3), 1)


def test_sessions_free_their_state_and_reopen_from_scratch(model):
    eng = engine(model)
    v = variant("fixed_window", window=3)
    first = run_session(eng, v, episode(0), seed=9, session="ep")
    assert eng.sessions() == []
    eng.open("ep", v, 9)
    eng.infer_batch([Request("ep", episode(0)[0])])
    held = eng.session_bytes("ep")
    assert held >= sum(k.numel() * 4 * 2 for k in eng.session("ep").state.prefix_kv.keys)  # the stored K/V
    eng.open("ep", v, 9)  # a retried episode: reopened, state and index reset
    assert eng.session_bytes("ep") == 0
    again = [eng.infer_batch([Request("ep", obs)])[0] for obs in episode(0)]
    assert all(np.array_equal(a.actions, b.actions) for a, b in zip(first, again, strict=True))
    assert eng.close_stale(keep=set()) == ["ep"] and eng.sessions() == []


def test_make_engine_serves_pi05_variants_and_hold_together():
    variants = [variant("none"), variant("hold")]
    eng = make_engine(ModelConfig(kind="tiny", seed=0, device="cpu"), variants, shadow=True)
    assert isinstance(eng, Pi05Engine) and eng.shadow
    eng.open("a", variants[0], 1)
    eng.open("b", variants[1], 1)
    a, b = eng.infer_batch([Request("a", observation(0)), Request("b", observation(0))])
    assert a.actions.shape == (10, 7) and a.record.decision == "full"
    assert b.record.decision == "fixed" and (b.actions[:, -1] == -1).all()
    assert a.record.extra["batch_size"] == b.record.extra["batch_size"] == 2  # model-free records say it too
    assert b.record.extra["queue_wait_ms"] >= 0
    model_free = make_engine(ModelConfig(), [variant("hold")])
    assert type(model_free) is Engine  # no model is loaded for model-free variants
    with pytest.raises(PolicyError, match="needs a model"):
        model_free.open("c", variants[0], 1)
