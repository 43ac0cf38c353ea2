"""Cutting a whole-slide image into overlapping tiles for leukocyte detection, as pure
functions: which pyramid level to read, the tile grid, and which tile owns a cell.

Tiles overlap by at least one leukocyte, so every cell lies whole inside some tile; each
tile owns only its core (the grid cell without the overlap), and a cell is kept by the one
tile whose core holds its nucleus centre, so a cell on a tile border is counted once.

May import: numpy. No Ray, no file access.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The fraction by which a level may be coarser than the target resolution and still be read
# (scanners write 0.2497 or 0.2525 um/px for a nominal 0.25).
MPP_TOLERANCE = 1.05


@dataclass(frozen=True)
class Tile:
    """One tile of a level: the region read (x, y, width, height) and the core it owns
    (core_x0 <= x < core_x1, core_y0 <= y < core_y1), all in that level's pixels."""

    index: int
    x: int
    y: int
    width: int
    height: int
    core_x0: int
    core_y0: int
    core_x1: int
    core_y1: int

    def owns(self, x: float, y: float) -> bool:
        """Whether the point (level pixels) lies in this tile's core."""
        return self.core_x0 <= x < self.core_x1 and self.core_y0 <= y < self.core_y1


def choose_level(downsamples: list[float], mpp: float, target_mpp: float, level: int) -> int:
    """The pyramid level to detect cells on.

    Args:
        downsamples: each level's downsample from level 0 (1.0 first, increasing).
        mpp: level 0's microns per pixel; 0 = unknown.
        target_mpp: the coarsest resolution cells are read at, um/px; 0 = level 0.
        level: a level chosen by hand (>= 0), or -1 to choose by `target_mpp`.

    Returns:
        `level` when given (the last level when the file has fewer); else the coarsest level
        whose resolution is at least `target_mpp` (within 5%), level 0 when none is or when
        `mpp` is unknown.
    """
    if level >= 0:
        return min(level, len(downsamples) - 1)
    if mpp <= 0 or target_mpp <= 0:
        return 0
    fine_enough = [i for i, d in enumerate(downsamples) if mpp * d <= target_mpp * MPP_TOLERANCE]
    return max(fine_enough, default=0)


def tile_grid(width: int, height: int, tile: int, overlap: int) -> list[Tile]:
    """Tiles covering a width x height level: cores on a `tile`-pixel grid (the last row
    and column take what is left), each read with `overlap` pixels more on every side
    (clipped to the level), in row-major order.

    Raises:
        ValueError: non-positive sizes or a negative overlap.
    """
    if width <= 0 or height <= 0 or tile <= 0 or overlap < 0:
        raise ValueError(f"tile_grid needs positive sizes, got {width}x{height}, tile {tile}, overlap {overlap}")
    tiles = []
    for row in range(math.ceil(height / tile)):
        for col in range(math.ceil(width / tile)):
            cx0, cy0 = col * tile, row * tile
            cx1, cy1 = min(width, cx0 + tile), min(height, cy0 + tile)
            x0, y0 = max(0, cx0 - overlap), max(0, cy0 - overlap)
            x1, y1 = min(width, cx1 + overlap), min(height, cy1 + overlap)
            tiles.append(Tile(len(tiles), x0, y0, x1 - x0, y1 - y0, cx0, cy0, cx1, cy1))
    return tiles
