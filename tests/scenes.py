"""Synthetic test images."""

from __future__ import annotations


def synthetic_scene(size_hw=(256, 320), seed=0):
    """Flat background with a few flat discs and boxes: (H, W, 3) uint8."""
    import numpy as np

    h, w = size_hw
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(5):
        cx, cy = rng.integers(0, w), rng.integers(0, h)
        r = rng.integers(min(h, w) // 10, min(h, w) // 4)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    return img
