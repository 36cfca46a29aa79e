"""Prompt formats and tokenizer (on a sentencepiece model trained here), normalisation, images."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from policies.base import IMAGE_KEY, PolicyError
from policies.pi05.configuration import tiny
from policies.pi05.processing import (
    TINY_TOKENIZER,
    FeatureNorm,
    Normalizer,
    Pi05Processor,
    PromptTokenizer,
    build_prompt,
    discretize_state,
    find_normalizer,
    image_to_model,
    load_lerobot_normalizer,
    resize_with_pad,
    save_openpi_norm_stats,
)
from tasks import protocol
from tests.pi05_helpers import observation, small_config, write_lerobot_processors, write_tokenizer


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


def test_discretize_state_bins_like_openpi():
    state = np.array([-1.5, -1.0, -0.9921875, 0.0, 0.5, 0.9921874, 0.9921875, 1.0, 3.0])
    assert discretize_state(state).tolist() == [-1, 0, 1, 128, 192, 254, 255, 255, 255]


def test_prompt_text_of_both_formats():
    state = np.array([-1.0, 0.0, 0.999, -2.0])
    assert build_prompt("  open_the drawer\nnow ", state, discrete_state_input=False) == "open the drawer now"
    assert build_prompt("open_the drawer", state, discrete_state_input=True) == (
        "Task: open the drawer, State: 0 128 255 -1;\nAction: "
    )
    with pytest.raises(PolicyError, match="needs the normalised state"):
        build_prompt("x", None, discrete_state_input=True)


def test_tokenizer_without_state_is_bos_task_newline(tokenizer_file):
    tok = PromptTokenizer(tokenizer_file, max_len=48)
    ids, mask = tok.encode("pick up the black_bowl", np.zeros(8), discrete_state_input=False)
    n = int(mask.sum())
    expected = [tok.sp.bos_id()] + tok.sp.encode("pick up the black bowl") + tok.sp.encode("\n")
    assert ids[:n].tolist() == expected and ids[0] == 2
    assert mask[:n].all() and not mask[n:].any() and (ids[n:] == 0).all()
    assert tok.sp.decode(ids[1:n].tolist()) == "pick up the black bowl\n"
    assert ids.dtype == np.int64 and mask.dtype == bool and ids.shape == (48,)


def test_tokenizer_with_discrete_state(tokenizer_file):
    tok = PromptTokenizer(tokenizer_file, max_len=96)
    state = np.array([-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 0.99, 1.2])
    ids, mask = tok.encode("turn on the stove", state, discrete_state_input=True)
    n = int(mask.sum())
    text = "Task: turn on the stove, State: 0 64 128 160 192 224 254 255;\nAction: "
    assert ids[:n].tolist() == tok.sp.encode(text, add_bos=True)
    assert tok.sp.decode(ids[:n].tolist()) == text
    # byte fallback: text the tokenizer never saw still round-trips
    ids, mask = tok.encode("déplacer le bol ☃", state, discrete_state_input=False)
    assert tok.sp.decode(ids[: int(mask.sum())].tolist()) == "déplacer le bol ☃\n"


def test_long_prompts_are_truncated_with_a_warning(tokenizer_file, caplog):
    tok = PromptTokenizer(tokenizer_file, max_len=6)
    with caplog.at_level(logging.WARNING):
        ids, mask = tok.encode("put the cream cheese in the bowl", np.zeros(8), discrete_state_input=False)
    assert mask.all() and ids[0] == 2
    assert "truncating to max_token_len=6" in caplog.text


def test_shipped_tiny_tokenizer_fits_long_libero_prompts():
    cfg = tiny()
    tok = PromptTokenizer(TINY_TOKENIZER, cfg.max_token_len)
    assert tok.vocab_size == cfg.vocab_size
    longest = "put both the alphabet soup and the cream cheese box in the basket and the tomato sauce in the tray"
    _, mask = tok.encode(longest, np.full(8, 0.93), discrete_state_input=True)
    assert mask.sum() < cfg.max_token_len


def test_openpi_quantile_and_zscore_formulas():
    stats = {"q01": np.array([-2.0, 0.0]), "q99": np.array([2.0, 1.0]), "mean": np.array([1.0, 0.0]),
             "std": np.array([2.0, 0.5])}
    x = np.array([[0.0, 0.25], [2.0, 1.0]], dtype=np.float32)
    q = FeatureNorm("quantiles", stats)
    expected = (x - stats["q01"]) / (stats["q99"] - stats["q01"] + 1e-6) * 2 - 1
    assert np.allclose(q.normalize(x), expected, atol=1e-7)
    assert np.allclose(q.unnormalize(q.normalize(x)), x, atol=1e-6)
    z = FeatureNorm("mean_std", stats)
    assert np.allclose(z.normalize(x), (x - stats["mean"]) / (stats["std"] + 1e-6), atol=1e-7)
    # fewer dims than the stats: stats are sliced (openpi slices to x.shape[-1])
    assert np.allclose(q.unnormalize(np.array([1.0])), [2.0 + 1e-6 / 2 * 2], atol=1e-6)
    with pytest.raises(PolicyError, match=r"quantiles normalisation needs stats \['q99'\]"):
        FeatureNorm("quantiles", {"q01": np.zeros(2)})


def test_openpi_norm_stats_file_and_asset_lookup(tmp_path):
    assets = tmp_path / "assets" / "physical-intelligence" / "libero"
    assets.mkdir(parents=True)
    state = {"mean": np.zeros(8), "std": np.ones(8), "q01": -np.ones(8), "q99": np.ones(8) * 3}
    actions = {"mean": np.zeros(7), "std": np.ones(7), "q01": -np.ones(7) * 2, "q99": np.ones(7) * 2}
    save_openpi_norm_stats(assets / "norm_stats.json", state=state, actions=actions)
    norm = find_normalizer(tmp_path, kind="openpi")
    assert norm.state.mode == norm.actions.mode == "quantiles" and norm.state.convention == "openpi"
    assert np.allclose(norm.state.normalize(np.ones(8)), 0.0, atol=1e-6)
    assert np.allclose(norm.actions.unnormalize(np.ones(7)), 2.0, atol=1e-5)
    other = tmp_path / "assets" / "other"
    other.mkdir()
    (other / "norm_stats.json").write_text((assets / "norm_stats.json").read_text())
    with pytest.raises(PolicyError, match="several norm stats.*pass asset_id"):
        find_normalizer(tmp_path, kind="openpi")
    assert find_normalizer(tmp_path, kind="openpi", asset_id="other").source.endswith("other/norm_stats.json")
    with pytest.raises(PolicyError, match="no norm stats"):
        find_normalizer(tmp_path / "assets" / "other", kind="openpi", asset_id="missing")


def test_lerobot_mean_std_processor_files(tmp_path):
    write_lerobot_processors(tmp_path, "MEAN_STD")
    norm = load_lerobot_normalizer(tmp_path)
    assert norm.state.mode == "mean_std" and norm.state.convention == "lerobot"
    assert np.allclose(norm.state.normalize(np.full(8, 2.5)), (2.5 - 0.5) / (2.0 + 1e-8))
    # LeRobot's inverse has no eps: x * std + mean
    assert np.allclose(norm.actions.unnormalize(np.ones(7)), 3.0 + np.arange(7.0))


def test_lerobot_quantiles_use_eps_only_for_empty_ranges(tmp_path):
    write_lerobot_processors(tmp_path, "QUANTILES")
    norm = find_normalizer(tmp_path, kind="lerobot")
    assert np.allclose(norm.state.normalize(np.full(8, 0.75)), 0.5)  # 2 * 0.75 / 1 - 1, no +1e-6
    out = norm.actions.unnormalize(np.ones(7))
    assert np.allclose(out[:6], 1.0) and out[6] == pytest.approx(1e-8)


def test_images_become_float_chw_in_minus_one_one():
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    image[0, 0] = [255, 0, 128]
    out = image_to_model(image, IMAGE_KEY, 224)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    assert out[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 128 / 255 * 2 - 1], abs=1e-6)
    expected = r"'observation/image' must be uint8 \[224, 224, 3\].*got float32 \[224, 224, 3\]"
    with pytest.raises(PolicyError, match=expected):
        image_to_model(np.zeros((224, 224, 3), np.float32), IMAGE_KEY, 224)
    with pytest.raises(PolicyError, match=r"got uint8 \[224, 224, 4\]"):
        image_to_model(np.zeros((224, 224, 4), np.uint8), IMAGE_KEY, 224)


def test_other_image_sizes_are_fitted_with_resize_with_pad():
    """The protocol's 224 px reach a 112 px model (the shipped small Pi0.5) through openpi's resize_with_pad."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    out = image_to_model(image, IMAGE_KEY, 112)
    assert out.shape == (3, 112, 112)
    expected = protocol.resize_with_pad(image, 112, 112).astype(np.float32) / 255 * 2 - 1
    np.testing.assert_array_equal(out, expected.transpose(2, 0, 1))
    wide = image_to_model(rng.integers(0, 255, (100, 200, 3), dtype=np.uint8), IMAGE_KEY, 112)
    assert (wide[:, :28] == -1).all() and (wide[:, -28:] == -1).all()  # letterboxed: black bars


