"""Pi05Model stages: shapes and dtypes, masking, the composed API, determinism, attention maps, samplers."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from policies.pi05.configuration import PRESETS, SCHEDULES, SOLVERS, GemmaConfig, Pi05Config, tiny
from policies.pi05.layers import make_attention_mask
from policies.pi05.modeling import Pi05Model, count_parameters
from policies.pi05.sampling import integrate, time_grid
from policies.pi05.stages import Pi05Inputs, PrefixKV
from tests.pi05_helpers import random_inputs, random_model, random_noise, small_config



@pytest.fixture(scope="module")
def model() -> Pi05Model:
    return random_model(small_config(), seed=0)


@pytest.fixture(scope="module")
def inputs(model) -> Pi05Inputs:
    return random_inputs(model.config, batch=2, seed=0)


@pytest.fixture(scope="module")
def noise(model) -> torch.Tensor:
    return random_noise(model.config, batch=2, seed=1)


def test_config_checks_quote_values():
    cfg = small_config()
    with pytest.raises(ValueError, match=r"vlm.head_dim \(8\) must equal action_expert.head_dim \(16\)"):
        dataclasses.replace(cfg, action_expert=dataclasses.replace(cfg.action_expert, head_dim=16))
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        GemmaConfig(width=8, depth=1, mlp_dim=8, num_heads=6, num_kv_heads=4, head_dim=2)
    with pytest.raises(ValueError, match="unknown Pi05Config preset 'nope'"):
        Pi05Config.from_name("nope")
    assert Pi05Config.from_dict(cfg.to_dict()) == cfg


def test_presets_have_the_spec_sizes():
    full = PRESETS["pi05_libero"]
    assert (full.vision.width, full.vision.depth, full.vision.mlp_dim, full.vision.num_patches) == (1152, 27, 4304, 256)
    assert (full.vlm.width, full.vlm.depth, full.vlm.mlp_dim, full.vlm.head_dim) == (2048, 18, 16384, 256)
    assert (full.action_expert.width, full.action_expert.mlp_dim) == (1024, 4096)
    assert (full.action_horizon, full.max_token_len, full.num_steps, full.discrete_state_input) == (10, 200, 10, False)
    small = tiny()
    assert small.vision.num_patches == 256 and small.vlm.num_heads == 8 and small.vlm.num_kv_heads == 1
    assert small.vlm.head_dim == small.action_expert.head_dim


def test_tiny_has_at_most_50m_parameters():
    with torch.device("meta"):
        model = Pi05Model(tiny())
    assert count_parameters(model) <= 50_000_000


def test_shapes_and_dtypes_through_every_stage(model, inputs, noise):
    cfg = model.config
    b, n_img = 2, cfg.num_cameras * cfg.vision.num_patches
    tp = n_img + cfg.max_token_len
    with torch.no_grad():
        image_tokens = model.embed_images(inputs.images)
        prefix = model.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        prefix_kv = model.compute_prefix_kv(prefix)
        v_t, maps = model.predict_velocity(prefix_kv, prefix.pad_mask, noise, torch.tensor(1.0))
        result = model.denoise(prefix_kv, prefix.pad_mask, noise)
    assert image_tokens.shape == (b, cfg.num_cameras, 256, cfg.vlm.width) and image_tokens.dtype == torch.float32
    assert prefix.embeddings.shape == (b, tp, cfg.vlm.width)
    assert prefix.pad_mask.shape == prefix.positions.shape == (b, tp) and prefix.pad_mask.dtype == torch.bool
    assert prefix.segments == {"base_0_rgb": (0, 256), "left_wrist_0_rgb": (256, 512),
                               "right_wrist_0_rgb": (512, 768), "text": (768, tp)}
    # row 0: right wrist masked, 8 text tokens; positions repeat over masked tokens (spec B)
    assert prefix.positions[0, 511].item() == 511 and prefix.positions[0, 767].item() == 511
    assert prefix.positions[0, 768].item() == 512 and prefix.positions[0, -1].item() == 511 + 8
    assert len(prefix_kv.keys) == len(prefix_kv.values) == cfg.vlm.depth
    for k, v in zip(prefix_kv.keys, prefix_kv.values, strict=True):
        assert k.shape == v.shape == (b, cfg.vlm.num_kv_heads, tp, cfg.vlm.head_dim) and k.dtype == torch.float32
    assert prefix_kv.attention is None and maps is None
    assert v_t.shape == noise.shape and v_t.dtype == torch.float32
    assert result.actions.shape == (b, cfg.action_horizon, cfg.action_dim) and result.actions.dtype == torch.float32
    assert len(result.times) == cfg.num_steps and result.attention is None
    assert torch.isfinite(result.actions).all()


def test_bfloat16_keeps_openpi_float32_selection():
    model = random_model(small_config(), seed=0, dtype=torch.bfloat16)
    dtypes = {name.removeprefix("paligemma_with_expert."): p.dtype for name, p in model.named_parameters()}
    assert dtypes["paligemma.model.vision_tower.vision_model.embeddings.patch_embedding.weight"] == torch.float32
    assert dtypes["paligemma.model.language_model.layers.0.input_layernorm.weight"] == torch.float32
    assert dtypes["gemma_expert.model.norm.dense.weight"] == torch.float32
    assert dtypes["action_out_proj.weight"] == torch.float32
    assert dtypes["paligemma.model.language_model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["gemma_expert.model.layers.1.mlp.down_proj.weight"] == torch.bfloat16
    cfg = model.config
    inputs, noise = random_inputs(cfg), random_noise(cfg)
    with torch.no_grad():
        prefix = model.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        prefix_kv = model.compute_prefix_kv(prefix)
        actions = model.denoise(prefix_kv, prefix.pad_mask, noise).actions
        reference = random_model(cfg, seed=0).sample_actions(inputs, noise)
    assert prefix.embeddings.dtype == prefix_kv.keys[0].dtype == torch.bfloat16
    assert actions.dtype == torch.float32
    # bf16 rounding only: same model, small deviation relative to the action scale
    assert (actions - reference).abs().max() < 0.1 * reference.abs().max()


def test_masked_camera_and_padding_have_no_effect(model, inputs, noise):
    """Spec B: a masked camera's tokens and padded text are never attended to, so their content is moot."""
    changed_images = inputs.images.clone()
    changed_images[0, 2] = torch.rand_like(changed_images[0, 2]) * 2 - 1  # row 0: right wrist masked
    changed_images[1, 1] = -changed_images[1, 1]  # row 1: left wrist masked
    changed_tokens = inputs.tokens.clone()
    changed_tokens[~inputs.token_masks] = 5
    changed = Pi05Inputs(changed_images, inputs.image_masks, changed_tokens, inputs.token_masks)
    with torch.no_grad():
        reference = model.sample_actions(inputs, noise)
        actions = model.sample_actions(changed, noise)
        # ... while an unmasked camera does matter
        visible = inputs.images.clone()
        visible[0, 0] = -visible[0, 0]
        moved = model.sample_actions(Pi05Inputs(visible, inputs.image_masks, inputs.tokens, inputs.token_masks), noise)
    assert torch.equal(actions, reference)
    assert (moved[0] - reference[0]).abs().max() > 1e-4
    assert torch.equal(moved[1], reference[1])  # batch rows are independent


