"""Real-time chunking: LeRobot's prefix weights and guidance, the paper's VJP, and an RTC session in the
serving engine (the chunk in flight held as a value, each frame's delay known before it is denoised)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from libero_eval.config import ConfigError, load_config
from libero_eval.episode import EpisodeConfig
from policies.serving.core import WARMUP_OBSERVATION
from libero_eval.sweep_summary import pick_baselines
from policies.base import PolicyError
from policies.pi05.rtc import Guidance, guidance_weight, guided_velocity, prefix_weights
from policies.serving.engine import Request
from policies.serving.latency import LatencyError, LatencyProfile, RealtimeClock
from policies.serving.model import tiny_random
from policies.serving.pi05 import Pi05Engine
from policies.serving.variants import PolicyVariant, VariantError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
THOR = LatencyProfile("thor", 17.0, 52.0, 10.2, overhead_ms=3.0, vjp_eval_ms=21.9)


@pytest.mark.parametrize("schedule, delay, end, expected", [
    # LeRobot 0.6.1 get_prefix_weights(start=delay, end, total=10), written out
    ("linear", 3, 5, [1, 1, 1, 2 / 3, 1 / 3, 0, 0, 0, 0, 0]),
    ("linear", 1, 5, [1, 0.8, 0.6, 0.4, 0.2, 0, 0, 0, 0, 0]),
    ("exp", 3, 5, [1, 1, 1, (2 / 3) * np.expm1(2 / 3) / (np.e - 1), (1 / 3) * np.expm1(1 / 3) / (np.e - 1), 0, 0, 0, 0, 0]),
    ("zeros", 2, 5, [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]),
    ("ones", 2, 5, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
    ("linear", 8, 5, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),  # a delay past the leftover: all of it frozen
    ("linear", 0, 10, [k / 11 for k in range(10, 0, -1)]),  # linspace(1, 0, 12) without its ends
])
def test_prefix_weights_are_lerobots(schedule, delay, end, expected):
    np.testing.assert_allclose(prefix_weights(schedule, delay, end, 10).numpy(), expected, atol=1e-6)


def test_the_guidance_weight_is_clipped_at_beta_and_follows_the_paper_between():
    assert float(guidance_weight(1.0, 10.0)) == 10.0  # tau = 0: an infinite weight, clipped
    assert float(guidance_weight(0.5, 10.0)) == pytest.approx(2.0)  # c = 1, 1/r^2 = 2
    tau = 0.8  # t = 0.2: c = 0.25, 1/r^2 = (0.04 + 0.64) / 0.04 = 17
    assert float(guidance_weight(1 - tau, 10.0)) == pytest.approx(0.25 * 17, rel=1e-5)
    assert float(guidance_weight(0.5, 1.5)) == 1.5


def _toy(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 4, generator=gen) * 0.3
    x = torch.randn(2, 6, 4, generator=gen)
    target = torch.randn(2, 6, 4, generator=gen)
    weights = prefix_weights("exp", 2, 5, 6)[None, :, None].expand(2, -1, -1).contiguous()
    return a, x, target, weights


def test_identity_jacobian_is_lerobots_autograd_formulation():
    """LeRobot computes v before x_t requires grad, so its autograd 'VJP' is the weighted error itself."""
    a, x, target, weights = _toy()
    velocity = lambda y: torch.tanh(y @ a)  # noqa: E731
    t = 0.7
    ours = guided_velocity(velocity, x, t, Guidance(target, weights, 5.0, "identity"))
    x_t = x.clone()
    with torch.enable_grad():  # LeRobot 0.6.1 RTCProcessor.denoise_step, step by step
        v_t = velocity(x_t)
        x_t.requires_grad_(True)
        x1_t = x_t - t * v_t
        err = (target - x1_t) * weights
        correction = torch.autograd.grad(x1_t, x_t, err.clone().detach())[0]
    expected = v_t - guidance_weight(t, 5.0) * correction
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_model_jacobian_differentiates_through_the_velocity():
    """x0_hat = x - t v(x): the correction is e^T (I - t dv/dx), here with v linear (dv/dx = A^T per row)."""
    a, x, target, weights = _toy(1)
    velocity = lambda y: y @ a  # noqa: E731
    t = 0.4
    ours = guided_velocity(velocity, x, t, Guidance(target, weights, 5.0, "model"))
    error = (target - (x - t * velocity(x))) * weights
    correction = error - t * error @ a.T
    torch.testing.assert_close(ours, velocity(x) - guidance_weight(t, 5.0) * correction, rtol=0, atol=1e-5)
    identity = guided_velocity(velocity, x, t, Guidance(target, weights, 5.0, "identity"))
    assert (ours - identity).abs().max() > 1e-3  # the two jacobians really differ


def test_guidance_pulls_the_frozen_actions_onto_the_leftover():
    """With the model's own velocity, guided sampling ends nearer the leftover on the weighted actions."""
    loaded = tiny_random(seed=0)
    model, config = loaded.model, loaded.model.config
    gen = torch.Generator().manual_seed(3)
    b, h, d = 1, config.action_horizon, config.action_dim
    images = torch.rand(b, config.num_cameras, 3, config.vision.image_size, config.vision.image_size, generator=gen)
    tokens = torch.randint(1, config.vocab_size, (b, config.max_token_len), generator=gen)
    with torch.no_grad():
        prefix = model.embed_prefix(images * 2 - 1, torch.ones(b, config.num_cameras, dtype=torch.bool), tokens,
                                    torch.ones(b, config.max_token_len, dtype=torch.bool))
        kv = model.compute_prefix_kv(prefix)
        noise = torch.randn(b, h, d, generator=gen)
        plain = model.denoise(kv, prefix.pad_mask, noise).actions
        target = torch.zeros(b, h, d)
        target[:, :5] = torch.randn(b, 5, d, generator=gen)
        weights = prefix_weights("linear", 3, 5, h)[None, :, None]
        guided = model.denoise(kv, prefix.pad_mask, noise, guidance=Guidance(target, weights, 10.0)).actions
    frozen = slice(0, 3)
    assert (guided[:, frozen] - target[:, frozen]).abs().mean() < 0.5 * (plain[:, frozen] - target[:, frozen]).abs().mean()
    torch.testing.assert_close(guided[:, 5:], plain[:, 5:], rtol=0, atol=0.5)  # unweighted actions: loosely coupled


