"""Cache-policy decisions on scripted frame sequences (no model): window arithmetic, forced refresh, the
state guard and vision-drift gate, VLA-Cache's token plan, and the name/parameter checks."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from libero_eval.config import ConfigError, expand_variants
from policies.cache import CachePolicyError, make_cache_policy
from policies.cache.adaptive import AdaptiveConfig, AdaptivePolicy
from policies.cache.attention_drift import AttentionDriftConfig
from policies.cache.fixed_window import FixedWindowConfig, FixedWindowPolicy
from policies.cache.vla_cache import VlaCacheConfig, VlaCachePolicy
from policies.serving.variants import PolicyVariant, VariantError
from tests.cache_helpers import Driven, drive, driven, frame, layout, outputs_for


def kinds(decisions):
    return [d.kind for d in decisions]


def reasons(decisions):
    return [d.reason for d in decisions]


# ---- fixed_window / adaptive


def test_fixed_window_full_on_frames_1_n_plus_1_2n_plus_1():
    lay = layout()
    decisions = drive(FixedWindowPolicy(lay, FixedWindowConfig(window=3)), [frame(i) for i in range(8)], lay)
    assert kinds(decisions) == ["full", "reuse", "reuse", "full", "reuse", "reuse", "full", "reuse"]
    assert reasons(decisions) == ["first_frame", "window", "window", "scheduled", "window", "window", "scheduled",
                                  "window"]
    assert [d.extra["window_position"] for d in decisions] == [1, 2, 3, 1, 2, 3, 1, 2]


def test_fixed_window_of_one_is_always_full():
    lay = layout()
    decisions = drive(FixedWindowPolicy(lay, FixedWindowConfig(window=1)), [frame(i) for i in range(4)], lay)
    assert kinds(decisions) == ["full"] * 4
    assert reasons(decisions) == ["first_frame", "scheduled", "scheduled", "scheduled"]


def test_reuse_serves_the_last_full_frames_kv_and_reset_forgets_it():
    lay = layout()
    policy = Driven(FixedWindowPolicy(lay, FixedWindowConfig(window=2)))
    for i, value in enumerate([1.0, 2.0, 3.0]):  # full (kv 1), reuse (kv 2 ignored), full (kv 3)
        d = policy.decide(frame(i))
        policy.update(frame(i), d, outputs_for(d, lay, kv_value=value))
        if i == 1:
            assert d.kind == "reuse" and float(policy.reuse_kv()[0].keys[0].max()) == 1.0
    assert float(policy.reuse_kv()[0].keys[0].max()) == 3.0 and policy.nbytes() > 0
    policy.reset()
    assert policy.nbytes() == 0 and policy.decide(frame(0)).reason == "first_frame"


def changed_images(delta_rows: int = 112) -> torch.Tensor:
    """All-zero images (uint8 127.5) with the top `delta_rows` rows of camera 0 set to +1 (uint8 255)."""
    images = torch.zeros(3, 3, 224, 224)
    images[0, :, :delta_rows] = 1.0
    return images


def test_adaptive_forced_refresh_restarts_the_window_and_records_pixel_mae():
    lay = layout()
    still, changed = torch.zeros(3, 3, 224, 224), changed_images(112)  # half of camera 0 moves by 127.5
    frames = [frame(i, images) for i, images in enumerate([still, still, changed, changed, changed, changed])]
    decisions = drive(AdaptivePolicy(lay, AdaptiveConfig(window=3, pixel_mae=6.5)), frames, lay)
    assert kinds(decisions) == ["full", "reuse", "full", "reuse", "reuse", "full"]
    assert reasons(decisions) == ["first_frame", "window", "pixel_mae", "window", "window", "scheduled"]
    assert decisions[2].signals["pixel_mae"] == pytest.approx(63.75)  # max over cameras: half of 127.5
    assert decisions[3].signals["pixel_mae"] == 0.0  # compared against the forced full frame, not frame 1
    assert decisions[2].thresholds == {"pixel_mae": 6.5}
    assert [d.extra["window_position"] for d in decisions] == [1, 2, 1, 2, 3, 1]


def test_adaptive_threshold_is_inclusive_and_zero_means_every_frame_full():
    lay = layout()
    frames = [frame(0, torch.zeros(3, 3, 224, 224)), frame(1, changed_images(11))]

    def run(threshold):
        return drive(AdaptivePolicy(lay, AdaptiveConfig(window=5, pixel_mae=threshold)), frames, lay)

    measured = run(255.0)[1].signals["pixel_mae"]
    assert measured == pytest.approx(127.5 * 11 / 224, rel=1e-6)
    assert reasons(run(measured)) == ["first_frame", "pixel_mae"]  # >= forces the refresh
    assert reasons(run(measured + 1e-4)) == ["first_frame", "window"]
    zero = drive(AdaptivePolicy(lay, AdaptiveConfig(window=5, pixel_mae=0.0)),
                 [frame(i, torch.zeros(3, 3, 224, 224)) for i in range(4)], lay)
    assert kinds(zero) == ["full"] * 4


# ---- attention_drift


def drift_policy(**params) -> Driven:
    return driven("attention_drift", **params)


def test_attention_drift_first_frame_then_state_guard_against_the_last_full_frame():
    lay = layout()
    policy = drift_policy()
    images = torch.zeros(3, 3, 224, 224)
    states = [np.zeros(8), np.full(8, 0.2), np.full(8, 0.3), np.full(8, 0.3)]
    decisions = drive(policy, [frame(i, images, s) for i, s in enumerate(states)], lay)
    # 0.2 <= 0.23 reuses; 0.3 vs the last FULL frame (state 0) trips the guard; then 0 drift again
    assert reasons(decisions) == ["first_frame", "below_threshold", "state_drift", "below_threshold"]
    assert "state_drift" not in decisions[0].signals
    assert decisions[1].signals["state_drift"] == pytest.approx(0.2)
    assert decisions[2].signals["state_drift"] == pytest.approx(0.3)
    assert decisions[2].signals["weighted_drift"] == 0.0  # measured although the guard decided (seed 003)
    assert decisions[2].signals["state_drift_prev"] == pytest.approx(0.1)  # vs frame 1, which was reused
    assert decisions[3].signals["state_drift"] == 0.0 and decisions[3].signals["weighted_drift"] == 0.0
    assert decisions[0].thresholds == {"state_drift": 0.23, "weighted_drift": 1.0}
    assert decisions[0].needs.denoise_layers == frozenset({0, 1, 2})  # "last four" of a 3-layer model = all


def test_attention_drift_weights_pixel_change_by_the_dilated_importance_map():
    lay = layout()
    policy = drift_policy(drift_threshold=0.05)
    still = torch.zeros(3, 3, 224, 224)
    far, near = still.clone(), still.clone()
    far[0, :, 150:, 150:] = 1.0  # bottom right of camera 0: far from the hot top-left patch
    near[0, :, :14, :14] = 1.0  # the hot patch itself
    first = policy.decide(frame(0, still))
    policy.update(frame(0, still), first, outputs_for(first, lay, denoise_hot=0))  # all attention on token 0
    d_far = policy.decide(frame(1, far))
    d_near = policy.decide(frame(1, near))
    assert (d_far.kind, d_far.reason, d_far.signals["weighted_drift"]) == ("reuse", "below_threshold", 0.0)
    assert (d_near.kind, d_near.reason) == ("full", "vision_drift")
    assert d_near.signals["weighted_drift_cam0"] == d_near.signals["weighted_drift"] > 0.05
    assert d_near.signals["weighted_drift_cam1"] == 0.0


def test_attention_drift_measures_every_signal_against_the_last_full_and_the_previous_frame():
    """Signals do not depend on the gate: frame 2 changes camera 1 only; its drift vs frame 1 (reused) and vs
    frame 0 (the last full) are both recorded; `cameras: base` gates on slot 0, `max` on the worst slot."""
    lay = layout()
    still, wrist = torch.zeros(3, 3, 224, 224), torch.zeros(3, 3, 224, 224)
    wrist[1, :, :14, :14] = 1.0  # camera slot 1's hot patch
    half = still.clone()
    half[1, :, :14, :14] = 0.5
    frames = [frame(0, still), frame(1, half), frame(2, wrist)]
    for cameras, expected in (("base", ["first_frame", "below_threshold", "below_threshold"]),
                              ("max", ["first_frame", "vision_drift", "vision_drift"])):
        policy = drift_policy(drift_threshold=0.003, cameras=cameras)
        decisions = []
        for f in frames:
            d = policy.decide(f)
            decisions.append(d)
            policy.update(f, d, outputs_for(d, lay))  # uniform attention over every key
        assert reasons(decisions) == expected, cameras
        last = decisions[2].signals
        # base reused frame 1, so its last full frame is frame 0 (a larger change); max computed frame 1
        vs_full, vs_prev = last["weighted_drift_cam1"], last["weighted_drift_prev_cam1"]
        assert (vs_full > vs_prev > 0) if cameras == "base" else (vs_full == vs_prev > 0)
        assert last["weighted_drift_cam0"] == 0.0
        assert last["pixel_drift_cam1"] > 0 and last["pixel_drift_cam0"] == 0.0
        gate = last["weighted_drift_cam0"] if cameras == "base" else last["weighted_drift_cam1"]
        assert last["weighted_drift"] == gate
    with pytest.raises(VariantError, match="cameras 'wrist': expected one of base, max"):
        drift_policy(cameras="wrist")


def test_attention_drift_presets():
    assert drift_policy(preset="seed_code").thresholds() == {"state_drift": 0.05, "weighted_drift": 0.5}
    assert drift_policy(preset="seed_code", drift_threshold=0.7).thresholds()["weighted_drift"] == 0.7
    with pytest.raises(VariantError, match=r"preset 'p99': expected one of \['distribution', 'seed_code'\]"):
        drift_policy(preset="p99")


# ---- vla_cache


def vla_policy(**params) -> Driven:
    return driven("vla_cache", **params)


def test_vla_cache_first_frame_and_no_static_patches():
    lay = layout()
    policy = vla_policy(relevance="top_k")
    decisions = drive(policy, [frame(0, seed=0), frame(1, seed=1)], lay)  # unrelated random images
    assert reasons(decisions) == ["first_frame", "no_static_patches"]
    assert decisions[1].signals["static_ratio"] == 0.0
    assert decisions[0].needs.prefix_entropy == frozenset({0, 1}) and decisions[0].needs.prefix_relevance == {1}


def test_vla_cache_seed_threshold_keeps_only_unimportant_static_patches():
    lay = layout()
    f0 = frame(0, seed=0)
    f1 = frame(1, f0.images)  # the same images: every patch static
    uniform = vla_policy(relevance="threshold")  # seed 000: importance < 0.001, at most 120 per camera
    drive(uniform, [f0], lay)  # uniform relevance: 1/256 per patch, above 0.001
    assert uniform.decide(f1).reason == "no_reusable_patches"

    policy = vla_policy(relevance="threshold")
    first = policy.decide(f0)
    hot = outputs_for(first, lay)
    hot.prefix_relevance[1].zero_()
    hot.prefix_relevance[1][:10] = 1.0  # camera 0's first 10 patches hold all the attention
    policy.update(f0, first, hot)
    d = policy.decide(f1)
    # camera 0: 150 static minus at most 10 important -> capped at 120; camera 1: no attention (0 < 0.001) -> 120
    assert (d.kind, d.reason) == ("partial", "static_patches")
    assert d.signals == {"static_ratio": 1.0, "reusable_ratio": 240 / 512}  # static: all, before the 150 cap
    assert not set(range(10)) & set(range(lay.num_tokens)) - set(d.plan.active[1].tolist())


def test_vla_cache_plan_drops_a_growing_set_and_ages_reused_tokens():
    lay = layout()
    policy = vla_policy(relevance="top_k", relevance_top_k=0, static_top_k=256, reuse_proportion=1.0)
    images = frame(0).images
    decisions = drive(policy, [frame(i, images) for i in range(3)], lay)
    assert kinds(decisions) == ["full", "partial", "partial"]
    plan = decisions[2].plan
    assert plan.active[0] is None  # layer 0 always computes every token
    dropped = set(range(512))  # both cameras' 256 tokens, from the pruning layer (1) on
    for layer in (1, 2):
        assert set(plan.active[layer].tolist()) == set(range(lay.num_tokens)) - dropped
    assert decisions[2].extra["per_layer_reuse"] == [0.0, 512 / lay.num_tokens, 512 / lay.num_tokens]
    assert decisions[2].extra["tokens_per_layer"] == [lay.num_tokens, lay.num_tokens - 512, lay.num_tokens - 512]
    assert (decisions[1].extra["token_age_max"], decisions[2].extra["token_age_max"]) == (1, 2)


def test_vla_cache_entropy_schedule_sets_per_layer_counts():
    lay = layout()
    policy = vla_policy(relevance="top_k", relevance_top_k=0, static_top_k=100, pruning_layers="1,2")
    images = frame(0).images
    first = policy.decide(frame(0, images))
    out = outputs_for(first, lay)
    out.prefix_entropy.update({0: 2.0, 1: 1.0})  # layer 1 focused: raw reuse 0 -> 1, the rise damped to 0.55
    policy.update(frame(0, images), first, out)
    d = policy.decide(frame(1, images))
    # 200 reusable; layer 1: int(0.55 * 200) = 110; layer 2 (the last) takes layer 1's proportion
    assert d.extra["tokens_per_layer"] == [lay.num_tokens, lay.num_tokens - 110, lay.num_tokens - 110]
    flat = vla_policy(relevance="top_k", relevance_top_k=0, static_top_k=100, pruning_layers="1,2",
                      growth_factor=1.0)
    flat.update(frame(0, images), first, out)
    assert flat.decide(frame(1, images)).extra["tokens_per_layer"][1] == lay.num_tokens - 200


def test_vla_cache_counts_scale_to_the_token_grid():
    """The seed's 150 / 120 of 256 tokens and its 0.001 importance (a quarter of the uniform 1/256) are
    fractions: on the shipped model's 49 tokens per camera they are 29, 23 and 0.256 / 49."""
    grid256 = layout()
    small = dataclasses.replace(grid256, tokens_per_camera=49, grid=7, patch_size=32,
                                num_tokens=grid256.num_tokens - 3 * (256 - 49))
    repo = VlaCachePolicy(grid256, VlaCacheConfig())
    assert (repo.static_top_k, repo.relevance_top_k, repo.importance_threshold) == (150, 120, pytest.approx(0.001))
    scaled = VlaCachePolicy(small, VlaCacheConfig())
    assert (scaled.static_top_k, scaled.relevance_top_k) == (29, 23)
    assert scaled.importance_threshold == pytest.approx(0.256 / 49) and scaled.importance_threshold > 0.001
    fixed = VlaCachePolicy(small, VlaCacheConfig(static_top_k=40, relevance_top_k=10, importance_threshold=0.01))
    assert (fixed.static_top_k, fixed.relevance_top_k, fixed.importance_threshold) == (40, 10, 0.01)


