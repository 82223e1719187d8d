"""Synthetic input frames for the benchmarks: a drawing that keeps changing."""

from __future__ import annotations

import numpy as np


def synthetic_frames(count: int, size: int) -> list[np.ndarray]:
    """A drawing that keeps changing: a gradient background, a disc moving
    along a circle and a stroke that grows, so consecutive frames differ by a
    little (no frame is skipped as identical, none looks like a scene cut)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    background = np.stack([200 + 40 * xx, 190 + 50 * yy, 230 - 30 * xx], axis=-1)
    frames = []
    for index in range(count):
        image = background.copy()
        angle = 2 * np.pi * index / 60
        cx, cy = 0.5 + 0.25 * np.cos(angle), 0.5 + 0.25 * np.sin(angle)
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < 0.015] = (40, 80, 200)
        length = 0.1 + 0.8 * ((index % 90) / 90)
        image[(np.abs(yy - 0.3) < 0.012) & (xx > 0.05) & (xx < 0.05 + length)] = (20, 20, 20)
        frames.append(image.clip(0, 255).astype(np.uint8))
    return frames
