"""Rollout videos: one mp4 per episode, frames with a small HUD (frame index, decision, reason)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HUD_HEIGHT = 32  # keeps 224-px frames a multiple of 16 (libx264 macro blocks): 224 + 32 = 256

_DECISION_COLOURS = {
    "full": (80, 200, 120),
    "reuse": (240, 180, 40),
    "partial": (90, 160, 240),
    "expert": (190, 120, 230),
}


def hud_frame(images: list[np.ndarray], lines: list[str], decision: str | None = None) -> np.ndarray:
    """Images side by side ([H, W, 3] uint8 each, same H) above a HUD strip with up to two text lines."""
    row = np.concatenate(images, axis=1)
    h, w = row.shape[:2]
    canvas = Image.new("RGB", (w, h + HUD_HEIGHT), (0, 0, 0))
    canvas.paste(Image.fromarray(row), (0, 0))
    draw = ImageDraw.Draw(canvas)
    colour = _DECISION_COLOURS.get((decision or "").lower(), (230, 230, 230))
    for i, line in enumerate(lines[:2]):
        draw.text((4, h + 3 + 14 * i), line, fill=colour if i == 0 else (230, 230, 230))
    return np.asarray(canvas)


class VideoWriter:
    """Writes frames to an mp4 (libx264, ultrafast) as they come; nothing is kept in memory."""

    def __init__(self, path: str | Path, fps: int = 10):
        import imageio.v2 as imageio  # pulls ffmpeg's plugin machinery: only where videos are written

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.frames = 0
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

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
