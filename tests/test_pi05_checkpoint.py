"""Checkpoint layouts (openpi, LeRobot 0.6.1), validation errors, dtypes, directory configs."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.pi05.checkpoint import (
    EMBED_KEY,
    EXPERT_LM_HEAD_KEY,
    LM_HEAD_KEY,
    CheckpointError,
    build_model,
    load_weights,
    read_checkpoint_dir,
    save_weights,
)
from policies.pi05.configuration import pi05_libero
from policies.pi05.modeling import Pi05Model, count_parameters
from tests.pi05_helpers import full_depth_config, lerobot_keys, random_inputs, random_model, random_noise

LAYER_Q = "paligemma_with_expert.paligemma.model.language_model.layers.7.self_attn.q_proj.weight"
VISION_FC1 = "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.26.mlp.fc1.weight"



@pytest.fixture(scope="module")
def source() -> Pi05Model:
    """pi05_libero's depths at toy widths, so its state dict has every checkpoint name."""
    return random_model(full_depth_config(), seed=11)


def fresh(config) -> Pi05Model:
    return Pi05Model(config).init_random_weights(99).eval()


def assert_same_weights(a: Pi05Model, b: Pi05Model) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        if name != EXPERT_LM_HEAD_KEY:
            assert torch.equal(sa[name], sb[name]), name


def test_pi05_libero_on_meta_device_has_the_lerobot_names_and_shapes():
    with torch.device("meta"):
        model = Pi05Model(pi05_libero())
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    theirs = {name.removeprefix("model."): shape for name, shape in lerobot_keys()}
    assert len(theirs) == 813
    assert ours == theirs
    assert all(p.is_meta for p in model.parameters())
    # spec H.1: 3,353,433,872 used + 263,323,648 unused expert lm_head (the tied embedding counted once)
    assert count_parameters(model) == 3_353_433_872 + 263_323_648


def test_lerobot_layout_with_all_813_names_loads(tmp_path, source):
    path = tmp_path / "model.safetensors"
    save_weights(source, path, layout="lerobot")
    stored = load_file(str(path))
    assert set(stored) == {name for name, _ in lerobot_keys()}
    assert torch.equal(stored["model." + LM_HEAD_KEY], stored["model." + EMBED_KEY])  # two tensors, as in 0.6.1

    model = fresh(source.config)
    report = load_weights(model, path)
    assert report.layout == "lerobot" and report.num_tensors == 813
    assert report.embedding_source == EMBED_KEY and report.expert_lm_head_loaded
    assert_same_weights(model, source)
    inputs, noise = random_inputs(source.config), random_noise(source.config)
    with torch.no_grad():
        assert torch.equal(model.sample_actions(inputs, noise), source.sample_actions(inputs, noise))


def test_openpi_layout_loads_with_the_embedding_from_lm_head(tmp_path, source):
    path = tmp_path / "model.safetensors"
    save_weights(source, path, layout="openpi")
    stored = load_file(str(path))
    assert EMBED_KEY not in stored and LM_HEAD_KEY in stored and len(stored) == 812
    assert set(stored) == {name.removeprefix("model.") for name, _ in lerobot_keys()} - {EMBED_KEY}
    model = fresh(source.config)
    report = load_weights(model, path)
    assert report.layout == "openpi" and report.embedding_source == LM_HEAD_KEY
    assert_same_weights(model, source)
    assert model.paligemma_with_expert.paligemma.lm_head.weight is model.vlm.embed_tokens.weight


def test_lerobot_untied_embedding_prefers_embed_tokens(tmp_path, source):
    tensors = {"model." + k: v.clone() for k, v in source.state_dict().items()}
    tensors["model." + LM_HEAD_KEY] = torch.zeros_like(tensors["model." + LM_HEAD_KEY])
    save_file(tensors, str(tmp_path / "w.safetensors"))
    model = fresh(source.config)
    load_weights(model, tmp_path / "w.safetensors")
    assert torch.equal(model.vlm.embed_tokens.weight, source.vlm.embed_tokens.weight)


@pytest.mark.parametrize("layout", ["lerobot", "openpi"])
def test_missing_tensor_is_named(tmp_path, source, layout):
    prefix = "model." if layout == "lerobot" else ""
    path = tmp_path / "w.safetensors"
    save_weights(source, path, layout=layout)
    tensors = load_file(str(path))
    del tensors[prefix + LAYER_Q]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as err:
        load_weights(fresh(source.config), path)
    assert err.value.missing == [prefix + LAYER_Q] and not err.value.unexpected and not err.value.mismatched
    assert f"1 missing tensor(s):\n    {prefix}{LAYER_Q}" in str(err.value)