def test_composed_api_equals_sample_actions_bit_for_bit(model, inputs, noise):
    with torch.no_grad():
        expected = model.sample_actions(inputs, noise)
        prefix = model.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        prefix_kv = model.compute_prefix_kv(prefix)
        composed = model.denoise(prefix_kv, prefix.pad_mask, noise, num_steps=10, schedule="linear", solver="euler")
        # openpi's loop written out: t accumulates t += dt in float32, x += dt * v
        dt = torch.tensor(-1.0 / 10, dtype=torch.float32)
        t, x = torch.tensor(1.0, dtype=torch.float32), noise
        while t >= -dt / 2:
            v, _ = model.predict_velocity(prefix_kv, prefix.pad_mask, x, t.expand(2))
            x = x + dt * v
            t = t + dt
    assert torch.equal(composed.actions, expected)
    assert torch.equal(x, expected)
    assert composed.times[0] == 1.0 and abs(composed.times[-1] - 0.1) < 1e-6


def test_same_seed_same_actions(inputs, noise):
    cfg = small_config()
    with torch.no_grad():
        first = random_model(cfg, seed=3).sample_actions(inputs, noise)
        second = random_model(cfg, seed=3).sample_actions(inputs, noise)
        other = random_model(cfg, seed=4).sample_actions(inputs, noise)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_attention_maps_do_not_change_actions(model, inputs, noise):
    cfg = model.config
    with torch.no_grad():
        prefix = model.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        plain = model.compute_prefix_kv(prefix)
        with_maps = model.compute_prefix_kv(prefix, return_attention=True)
        result = model.denoise(plain, prefix.pad_mask, noise)
        result_maps = model.denoise(with_maps, prefix.pad_mask, noise, return_attention=[-1])
    for a, b in zip(plain.keys + plain.values, with_maps.keys + with_maps.values, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(result.actions, result_maps.actions)

    tp = prefix.pad_mask.shape[1]
    assert len(with_maps.attention) == cfg.vlm.depth
    for probs in with_maps.attention:
        assert probs.shape == (2, cfg.vlm.num_heads, tp, tp) and probs.dtype == torch.float32
        valid_rows = probs[0][:, prefix.pad_mask[0]]  # queries of valid tokens
        assert torch.allclose(valid_rows.sum(-1), torch.ones(()), atol=1e-5)
        assert valid_rows[..., ~prefix.pad_mask[0]].abs().max() == 0  # they never attend to masked tokens

    assert len(result_maps.attention) == cfg.num_steps  # one entry per velocity evaluation
    for per_layer in result_maps.attention:
        assert per_layer[0] is None  # only the last layer was asked for
        last = per_layer[-1]
        assert last.shape == (2, cfg.action_expert.num_heads, cfg.action_horizon, tp)
        assert last[0][..., ~prefix.pad_mask[0]].abs().max() == 0
        assert (last.sum(-1) <= 1 + 1e-5).all() and (last.sum(-1) > 0).all()


def test_denoise_only_reads_the_prefix_cache(model, inputs, noise):
    with torch.no_grad():
        prefix = model.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        prefix_kv = model.compute_prefix_kv(prefix)
        snapshot = [t.clone() for t in prefix_kv.keys + prefix_kv.values]
        first = model.denoise(prefix_kv, prefix.pad_mask, noise).actions
        second = model.denoise(prefix_kv, prefix.pad_mask, noise).actions
    assert torch.equal(first, second)
    for before, after in zip(snapshot, prefix_kv.keys + prefix_kv.values, strict=True):
        assert torch.equal(before, after)


def test_prefix_kv_select_and_concat_match_the_batch(model, inputs, noise):
    with torch.no_grad():
        prefix = model.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        prefix_kv = model.compute_prefix_kv(prefix)
        rows = [prefix_kv.select([i]) for i in range(2)]
        joined = PrefixKV.concat(rows[::-1])
        swapped = model.denoise(joined, prefix.pad_mask.flip(0), noise.flip(0)).actions
        batched = model.denoise(prefix_kv, prefix.pad_mask, noise).actions
    assert torch.allclose(swapped.flip(0), batched, atol=1e-5)
    assert prefix_kv.nbytes == 2 * model.config.vlm.depth * prefix_kv.keys[0].numel() * 4
    with pytest.raises(ValueError, match="noise shape"):
        model.denoise(prefix_kv, prefix.pad_mask, noise[:1])


def test_attention_mask_rows_follow_openpi():
    pad = torch.tensor([[True, True, False, True, True]])
    ar = torch.tensor([[0, 0, 0, 1, 0]])
    mask = make_attention_mask(pad, ar)[0].int().tolist()
    assert mask == [
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [1, 1, 0, 1, 1],
        [1, 1, 0, 1, 1],
    ]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_time_grids_go_from_one_to_zero(schedule):
    times, steps = time_grid(10, schedule)
    t = torch.stack(times)
    assert len(times) == 10 and t[0] == 1.0
    assert (torch.stack(steps) < 0).all()
    assert abs(float(t[-1] + steps[-1])) < 1e-6
    if schedule in ("cosine", "quadratic"):
        assert abs(float(steps[-1])) < abs(float(steps[0]))  # finer steps near t = 0
    if schedule == "sigmoid":
        assert abs(float(steps[5])) > abs(float(steps[0])) and abs(float(steps[5])) > abs(float(steps[-1]))


def test_solvers_converge_with_their_order():
    """dx/dt = x from t = 1 to 0 has x(0) = x(1) / e; error shrinks by ~2^order when steps double."""
    x1 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    exact = x1 / math.e

    def error(solver: str, steps: int) -> float:
        out = integrate(lambda x, t: x, x1, steps, "linear", solver)
        return float((out - exact).abs().max())

    orders = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
    for solver, order in orders.items():
        ratio = error(solver, 16) / error(solver, 32)
        assert ratio == pytest.approx(2**order, rel=0.1), (solver, ratio)
    assert set(orders) | {"dpm_solver_2"} == set(SOLVERS)


def test_dpm_solver_2_on_rectified_flows():
    """Straight paths (point-mass data) are integrated exactly; on Gaussian data (exact velocity known in
    closed form, endpoint mu + s * x1) the error is second order when the last t is O(1/N^2) (cosine grid)."""
    c, n = torch.tensor([0.3, -0.7], dtype=torch.float64), torch.tensor([1.5, 0.2], dtype=torch.float64)
    for schedule in ("cosine", "quadratic", "sigmoid"):
        out = integrate(lambda x, t: (x - c) / t, n, 10, schedule, "dpm_solver_2")
        assert torch.allclose(out, c, atol=1e-12, rtol=0), schedule

    mu, s = 0.7, 0.3

    def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = float(t)
        x0 = mu + (1 - t) * s * s / (t * t + (1 - t) ** 2 * s * s) * (x - (1 - t) * mu)
        return (x - x0) / t

    x1 = torch.tensor([1.0, -2.0, 0.3], dtype=torch.float64)
    errors = [float((integrate(gaussian_velocity, x1, steps, "cosine", "dpm_solver_2") - (mu + s * x1)).abs().max())
              for steps in (16, 32, 64)]
    assert errors[0] / errors[1] == pytest.approx(4, rel=0.35) and errors[1] / errors[2] == pytest.approx(4, rel=0.35)
    euler = float((integrate(gaussian_velocity, x1, 16, "cosine", "euler") - (mu + s * x1)).abs().max())
    assert errors[0] < euler / 2


def test_unknown_solver_and_schedule_are_named():
    with pytest.raises(ValueError, match="unknown solver 'adams'"):
        integrate(lambda x, t: x, torch.zeros(1), 2, "linear", "adams")
    with pytest.raises(ValueError, match="unknown schedule 'exp'"):
        time_grid(2, "exp")
