"""Tiling batches of images into one picture, for the sample grids the scripts save."""

from __future__ import annotations

import math

import numpy as np


def image_grid(images: np.ndarray, columns: int, padding: int = 0, fill: int = 0) -> np.ndarray:
    """Tiles uint8 images ``(B, H, W, 3)`` row by row into one ``(rows * (H + 2p), columns * (W + 2p), 3)`` array.

    Each image sits in a cell with ``padding`` pixels of colour ``fill`` on every side; cells
    left over in the last row are ``fill`` too.
    """
    count, height, width, _ = images.shape
    rows = math.ceil(count / columns)
    cell_height, cell_width = height + 2 * padding, width + 2 * padding
    grid = np.full((rows * cell_height, columns * cell_width, 3), fill, dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = row * cell_height + padding, column * cell_width + padding
        grid[top : top + height, left : left + width] = image
    return grid
