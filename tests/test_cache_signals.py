"""The signals cache policies decide on, on synthetic inputs with known answers."""
from __future__ import annotations

import math

import pytest
import torch

from policies.cache.signals import (
    PrefixAttentionStats,
    attention_entropy,
    cosine,
    dilate,
    downsample,
    importance_grid,
    patch_similarity,
    pixel_diff,
    pixel_mae,
    resize_map,
    reuse_schedule,
    scaled_layers,
    static_patches,
)


def test_static_patches_find_exactly_the_unchanged_patches():
    gen = torch.Generator().manual_seed(0)
    before = torch.rand(2, 3, 224, 224, generator=gen) * 2 - 1
    after = before.clone()
    changed = {0: [(2, 3), (10, 15)], 1: [(0, 0)]}  # (row, col) of 14x14 patches per camera
    for cam, cells in changed.items():
        for r, c in cells:
            after[cam, :, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] = torch.rand(3, 14, 14, generator=gen) * 2 - 1
    after[1, :, 100, 100] += 0.01  # a tiny change stays static (cosine > 0.996)
    sim = patch_similarity(after, before, 14)
    assert sim.shape == (2, 256)
    for cam, cells in changed.items():
        moved = {r * 16 + c for r, c in cells}
        static = static_patches(sim[cam], 0.996, top_k=256)
        assert set(static.tolist()) == set(range(256)) - moved
        assert (sim[cam][list(moved)] < 0.99).all()
    top = static_patches(sim[1], 0.996, top_k=150)
    assert len(top) == 150 and (sim[1][top].min() >= sim[1][~torch.isin(torch.arange(256), top)].max())


def test_patch_similarity_is_the_cosine_of_raw_uint8_patches():
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (1, 3, 28, 28), generator=gen).float()
    b = torch.randint(0, 256, (1, 3, 28, 28), generator=gen).float()
    expected = [cosine(a[0, :, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14],
                       b[0, :, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14]) for r in range(2) for c in range(2)]
    got = patch_similarity(a / 255 * 2 - 1, b / 255 * 2 - 1, 14)[0]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    black = -torch.ones(1, 3, 28, 28)
    assert patch_similarity(black, black, 14).tolist() == [[0.0] * 4]  # black padding is never "static"


def test_pixel_mae_is_in_uint8_units_per_camera():
    ref = torch.zeros(3, 3, 224, 224)
    img = ref.clone()
    img[1, 0] = 1.0  # one channel of camera 1 moves by 127.5
    assert pixel_mae(img, ref, [0, 1]) == pytest.approx([0.0, 127.5 / 3])


def test_downsampled_pixel_diff():
    ref = torch.zeros(1, 3, 224, 224)
    img = ref.clone()
    img[0, :, :8, :8] = 0.5  # exactly one 8x8 cell
    diff = pixel_diff(downsample(img, 8), downsample(ref, 8))
    assert diff.shape == (1, 28, 28) and diff[0, 0, 0] == 0.5 and diff.sum() == 0.5


def test_dilation_grows_a_single_hot_patch_to_its_5x5_neighbourhood():
    grid = torch.zeros(28, 28)
    grid[10, 20] = 0.7
    hot = dilate(grid, 5)
    assert set(map(tuple, (hot > 0).nonzero().tolist())) == {(r, c) for r in range(8, 13) for c in range(18, 23)}
    assert (hot[hot > 0] == 0.7).all()
    corner = torch.zeros(28, 28)
    corner[0, 0] = 1.0
    assert (dilate(corner, 5) > 0).sum() == 9  # clipped at the border: 3x3


def test_importance_grid_normalises_one_camera_and_resizes():
    per_key = torch.zeros(3 * 256 + 16)
    per_key[256 + 17] = 3.0  # camera 1, row 1 col 1
    per_key[256 + 18] = 1.0
    grid = importance_grid(per_key, 256, 16)
    assert grid.sum() == pytest.approx(1.0) and grid[1, 1] == 0.75 and grid[1, 2] == 0.25
    big = resize_map(grid, 28)
    assert big.shape == (28, 28) and big.argmax() // 28 in (1, 2, 3)


def test_attention_entropy_uniform_one_hot_and_padding():
    k = 8
    probs = torch.zeros(1, 2, 3, k)
    probs[0, :, 0] = 1.0 / k  # uniform row: entropy log k
    probs[0, :, 1, 3] = 1.0  # one-hot row: entropy 0
    probs[0, :, 2] = torch.softmax(torch.randn(k), 0)  # a padded query: ignored
    got = attention_entropy(probs, torch.tensor([[True, True, False]]))
    assert got.item() == pytest.approx(math.log(k) / 2, rel=1e-6)


def test_reuse_schedule_is_monotone_in_entropy_and_damps_rises():
    # entropy falling with depth (attention focusing): reuse rises with depth, each rise damped by 0.55
    falling = reuse_schedule(torch.tensor([3.0, 2.0, 1.0, 0.0]), growth_factor=0.55)
    raw = [0.0, 1 / 3, 2 / 3, 1.0]
    expected = [0.0]
    for r in raw[1:]:
        expected.append(expected[-1] + 0.55 * (r - expected[-1]))
    assert falling.tolist() == pytest.approx(expected)
    assert all(b > a for a, b in zip(expected, expected[1:]))
    # entropy rising with depth: reuse falls, undamped (only rises are damped)
    assert reuse_schedule(torch.tensor([0.0, 1.0, 2.0]), 0.55).tolist() == pytest.approx([1.0, 0.5, 0.0])
    # growth 1 is the plain 1 - normalised entropy; the schedule stays in [0, 1]
    entropy = torch.rand(17, generator=torch.Generator().manual_seed(3)) * 5
    plain = reuse_schedule(entropy, 1.0)
    assert plain.tolist() == pytest.approx((1 - (entropy - entropy.min()) / (entropy.max() - entropy.min())).tolist())
    damped = reuse_schedule(entropy, 0.55)
    assert (damped >= 0).all() and (damped <= 1).all() and (damped <= plain + 1e-6).all()


def test_repo_layers_scale_to_pi05_depth():
    assert scaled_layers([2, 6, 9, 11], 32, 18) == [1, 3, 5, 6]
    assert scaled_layers([15], 32, 18) == [8]
    assert scaled_layers([2, 6, 9, 11], 32, 3) == [1]


def test_prefix_attention_stats_reduce_maps_of_a_partial_pass():
    pad = torch.tensor([[True] * 6 + [True, True, False]])  # 6 image tokens, 2 text tokens, 1 padding
    stats = PrefixAttentionStats(pad, text_start=6, entropy_layers=frozenset({0}), relevance_layers=frozenset({0}))
    queries = torch.tensor([2, 6, 7, 8])  # a partial pass: image token 2, both text tokens, the padding
    probs = torch.zeros(1, 2, 4, 9)
    probs[0, :, 0, 0] = 1.0
    probs[0, :, 1, 1] = 1.0  # text query 6 -> key 1
    probs[0, :, 2, 3] = 1.0  # text query 7 -> key 3
    probs[0, :, 3] = 1.0 / 9
    stats(0, probs, queries)
    assert stats.relevance[0][0].tolist() == pytest.approx([0, 0.5, 0, 0.5, 0, 0, 0, 0, 0])
    assert stats.entropy[0].item() == pytest.approx(0.0, abs=1e-6)  # padding query (uniform) excluded
