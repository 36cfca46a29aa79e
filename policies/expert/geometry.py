"""Small rotation and box helpers of the scripted expert (world frame, metres, radians)."""
from __future__ import annotations

import math

import numpy as np


def rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rotation_error(r_des: np.ndarray, r_cur: np.ndarray) -> np.ndarray:
    """Axis-angle (world frame) of the rotation taking `r_cur` to `r_des` (robosuite's OSC applies delta
    rotations on the left: goal = delta @ current)."""
    r = r_des @ r_cur.T
    cos = float(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))
    angle = math.acos(cos)
    if angle < 1e-9:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    norm = np.linalg.norm(axis)
    if norm < 1e-9:  # angle ~ pi: any axis from the symmetric part
        w, v = np.linalg.eigh(r)
        axis = v[:, np.argmax(w)]
        norm = 1.0
    return axis / norm * angle


class Box:
    """An axis-aligned world box (an object's collision AABB from the privileged state)."""

    def __init__(self, lo, hi):
        self.lo = np.asarray(lo, dtype=np.float64)
        self.hi = np.asarray(hi, dtype=np.float64)

    @classmethod
    def of(cls, obj: dict) -> "Box":
        return cls(obj["aabb_min"], obj["aabb_max"])

    @property
    def centre(self) -> np.ndarray:
        return (self.lo + self.hi) / 2

    @property
    def size(self) -> np.ndarray:
        return self.hi - self.lo

    @property
    def top(self) -> float:
        return float(self.hi[2])

    @property
    def bottom(self) -> float:
        return float(self.lo[2])

    def xy_distance(self, point: np.ndarray) -> float:
        """Distance in the horizontal plane from `point` to the box (0 inside)."""
        d = np.maximum(np.maximum(self.lo[:2] - point[:2], point[:2] - self.hi[:2]), 0.0)
        return float(np.linalg.norm(d))