@pytest.mark.parametrize("layout", ["lerobot", "openpi"])
def test_misshaped_and_unexpected_tensors_are_named_with_shapes(tmp_path, source, layout):
    prefix = "model." if layout == "lerobot" else ""
    path = tmp_path / "w.safetensors"
    save_weights(source, path, layout=layout)
    tensors = load_file(str(path))
    expected = tuple(tensors[prefix + VISION_FC1].shape)
    tensors[prefix + VISION_FC1] = torch.zeros(expected[0] + 1, expected[1])
    tensors[prefix + "state_proj.weight"] = torch.zeros(4, 4)  # a pi0 tensor, not part of pi05
    save_file(tensors, str(path))
    model = fresh(source.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_weights(model, path)
    assert err.value.mismatched == [(prefix + VISION_FC1, expected, (expected[0] + 1, expected[1]))]
    assert err.value.unexpected == [prefix + "state_proj.weight"] and not err.value.missing
    message = str(err.value)
    assert f"{prefix}{VISION_FC1}: expected {list(expected)}, found {[expected[0] + 1, expected[1]]}" in message
    assert f"1 unexpected tensor(s):\n    {prefix}state_proj.weight" in message
    # validation happens before any copy: the model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mixed_prefixes_are_rejected(tmp_path, source):
    tensors = {("model." if i % 2 else "") + k: v.clone() for i, (k, v) in enumerate(source.state_dict().items())}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="keys start with 'model.'"):
        load_weights(fresh(source.config), tmp_path / "w.safetensors")


def test_expert_lm_head_is_optional(tmp_path, source):
    tensors = load_file(str(_saved(tmp_path, source, "openpi")))
    del tensors[EXPERT_LM_HEAD_KEY]
    save_file(tensors, str(tmp_path / "w.safetensors"))
    model = fresh(source.config)
    report = load_weights(model, tmp_path / "w.safetensors")
    assert not report.expert_lm_head_loaded
    assert model.state_dict()[EXPERT_LM_HEAD_KEY].abs().max() == 0
    assert_same_weights(model, source)


def _saved(tmp_path, model, layout, dtype=None):
    path = tmp_path / f"{layout}.safetensors"
    save_weights(model, path, layout=layout, dtype=dtype)
    return path


def test_bfloat16_file_into_float32_and_bfloat16_models(tmp_path, source, monkeypatch):
    path = _saved(tmp_path, source, "openpi", dtype=torch.bfloat16)
    # A checkpoint is never unpickled.
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    model32, report = build_model(source.config, path, dtype="float32")
    assert report.file_dtypes == ("bfloat16",)
    q = model32.state_dict()[LAYER_Q]
    assert q.dtype == torch.float32 and torch.equal(q, source.state_dict()[LAYER_Q].bfloat16().float())
    model16, _ = build_model(source.config, path, dtype="bfloat16")
    assert model16.state_dict()[LAYER_Q].dtype == torch.bfloat16
    assert model16.state_dict()["action_in_proj.weight"].dtype == torch.float32
    assert model16.paligemma_with_expert.paligemma.lm_head.weight is model16.vlm.embed_tokens.weight
    inputs, noise = random_inputs(source.config), random_noise(source.config)
    with torch.no_grad():
        a32, a16 = model32.sample_actions(inputs, noise), model16.sample_actions(inputs, noise)
    assert a16.dtype == torch.float32 and (a32 - a16).abs().max() < 0.1 * a32.abs().max()


def test_build_model_validates_before_allocating(tmp_path, source):
    path = tmp_path / "w.safetensors"
    save_file({"model.action_in_proj.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(CheckpointError) as err:
        build_model(pi05_libero(), path)  # full size: fails on the meta device, before any allocation
    # all but the mis-shaped one and the optional expert lm_head (embed_tokens / lm_head: neither is there)
    assert len(err.value.missing) == 811 and "... and 771 more" in str(err.value)


def test_checkpoint_directory_configs(tmp_path, source):
    save_weights(source, tmp_path / "model.safetensors", layout="lerobot")
    # LeRobot config.json (fields as written by PI05Config.save_pretrained in 0.6.1)
    (tmp_path / "config.json").write_text(json.dumps({
        "type": "pi05", "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m", "dtype": "bfloat16",
        "chunk_size": 50, "max_action_dim": 32, "num_inference_steps": 10, "tokenizer_max_length": 200,
        "empty_cameras": 1, "min_period": 0.004, "max_period": 4.0, "image_resolution": [224, 224],
        "input_features": {"observation.state": {"type": "STATE", "shape": [8]},
                           "observation.images.image": {"type": "VISUAL", "shape": [3, 224, 224]},
                           "observation.images.image2": {"type": "VISUAL", "shape": [3, 224, 224]}},
    }))
    info = read_checkpoint_dir(tmp_path)
    assert info.kind == "lerobot" and info.precision == "bfloat16"
    assert (info.config.action_horizon, info.config.num_cameras, info.config.discrete_state_input) == (50, 3, True)
    assert info.config.vlm == pi05_libero().vlm

    (tmp_path / "config.json").write_text(json.dumps({
        "action_dim": 32, "action_horizon": 10, "paligemma_variant": "gemma_2b",
        "action_expert_variant": "gemma_300m", "precision": "bfloat16"}))
    info = read_checkpoint_dir(tmp_path)
    assert info.kind == "openpi" and info.config.discrete_state_input is False
    assert read_checkpoint_dir(tmp_path, discrete_state_input=True).config.discrete_state_input is True

    (tmp_path / "pi05_config.json").write_text(json.dumps(source.config.to_dict()))
    info = read_checkpoint_dir(tmp_path)
    assert info.kind == "pi05" and info.config == source.config

    (tmp_path / "config.json").write_text(json.dumps({"type": "act"}))
    (tmp_path / "pi05_config.json").unlink()
    with pytest.raises(Exception, match="neither a LeRobot pi05 config"):
        read_checkpoint_dir(tmp_path)