@pytest.mark.parametrize("shape", [(256, 256), (128, 200), (480, 640), (224, 224), (300, 97), (1, 5)])
@pytest.mark.parametrize("size", [(224, 224), (112, 112), (96, 160)])
def test_policy_resize_with_pad_matches_the_task_protocol(shape, size):
    """The policy side's resize-with-pad (its input contract) is bit for bit the task protocol's."""
    image = np.random.default_rng([*shape, *size]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours, theirs = resize_with_pad(image, *size), protocol.resize_with_pad(image, *size)
    assert ours.dtype == theirs.dtype == np.uint8 and ours.shape == (*size, 3)
    assert np.array_equal(ours, theirs)


def test_processor_builds_the_libero_inputs(tokenizer_file):
    cfg = small_config(max_token_len=96, discrete_state_input=True)
    norm = Normalizer(FeatureNorm("quantiles", {"q01": -np.ones(8), "q99": np.ones(8)}),
                      FeatureNorm("quantiles", {"q01": np.zeros(7), "q99": np.full(7, 2.0)}), source="test")
    proc = Pi05Processor(cfg, PromptTokenizer(tokenizer_file, cfg.max_token_len), norm)
    obs = [observation(0), observation(1, prompt="turn on the stove")]
    inputs, states = proc.prepare(obs)
    assert inputs.images.shape == (2, 3, 3, 224, 224) and inputs.images.dtype == torch.float32
    assert inputs.image_masks.tolist() == [[True, True, False]] * 2
    assert (inputs.images[:, 2] == -1).all()  # absent right wrist: zero image -> -1
    wrist = image_to_model(obs[0]["observation/wrist_image"], "w", 224)
    assert torch.equal(inputs.images[0, 1], torch.from_numpy(wrist))
    assert states.shape == (2, 8) and np.allclose(states[0], norm.state.normalize(obs[0]["observation/state"]))
    text = proc.tokenizer.sp.decode(inputs.tokens[1][inputs.token_masks[1]].tolist())
    assert text.startswith("Task: turn on the stove, State: ") and text.endswith(";\nAction: ")
    actions = proc.postprocess(torch.zeros(2, cfg.action_horizon, cfg.action_dim))
    assert actions.shape == (2, cfg.action_horizon, 7) and np.allclose(actions, 1.0, atol=1e-5)
    with pytest.raises(PolicyError, match=r"observation lacks \['prompt'\]"):
        proc.prepare([{k: v for k, v in obs[0].items() if k != "prompt"}])


def test_processor_rejects_a_tokenizer_larger_than_the_vocabulary(tokenizer_file):
    cfg = small_config(vocab_size=100)
    with pytest.raises(PolicyError, match="has 300 pieces but the model vocabulary is 100"):
        Pi05Processor(cfg, PromptTokenizer(tokenizer_file, cfg.max_token_len), Normalizer.identity())