def test_vla_cache_seed_000_schedule_every_layer_clamped_higher_entropy_more_reuse():
    lay = layout()
    policy = vla_policy(relevance="top_k", relevance_top_k=0, static_top_k=100, layer_schedule="seed_000")
    assert policy.policy.pruning_layers == [1, 2] and policy.policy.relevance_layer == 2  # every layer, the last
    assert policy.policy.entropy_layers == [0, 1, 2]
    images = frame(0).images
    first = policy.decide(frame(0, images))
    out = outputs_for(first, lay)
    out.prefix_entropy.update({0: 3.0, 1: 1.0, 2: 2.0})  # normalised 1, 0, 0.5
    policy.update(frame(0, images), first, out)
    d = policy.decide(frame(1, images))
    # reuse = clamp(e * 0.55 + 0.225, 0.3, 0.95) = [0.775, 0.3, 0.5]; dropped only grows: 60 at 1, 100 at 2
    assert d.extra["tokens_per_layer"] == [lay.num_tokens, lay.num_tokens - 60, lay.num_tokens - 100]
    with pytest.raises(VariantError, match="layer_schedule 'paper': expected one of repo, seed_000"):
        vla_policy(layer_schedule="paper")


def test_vla_cache_a_change_in_the_camera_set_is_a_full_frame():
    lay = layout()
    policy = vla_policy(relevance="top_k", relevance_top_k=0)
    images = frame(0).images
    one_camera = dataclasses.replace(frame(1, images), image_mask=torch.tensor([True, False, False]))
    decisions = drive(policy, [frame(0, images), frame(1, images), one_camera, dataclasses.replace(one_camera, index=3)],
                      lay)
    assert reasons(decisions) == ["first_frame", "static_patches", "camera_change", "static_patches"]


