"""Rollout videos: one mp4 per episode. Each frame is the camera images above a HUD strip of three lines:

    step 103  q20 REUSE scheduled  +3 late        (the query's decision, in its colour; realtime delay)
    fixed_window_window2  pixel_mae 7.21 vs 6.50  (the variant, and the gate's signal against its threshold)
    libero_spatial t0 trial 40                    (the episode)

The last frames are the scene at the episode's last step and a closing card with the outcome.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HUD_HEIGHT = 48  # three 14-px lines; keeps 224-px frames a multiple of 16 (libx264 macro blocks): 224 + 48 = 272
HUD_LINES = 3
TEXT = (230, 230, 230)

_DECISION_COLOURS = {
    "full": (80, 200, 120),
    "reuse": (240, 180, 40),
    "partial": (90, 160, 240),
    "expert": (190, 120, 230),
}
_OUTCOME_COLOURS = {"success": (80, 200, 120), "failure": (235, 90, 80), "error": (240, 180, 40)}


def hud_frame(images: list[np.ndarray], lines: list[str], decision: str | None = None) -> np.ndarray:
    """Images side by side ([H, W, 3] uint8 each, same H) above a HUD strip with up to three text lines (the
    first in the decision's colour)."""
    row = np.concatenate(images, axis=1)
    h, w = row.shape[:2]
    canvas = Image.new("RGB", (w, h + HUD_HEIGHT), (0, 0, 0))
    canvas.paste(Image.fromarray(row), (0, 0))
    draw = ImageDraw.Draw(canvas)
    colour = _DECISION_COLOURS.get((decision or "").lower(), TEXT)
    for i, line in enumerate(lines[:HUD_LINES]):
        draw.text((4, h + 3 + 14 * i), line, fill=colour if i == 0 else TEXT)
    return np.asarray(canvas)


def closing_card(width: int, height: int, status: str, lines: list[str]) -> np.ndarray:
    """A frame of the video's size that says how the episode ended: the status in large type in its colour
    (success / failure / error), then `lines` (reason and step, variant, task)."""
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    big = ImageFont.load_default(size=max(16, height // 8))
    small = ImageFont.load_default(size=max(10, height // 20))
    draw.text((12, height // 8), status.upper(), fill=_OUTCOME_COLOURS.get(status, TEXT), font=big)
    y = height // 8 + max(16, height // 8) + 12
    for line in lines:
        draw.text((12, y), line, fill=TEXT, font=small)
        y += max(10, height // 20) + 6
    return np.asarray(canvas)


def signal_text(record: dict) -> str:
    """The gate's signal against its threshold for a query record: the threshold named like the reason
    when there is one, else the first threshold with a recorded signal ("" when the policy has none)."""
    thresholds = (record.get("extra") or {}).get("thresholds") or {}
    signals = record.get("signals") or {}
    keys = [k for k in thresholds if k in signals and thresholds[k] is not None]
    if not keys:
        return ""
    key = record.get("reason") if record.get("reason") in keys else keys[0]
    return f"{key} {float(signals[key]):.3g} vs {float(thresholds[key]):.3g}"


class VideoWriter:
    """Writes frames to an mp4 (libx264, ultrafast) as they come; nothing is kept in memory."""

    def __init__(self, path: str | Path, fps: int = 10):
        import imageio.v2 as imageio  # pulls ffmpeg's plugin machinery: only where videos are written

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.frames = 0
        self.height = self.width = 0
        self._writer = imageio.get_writer(
            str(self.path),
            fps=fps,
            codec="libx264",
            macro_block_size=16,
            ffmpeg_params=["-preset", "ultrafast"],
            ffmpeg_log_level="error",
        )

    def append(self, frame: np.ndarray) -> None:
        self._writer.append_data(frame)
        self.frames += 1
        self.height, self.width = frame.shape[:2]  # of the last frame (all frames of a video share it)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