# ---- the serving engine


@pytest.fixture(scope="module")
def engine():
    loaded = tiny_random(seed=0)
    return Pi05Engine(loaded.model, loaded.processor, shadow=True)


def _variant(label: str, name: str = "none", **params) -> PolicyVariant:
    return PolicyVariant.make(label, name, {"timing": "realtime", "execution": "rtc", "latency": "x", **params})


def _query(engine, step: int | None, session: str = "s"):
    observation = dict(WARMUP_OBSERVATION)
    if step is not None:
        observation["env_step"] = step
    (result,) = engine.infer_batch([Request(session, observation)])
    if isinstance(result, BaseException):
        raise result
    return result.record


def test_an_rtc_session_guides_towards_what_is_left_of_the_chunk_in_flight(engine):
    clock = RealtimeClock(THOR, 20.0)
    engine.open("s", _variant("rtc_fw", "fixed_window", window=2), 1, clock)
    first = _query(engine, 0)
    assert first.extra["rtc"] == {"guided": False, "delay_steps": 4, "leftover": 0, "guided_actions": 0}
    second = _query(engine, 5)  # the first chunk (10 actions, issued at step 0) has 5 left
    assert second.decision == "reuse"
    assert second.extra["rtc"] == {"guided": True, "delay_steps": 3, "leftover": 5, "guided_actions": 5}
    assert THOR.cost_us(second.extra["compute"]) == 105_000  # identity jacobian: priced as the plain frame
    assert "rtc_frozen_dev" in second.signals
    # the shadow (full path, same noise) runs under the same guidance: with identical observations the reused
    # K/V is the full path's, so the shadow matches exactly only if it is guided too
    assert second.signals["shadow_l2"] == 0.0
    third = _query(engine, 17)  # past the end of the second chunk (issued at 5): nothing left, unguided
    assert third.extra["rtc"]["guided"] is False
    engine.close("s")