# ---- names and parameters


def test_unknown_name_or_parameter_lists_the_valid_ones():
    with pytest.raises(VariantError, match="unknown policy 'adaptiv'.*none, fixed_window, adaptive, "
                                           "attention_drift, vla_cache"):
        PolicyVariant.make("x", "adaptiv")
    with pytest.raises(VariantError, match="no parameter 'threshold'; valid parameters: execution, fallback, latency, "
                                           "num_steps, pixel_mae, rtc_horizon, rtc_jacobian, rtc_max_guidance, "
                                           "rtc_schedule, schedule, solver, timing, window"):
        PolicyVariant.make("x", "adaptive", {"threshold": 6.5})
    with pytest.raises(ConfigError, match=r"policies\[0\]: policy 'fixed_window' has no parameter 'windows'"):
        expand_variants([{"name": "fixed_window", "windows": 2}])
    with pytest.raises(CachePolicyError, match="takes a FixedWindowConfig, got AdaptiveConfig"):
        make_cache_policy("fixed_window", AdaptiveConfig(), layout())


def test_bad_values_are_named():
    cases = [
        ("fixed_window", {"window": 0}, "window must be an integer >= 1.*got 0"),
        ("adaptive", {"pixel_mae": -1.0}, r"pixel_mae threshold must be in \[0, 255\].*got -1.0"),
        ("vla_cache", {"relevance": "most"}, r"relevance 'most': expected one of \('threshold', 'top_k'\)"),
        ("vla_cache", {"pruning_layers": "1,x"}, "pruning_layers must be comma-separated integers.*'1,x'"),
        ("none", {"solver": "rk5"}, "solver 'rk5': expected one of euler, midpoint, heun, dpm_solver_2, rk4"),
        ("none", {"num_steps": 0}, "num_steps must be an integer >= 1, got 0"),
        ("adaptive", {"window": 2.5}, "parameter 'window': expected int, got 2.5"),
    ]
    for name, params, message in cases:
        with pytest.raises(VariantError, match=message):
            PolicyVariant.make("x", name, params)
    with pytest.raises(CachePolicyError, match=r"pruning_layers \[5\] out of range for a model of depth 3"):
        vla_policy(pruning_layers="5")


def test_config_entries_expand_and_validate():
    variants = expand_variants([{"name": "none"}, {"name": "adaptive", "window": 3, "pixel_mae": [6.0, 7]},
                                {"name": "attention_drift", "state_threshold": None, "solver": "heun"},
                                {"name": "vla_cache", "pruning_layers": "1,3,5,6", "reuse_proportion": 0.5}])
    assert variants[4].policy == VlaCacheConfig(pruning_layers="1,3,5,6", reuse_proportion=0.5)
    assert variants[3].denoise.solver == "heun" and variants[3].policy.state_threshold is None
    assert [v.label for v in variants][:3] == ["none", "adaptive_pixel_mae6_window3", "adaptive_pixel_mae7_window3"]
    assert PolicyVariant.make("v", "vla_cache").policy == VlaCacheConfig() and AttentionDriftConfig().drift_limit == 1.0
