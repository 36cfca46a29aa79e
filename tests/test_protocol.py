"""openpi's LIBERO observation protocol: images, state, prompt (no env needed)."""
import math

import numpy as np
import pytest

from libero_eval.episode import policy_observation
from policies.base import IMAGE_KEY, PRIVILEGED_KEY, PROMPT_KEY, STATE_KEY, WRIST_IMAGE_KEY
from policies.pi05.configuration import tiny
from policies.pi05.processing import TINY_TOKENIZER, Normalizer, Pi05Processor, PromptTokenizer
from tasks import protocol


def _asymmetric_image(h=256, w=256):
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:10, :20] = [255, 0, 0]  # red block in the top-left corner
    img[-5:, -30:] = [0, 0, 255]  # blue strip in the bottom-right corner
    return img


def test_rotation_is_180_degrees():
    img = _asymmetric_image()
    rot = protocol.rotate_180(img)
    assert rot.shape == img.shape and rot.flags["C_CONTIGUOUS"]
    # top-left red block ends bottom-right; bottom-right blue strip ends top-left
    assert (rot[-10:, -20:] == [255, 0, 0]).all()
    assert (rot[:5, :30] == [0, 0, 255]).all()
    assert (rot[10:-10, 30:-30] == 0).all()
    np.testing.assert_array_equal(protocol.rotate_180(rot), img)


def test_model_image_shape_dtype_and_direction():
    out = protocol.model_image(_asymmetric_image())
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # red ends bottom-right after rotation, scaled by 224/256
    assert out[-3:, -10:, 0].mean() > 200 and out[-3:, -10:, 2].mean() < 30
    assert out[:3, :20, 2].mean() > 150 and out[:3, :20, 0].mean() < 30


def test_resize_with_pad_non_square_is_centred_on_black():
    img = np.full((100, 200, 3), 200, dtype=np.uint8)
    out = protocol.resize_with_pad(img, 224, 224)
    assert out.shape == (224, 224, 3)
    # 200x100 -> 224x112, padded by (224 - 112) // 2 = 56 rows above
    assert (out[:56] == 0).all() and (out[56 + 112 :] == 0).all()
    assert (out[56 : 56 + 112] == 200).all()


def test_resize_with_pad_is_identity_at_target_size():
    img = _asymmetric_image(224, 224)
    assert protocol.resize_with_pad(img) is img


def test_resize_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        protocol.resize_with_pad(np.zeros((256, 256, 3), dtype=np.float32))


@pytest.mark.parametrize(
    "quat, expected",
    [
        ([0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0]),  # identity
        ([0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4)], [0.0, 0.0, math.pi / 2]),  # 90 deg about z
        ([1.0, 0.0, 0.0, 0.0], [math.pi, 0.0, 0.0]),  # 180 deg about x
        ([0.0, 0.0, 0.0, 1.0 + 1e-12], [0.0, 0.0, 0.0]),  # w slightly above 1: clipped, no NaN
        ([0.0, math.sin(5e-7), 0.0, math.cos(5e-7)], [0.0, 1e-6, 0.0]),  # w close to 1: tiny rotation
    ],
)
def test_quat2axisangle_known_values(quat, expected):
    out = protocol.quat2axisangle(np.array(quat))
    np.testing.assert_allclose(out, expected, atol=1e-7)
    assert np.isfinite(out).all()


def test_quat2axisangle_does_not_modify_input():
    quat = np.array([0.0, 0.0, 0.0, 1.5])
    protocol.quat2axisangle(quat)
    assert quat[3] == 1.5


def _raw_observation() -> dict:
    return {
        "agentview_image": _asymmetric_image(),
        "robot0_eye_in_hand_image": _asymmetric_image(),
        "robot0_eef_pos": np.array([0.1, -0.2, 1.0]),
        "robot0_eef_quat": np.array([0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4)]),
        "robot0_gripper_qpos": np.array([0.04, -0.04]),
    }


def test_observation_dict_contract():
    """The producer (openpi's protocol on a raw LIBERO observation, assembled by the episode loop) against
    the consumer's one definition of the keys (policies.base) and the Pi0.5 processor that reads them."""
    obs = policy_observation(_raw_observation(), "put the bowl on the plate")
    assert set(obs) == {IMAGE_KEY, WRIST_IMAGE_KEY, STATE_KEY, PROMPT_KEY}
    assert obs[STATE_KEY].shape == (8,) and obs[STATE_KEY].dtype == np.float32
    np.testing.assert_allclose(obs[STATE_KEY], [0.1, -0.2, 1.0, 0, 0, math.pi / 2, 0.04, -0.04], atol=1e-6)
    assert obs[PROMPT_KEY] == "put the bowl on the plate"
    for key in (IMAGE_KEY, WRIST_IMAGE_KEY):
        assert obs[key].shape == (224, 224, 3) and obs[key].dtype == np.uint8
    config = tiny()
    processor = Pi05Processor(config, PromptTokenizer(TINY_TOKENIZER, config.max_token_len), Normalizer.identity())
    inputs, states = processor.prepare([obs], "cpu")
    assert inputs.image_masks[0].tolist() == [True, True, False] and states.shape == (1, 8)
    blind = policy_observation(_raw_observation(), "x", privileged={"goal": 1}, images=False)
    assert set(blind) == {STATE_KEY, PROMPT_KEY, PRIVILEGED_KEY}


def test_observation_without_images_is_a_clear_error():
    raw = {"robot0_eef_pos": np.zeros(3), "robot0_eef_quat": np.array([0, 0, 0, 1.0]), "robot0_gripper_qpos": np.zeros(2)}
    with pytest.raises(KeyError, match="expect_observation"):
        policy_observation(raw, "x")