def test_the_model_jacobian_is_priced_per_guided_evaluation(engine):
    engine.open("s", _variant("rtc_vjp", rtc_jacobian="model"), 1, RealtimeClock(THOR, 20.0))
    _query(engine, 0)
    record = _query(engine, 5)
    assert record.extra["compute"]["vjp_evals"] == record.extra["compute"]["velocity_evals"] == 10
    # 17 + 52 + 10 x (10.2 + 21.9) + 3 = 393 ms: 8 steps late, past the 5 left
    assert THOR.cost_us(record.extra["compute"]) == 393_000
    assert record.extra["rtc"] == {"guided": True, "delay_steps": 8, "leftover": 5, "guided_actions": 5}
    engine.close("s")
    with pytest.raises(LatencyError, match="vjp_eval_ms"):
        dataclasses.replace(THOR, vjp_eval_ms=None).cost_us(record.extra["compute"])


def test_an_rtc_session_needs_its_clock_and_each_querys_env_step(engine):
    with pytest.raises(PolicyError, match="needs a realtime clock"):
        engine.open("s", _variant("rtc_none"), 1)
    engine.open("s", _variant("rtc_none"), 1, RealtimeClock(THOR, 20.0))
    with pytest.raises(PolicyError, match=r"env step in observation\['env_step'\]"):
        _query(engine, None)
    _query(engine, 10)
    with pytest.raises(PolicyError, match="precedes the previous query's step 10"):
        _query(engine, 5)
    engine.close("s")


def test_a_realtime_clock_survives_the_trip_to_the_policy_actor():
    clock = RealtimeClock(THOR, 20.0)
    assert RealtimeClock.from_dict(clock.to_dict()) == clock


def test_rtc_configs_are_checked_at_load():
    for params, message in [
        ({"execution": "rtc"}, "needs timing realtime"),
        ({"execution": "rtc", "timing": "realtime", "latency": "measured"}, "not measured"),
        ({"execution": "rtc", "timing": "realtime", "rtc_schedule": "cosine"}, "rtc_schedule: expected one of zeros"),
        ({"execution": "rtc", "timing": "realtime", "rtc_max_guidance": 0}, "rtc_max_guidance: expected a weight > 0"),
        ({"execution": "rtc", "timing": "realtime", "rtc_horizon": 0}, "rtc_horizon: expected an integer >= 1"),
        ({"execution": "rtc", "timing": "realtime", "rtc_jacobian": "full"}, "rtc_jacobian: expected one of"),
        ({"execution": "chunked"}, "execution: expected one of naive, rtc"),
        ({"execution": "rtc", "timing": "realtime", "rtc_max_guidance": float("inf")}, "rtc_max_guidance"),
        ({"timing": "realtime", "rtc_schedule": "exp"}, "rtc_schedule only apply to execution: rtc"),
    ]:
        with pytest.raises(VariantError, match=message):
            PolicyVariant.make("v", "none", params)
    with pytest.raises(VariantError, match="'hold' has no model"):
        PolicyVariant.make("v", "hold", {"execution": "rtc", "timing": "realtime"})
    with pytest.raises(ValueError, match="execution: expected one of naive, rtc"):
        EpisodeConfig(execution="inpaint")
    with pytest.raises(ConfigError, match="has no vjp_eval_ms"):
        load_config(CONFIGS / "smoke.yaml", ["latency=configs/latency/thor_trt_fp8.yaml", "policies=[{name: none, "
                                             "timing: realtime, execution: rtc, rtc_jacobian: model, latency: "
                                             f"{_profile_without_vjp()}}}]"])


def _profile_without_vjp() -> str:
    import tempfile

    from policies.serving.latency import write_profile  # only this test writes a profile

    path = tempfile.NamedTemporaryFile(suffix=".yaml", delete=False).name
    write_profile(dataclasses.replace(THOR, vjp_eval_ms=None), path)
    return path


