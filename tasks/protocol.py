"""openpi's LIBERO observation protocol (examples/libero/main.py), see reference/pi05_spec.md F.1.

Images: rotate 180 degrees (flip H and W), resize-with-pad to 224x224 with PIL bilinear, uint8.
State (8): eef position (3), axis-angle of the eef quaternion (3), gripper qpos (2).
Prompt: the task's language instruction.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

MODEL_IMAGE_SIZE = 224
NUM_STEPS_WAIT = 10  # settle steps after set_init_state, with the dummy action
REPLAN_STEPS = 5  # actions of each returned chunk executed open loop before the next query
DUMMY_ACTION = np.array([0.0] * 6 + [-1.0], dtype=np.float64)  # no motion, gripper open

AGENTVIEW = "agentview_image"
WRIST = "robot0_eye_in_hand_image"


def rotate_180(image: np.ndarray) -> np.ndarray:
    # image: [H, W, C] -> [H, W, C], flipped in both spatial axes (LIBERO renders upside down)
    return np.ascontiguousarray(image[::-1, ::-1])


def resize_with_pad(image: np.ndarray, height: int = MODEL_IMAGE_SIZE, width: int = MODEL_IMAGE_SIZE) -> np.ndarray:
    """Keep the aspect ratio, resize (PIL bilinear) so the image fits, centre it on black padding.

    Mirrors openpi_client.image_tools.resize_with_pad: ratio = max(w/W, h/H), new size int(h/ratio),
    int(w/ratio), padding (H - h') // 2 before and the remainder after.
    """
    # image: [h, w, 3] uint8 -> [height, width, 3] uint8
    if image.dtype != np.uint8:
        raise ValueError(f"resize_with_pad expects uint8 images, got {image.dtype}")
    cur_h, cur_w = image.shape[:2]
    if (cur_h, cur_w) == (height, width):
        return image
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = int(cur_h / ratio), int(cur_w / ratio)
    resized = Image.fromarray(image).resize((new_w, new_h), resample=Image.BILINEAR)
    canvas = Image.new(resized.mode, (width, height), 0)
    canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))
    return np.asarray(canvas)


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """Quaternion (x, y, z, w) -> axis-angle (3), as robosuite's / openpi's _quat2axisangle."""
    quat = np.array(quat, dtype=np.float64)  # copy: never clip the caller's array
    quat[3] = min(max(quat[3], -1.0), 1.0)
    den = math.sqrt(1.0 - quat[3] * quat[3])
    if math.isclose(den, 0.0):
        return np.zeros(3)  # zero rotation
    return quat[:3] * 2.0 * math.acos(quat[3]) / den


def state_vector(raw_obs: dict[str, Any]) -> np.ndarray:
    # -> float32 [8]: eef pos (3), axis-angle (3), gripper qpos (2)
    return np.concatenate(
        [raw_obs["robot0_eef_pos"], quat2axisangle(raw_obs["robot0_eef_quat"]), raw_obs["robot0_gripper_qpos"]]
    ).astype(np.float32)


def model_image(raw_image: np.ndarray, size: int = MODEL_IMAGE_SIZE) -> np.ndarray:
    return resize_with_pad(rotate_180(raw_image), size, size)