def test_each_rtc_variant_is_compared_with_the_rtc_baseline():
    config = load_config(CONFIGS / "small_heldout_rtc.yaml")
    baselines = pick_baselines({v.label: v.describe() for v in config.variants()})
    assert baselines["fixed_window_rtc_window2"] == "none_rtc"
    assert baselines["none_rtc_vjp"] == "none_rtc_vjp"  # other RTC settings: not the identity-jacobian baseline
    reordered = pick_baselines({v.label: v.describe() for v in reversed(config.variants())})
    assert reordered["fixed_window_rtc_window2"] == "none_rtc"  # whichever none is listed first
    assert baselines["fixed_window_timingrealtime_window2"] == "none_timingrealtime"
    assert baselines["fixed_window_timingsync_window2"] == "none_timingsync"


def test_plan_guidance_targets_the_robot_dims_of_what_is_left():
    from policies.serving.rtc import ChunkInFlight, plan_guidance
    from policies.serving.variants import RTCSettings

    chunk = torch.arange(10 * 32, dtype=torch.float32).reshape(10, 32)
    plan = plan_guidance(RTCSettings(rtc_horizon=3), ChunkInFlight(chunk, 4), 10, lambda guided: 2, 10, 32)
    target = plan.guidance.target[0]
    torch.testing.assert_close(target[:4, :7], chunk[6:, :7])  # the 4 actions left, robot dims only
    assert not target[4:].any() and not target[:, 7:].any()  # zero-padded like LeRobot's leftover
    assert plan.guided_actions == 3 and plan.delay == 2
    assert plan.guidance.weights[0, :, 0].tolist() == pytest.approx([1, 1, 0.5, 0, 0, 0, 0, 0, 0, 0])


def _two_queries(engine, variant, observations, clock=RealtimeClock(THOR, 20.0)):
    engine.open("two", variant, 5, clock)
    out = []
    for step, obs in zip((0, 5), observations):
        (result,) = engine.infer_batch([Request("two", {**obs, "env_step": step})])
        if isinstance(result, BaseException):
            raise result
        out.append(result)
    engine.close("two")
    return out


def _observations():
    gen = np.random.default_rng(0)
    return [{**WARMUP_OBSERVATION, "observation/image": gen.integers(0, 255, (224, 224, 3), dtype=np.uint8),
             "observation/state": gen.normal(size=8).astype(np.float32)} for _ in range(2)]


def test_the_engine_guides_rtc_chunks_towards_the_leftover(engine):
    """Same seed and frames: the first query (nothing to inpaint) is the naive one; the second, guided towards
    the 5 actions left of the first chunk, lands much nearer to them on the d actions the robot runs from the
    old chunk; the model jacobian guides differently again."""
    observations = _observations()
    naive = _two_queries(engine, PolicyVariant.make("naive", "none", {"timing": "realtime"}), observations, None)
    rtc = _two_queries(engine, _variant("rtc"), observations)
    vjp = _two_queries(engine, _variant("rtc_vjp", rtc_jacobian="model"), observations)
    np.testing.assert_array_equal(naive[0].actions, rtc[0].actions)
    d = rtc[1].record.extra["rtc"]["delay_steps"]
    left = rtc[0].actions[5:5 + d]
    assert np.abs(rtc[1].actions[:d] - left).mean() < 0.5 * np.abs(naive[1].actions[:d] - left).mean()
    assert np.abs(vjp[1].actions - rtc[1].actions).max() > 1e-3


def test_guided_sessions_batched_together_get_what_they_get_alone(engine):
    observations = _observations()
    clock = RealtimeClock(THOR, 20.0)
    variants = [_variant("rtc_a"), _variant("rtc_b", rtc_schedule="exp"), _variant("rtc_c")]
    alone = [_two_queries(engine, v, observations)[1].actions for v in variants]
    for i, v in enumerate(variants):
        engine.open(f"b{i}", v, 5 + (i == 2), clock)  # rtc_c: another seed, so another leftover
    for step, obs in zip((0, 5), observations):
        results = engine.infer_batch([Request(f"b{i}", {**obs, "env_step": step}) for i in range(3)])
    for i in range(3):
        engine.close(f"b{i}")
    np.testing.assert_allclose(results[0].actions, alone[0], atol=1e-6)
    np.testing.assert_allclose(results[1].actions, alone[1], atol=1e-6)
    assert np.abs(results[2].actions - alone[2]).max() > 1e-4  # its own seed: its own chunk, not a copy
