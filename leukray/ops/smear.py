"""Leukocytes in whole peripheral-blood smear fields, as pure numpy/cv2/scipy functions:
find them, cut each out as a C-NMC-like single-cell crop on black (what `leukray screen`
classifies).

A smear field (ALL-IDB1: 2592x1944, BCCD: 640x480) holds a few leukocytes among hundreds of
red cells, so screening is detection -> crop -> the bundle's own preprocessing -> classifier:

1. `leukocyte_mask`: leukocyte nuclei take up the basic dye of May-Grunwald-Giemsa / Wright
   stain and are deep purple-blue, while red cells and plasma are pink-red to grey. On the
   stain channel B - G (a blue-minus-green difference, as in the arithmetic-channel
   segmentations of Madhloom et al. 2010 and Putzu, Caocci & Di Ruberto 2014) nuclei sit far
   above everything else, and Otsu's threshold (Otsu 1979) separates them; opening removes
   specks, closing and hole filling make each nucleus solid.
2. `detect_leukocytes`: nearby nucleus pieces are merged into one cell (a neutrophil's 3-5
   lobes), pieces too small (platelets) or too large (stain debris, clumps) are dropped.
   Sizes are relative to the red-cell diameter, which is estimated from the image, so the
   same defaults work at BCCD's and ALL-IDB1's magnifications.
3. `cell_crop`: the nucleus (its convex hull) grown by a ring of cytoplasm, on black.

`detect_and_crop` is the batch function (slides in, preprocessed cells out) that
`leukray.distributed.actors.detect_batch` hands to Ray Data.

Whole-slide images go through the same detector a tile at a time: `slide_tile_rows` plans a
slide's tiles (`leukray.ops.tiles`), `detect_and_crop` detects on each tile and keeps the
cells whose nucleus centre lies in the tile's core, in level-0 slide coordinates.

May import: numpy, cv2, scipy, `leukray.config`, `leukray.ops.preprocess`, `leukray.ops.stain`,
`leukray.ops.cellfeatures`, `leukray.ops.tiles`. No Ray, no torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from leukray.config import PreprocessConfig, ScreenConfig
from leukray.ops import cellfeatures, stain
from leukray.ops.preprocess import (
    READ_ERRORS,
    ImageError,
    decode_image,
    otsu_threshold,
    preprocess_image_with_cell,
    read_error_reason,
    to_rgb_uint8,
)
from leukray.ops.tiles import Tile, choose_level, tile_grid

# Decoding and morphology run one slide per Ray worker (see leukray.ops.preprocess).
cv2.setNumThreads(1)

BOX_COLUMNS = ["x0", "y0", "x1", "y1", "cx", "cy", "area"]
NO_CELLS = "no leukocytes detected"
# A red cell is about 7.5 um across; the detector works on an image rescaled so that it
# spans this many pixels, which fixes every kernel size below in red-cell units and makes
# a 5-megapixel ALL-IDB1 field about as cheap as a BCCD one.
WORK_RED_CELL_PX = 32.0


@dataclass(frozen=True)
class CellBox:
    """One detected leukocyte, in pixel coordinates of the input field.

    x0, y0, x1, y1 (end-exclusive) bound the whole cell as it is cropped (nucleus plus the
    cytoplasm ring, clipped to the field); cx, cy is the nucleus centroid; area is the
    nucleus area in pixels; hull (K x 2 int32, x y) outlines the nucleus (convex hull of its
    lobes), or is None for a box given by hand (then the crop is the ellipse in the box).
    """

    x0: int
    y0: int
    x1: int
    y1: int
    cx: float
    cy: float
    area: int
    hull: np.ndarray | None = field(default=None, compare=False, repr=False)

    def contains(self, x: float, y: float) -> bool:
        return self.x0 <= x < self.x1 and self.y0 <= y < self.y1


def check_rgb(image: np.ndarray, what: str = "image") -> None:
    """Raise ValueError unless `image` is HxWx3 uint8 (the pipeline's one convention)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"{what}: expected HxWx3 uint8 RGB, got {shape} {dtype}")


def stain_channel(image: np.ndarray) -> np.ndarray:
    """B - G clipped to 0-255 (HxW uint8): high on purple-blue nuclei, ~0 on red cells and
    background, whose green is as high as or higher than their blue."""
    check_rgb(image)
    diff = image[:, :, 2].astype(np.int16) - image[:, :, 1].astype(np.int16)
    return np.clip(diff, 0, 255).astype(np.uint8)


def estimate_red_cell_diameter(image: np.ndarray, min_stain: int = 20) -> float:
    """The median red-cell diameter in pixels of a smear field (HxWx3 uint8 RGB).

    Cells are darker than the plasma background in green; Otsu (1979) on the green channel
    of the pixels that are not leukocyte stain separates red cells from plasma. Stained
    pixels (B - G above Otsu's threshold, floored at `min_stain`, and a 2-pixel ring) are
    left out of both the threshold and the blobs: in a field crowded with blasts the dark
    nuclei would otherwise set the threshold (pale red cells fall on the plasma's side) and
    the blobs measured would be leukocytes (measured on ALL-IDB1 Im052_1: 130 px instead
    of ~78). Holes (red-cell central pallor) are filled, and each blob's largest inscribed
    disk (twice the maximum of the distance transform) measures one cell even where red
    cells touch in chains. Computed on a copy scaled to <= 800 px.

    Returns:
        The median over blobs, in pixels of `image`; a fallback of width / 25 when the field
        has no usable blobs.
    """
    from scipy import ndimage

    check_rgb(image)
    h, w = image.shape[:2]
    scale = min(1.0, 800.0 / max(h, w))
    small = (
        cv2.resize(
            image,
            (max(1, round(w * scale)), max(1, round(h * scale))),
            interpolation=cv2.INTER_AREA,
        )
        if scale < 1
        else image
    )
    green = cv2.GaussianBlur(small[:, :, 1], (3, 3), 0)
    channel = cv2.GaussianBlur(stain_channel(small), (3, 3), 0)
    stained = (channel > max(otsu_threshold(channel), min_stain)).astype(np.uint8)
    stained = cv2.dilate(stained, np.ones((5, 5), np.uint8)).astype(bool)
    plain = green[~stained]
    threshold = otsu_threshold(plain.reshape(1, -1)) if plain.size else otsu_threshold(green)
    cells = ((green <= threshold) & ~stained).astype(np.uint8)
    cells = _fill_holes(cv2.morphologyEx(cells, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)))
    count, labels = cv2.connectedComponents(cells, connectivity=8)
    if count <= 1:
        return w / 25.0
    dist = cv2.distanceTransform(cells, cv2.DIST_L2, 5)
    radii = np.asarray(ndimage.maximum(dist, labels, np.arange(1, count)))
    areas = np.bincount(labels.ravel(), minlength=count)[1:]
    keep = radii >= 3  # specks and platelets
    if not keep.any():
        return w / 25.0
    # Area-weighted median: the many small specks (dust, platelets, broken pallor rims)
    # would otherwise outvote the cells that cover most of the field.
    order = np.argsort(radii[keep])
    cumulative = np.cumsum(areas[keep][order])
    median_radius = radii[keep][order][np.searchsorted(cumulative, cumulative[-1] / 2.0)]
    return float(2.0 * median_radius / scale)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a 0/1 uint8 mask (flood the background from the border)."""
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    flood = padded.copy()
    cv2.floodFill(flood, np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8), (0, 0), 1)
    holes = (flood == 0)[1:-1, 1:-1]
    return (mask.astype(bool) | holes).astype(np.uint8)


def _disk(diameter: float) -> np.ndarray:
    side = max(1, round(diameter) | 1)  # odd, so the kernel is centred
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))


def _working_scale(image: np.ndarray, cfg: ScreenConfig) -> tuple[float, float]:
    """(red-cell diameter in input pixels, factor input -> working image)."""
    diameter = cfg.red_cell_diameter_px or estimate_red_cell_diameter(image, cfg.min_stain)
    return diameter, min(1.0, WORK_RED_CELL_PX / diameter)


def _nucleus_mask(image: np.ndarray, cfg: ScreenConfig, red_cell_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(the nucleus mask (HxW uint8 0/1), the smoothed stain channel it was cut from) at the
    scale where a red cell is `red_cell_px` wide."""

    channel = cv2.GaussianBlur(stain_channel(image), (3, 3), 0)
    threshold = max(otsu_threshold(channel), cfg.min_stain)
    mask = (channel > threshold).astype(np.uint8)
    # Opening by a disk of 1/8 red cell removes platelet fragments and stained specks;
    # closing by the same disk reconnects a nucleus cut by a pale chromatin seam.
    kernel = _disk(red_cell_px / 8.0)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    return _fill_holes(mask), channel


def leukocyte_mask(image: np.ndarray, cfg: ScreenConfig) -> np.ndarray:
    """Leukocyte nuclei of a stained smear field.

    Otsu's threshold (Otsu 1979) on the B - G stain channel (floored at `cfg.min_stain`),
    then opening (removes specks smaller than ~1/8 red cell), closing and hole filling.

    Args:
        image: HxWx3 uint8 RGB smear field.
        cfg: detection parameters.

    Returns:
        HxW bool, True on nucleus pixels (before the size filter of `detect_leukocytes`).

    Raises:
        ValueError: `image` is not HxWx3 uint8.
    """
    mask, scale, _, _ = _working_mask(image, cfg)
    if scale < 1.0:
        mask = cv2.resize(mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
    return mask.astype(bool)


def _working_mask(image: np.ndarray, cfg: ScreenConfig) -> tuple[np.ndarray, float, float, np.ndarray]:
    """(nucleus mask at the working scale, factor input -> working image, red-cell
    diameter in working pixels, stain channel at the working scale), after checking `image`."""
    check_rgb(image)
    diameter, scale = _working_scale(image, cfg)
    red_px = diameter * scale
    mask, channel = _nucleus_mask(_resize(image, scale), cfg, red_px)
    return mask, scale, red_px, channel


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1.0:
        return image
    h, w = image.shape[:2]
    return cv2.resize(
        image,
        (max(1, round(w * scale)), max(1, round(h * scale))),
        interpolation=cv2.INTER_AREA,
    )


def detect_leukocytes(image: np.ndarray, cfg: ScreenConfig) -> list[CellBox]:
    """Find the leukocytes of a smear field.

    The nucleus mask (`leukocyte_mask`, at a working scale where a red cell is 32 px) is cut
    into pieces: touching nuclei are split by a watershed (`split_touching_nuclei`), then
    lobe-sized pieces within `cfg.merge_distance` red-cell diameters of another piece join
    it (`group_lobes`), so a neutrophil's lobes give one cell. Cells whose nucleus area is
    outside [min_area_fraction, max_area_fraction] x the red-cell area are dropped.

    Args:
        image: HxWx3 uint8 RGB smear field.
        cfg: detection parameters.

    Returns:
        One `CellBox` per cell, ordered top to bottom, left to right.

    Raises:
        ValueError: `image` is not HxWx3 uint8.
    """
    mask, scale, red_px, channel = _working_mask(image, cfg)
    h, w = image.shape[:2]
    if not mask.any():
        return []
    pieces = split_touching_nuclei(mask, cfg.split_depth * red_px)
    red_area = math.pi * (red_px / 2.0) ** 2
    groups = group_lobes(pieces, cfg.lobe_area_fraction * red_area, cfg.merge_distance * red_px)
    groups = split_clumps(groups, channel, cfg.max_area_fraction * red_area, red_px, cfg.split_depth * red_px)
    wh, ww = mask.shape
    cells: list[CellBox] = []
    for g in range(1, int(groups.max()) + 1):
        ys, xs = np.nonzero(groups == g)
        area = len(xs)
        if area == 0 or not cfg.min_area_fraction * red_area <= area <= cfg.max_area_fraction * red_area:
            continue
        touches_edge = xs.min() == 0 or ys.min() == 0 or xs.max() == ww - 1 or ys.max() == wh - 1
        if touches_edge and area < cfg.edge_fraction * red_area:
            continue
        points = np.stack([xs, ys], axis=1).astype(np.float32)
        hull = cv2.convexHull(points).reshape(-1, 2) / scale  # back to input pixels
        radius = math.sqrt(area / math.pi) / scale
        ring = cfg.margin * radius
        x0, y0 = hull.min(axis=0) - ring
        x1, y1 = hull.max(axis=0) + ring
        cells.append(
            CellBox(
                x0=max(0, math.floor(x0)),
                y0=max(0, math.floor(y0)),
                x1=min(w, math.ceil(x1) + 1),
                y1=min(h, math.ceil(y1) + 1),
                cx=float((xs.mean() + 0.5) / scale - 0.5),
                cy=float((ys.mean() + 0.5) / scale - 0.5),
                area=round(area / scale**2),
                hull=np.round(hull).astype(np.int32),
            )
        )
    cells.sort(key=lambda c: (c.cy, c.cx))
    return cells


def split_clumps(groups: np.ndarray, channel: np.ndarray, max_area: float, red_px: float, depth: float) -> np.ndarray:
    """Cut the groups larger than one cell can be (`max_area` pixels) at their pale seams.

    Blasts packed in a clump touch along seams that the nucleus mask's closing and hole
    filling paint over, so the clump has no neck for `split_touching_nuclei`. Inside such
    a group the seams (cell membranes, thin cytoplasm) stain less than the nuclei: Otsu's
    threshold on the group's own stain values keeps the nuclei's cores, which are opened by
    a 1/8 red-cell disk, hole-filled and split by the same watershed. Only groups that the
    size filter would drop are touched, so every other detection stays as it was (measured:
    ALL-IDB1 blast centres 51/59 -> 59/59 with the crowding-robust red-cell estimate; BCCD
    unchanged at 369/372 WBCs, 440 detections, 16 outside every WBC box, on 364 fields).

    Args:
        groups: HxW int32 group labels (0 = background).
        channel: HxW uint8 stain channel at the same scale.
        max_area: groups above this many pixels are re-cut.
        red_px: red-cell diameter in pixels at this scale.
        depth: h of the watershed's h-maxima, in pixels.

    Returns:
        HxW int32 labels: the pieces of the re-cut groups replace them (numbered after the rest).
    """
    areas = np.bincount(groups.ravel())
    oversize = [g for g in np.nonzero(areas > max_area)[0] if g != 0]
    if not oversize:
        return groups
    groups = groups.copy()
    following = int(groups.max()) + 1
    for g in oversize:
        blob = groups == g
        core = (blob & (channel > otsu_threshold(channel[blob].reshape(1, -1)))).astype(np.uint8)
        core = _fill_holes(cv2.morphologyEx(core, cv2.MORPH_OPEN, _disk(red_px / 8.0)))
        pieces = split_touching_nuclei(core, depth)
        groups[blob] = 0
        inside = pieces > 0
        groups[inside] = pieces[inside] + following - 1
        following += int(pieces.max())
    return groups


def split_touching_nuclei(mask: np.ndarray, depth: float) -> np.ndarray:
    """Split touching nuclei: marker-controlled watershed on the distance transform (Vincent &
    Soille 1991) with the h-maxima of the distance as markers (Soille 2003, ch. 6.3.4).

    Every nucleus of a clump is a dome of the distance-to-background map; two domes are
    two nuclei when the saddle between them is at least `depth` pixels below the lower top
    (a neck narrower than the nuclei). Ridges of one irregular nucleus are shallower and
    stay one piece.

    Args:
        mask: HxW uint8 0/1 nucleus mask.
        depth: h of the h-maxima, in pixels; 0 disables splitting.

    Returns:
        HxW int32 labels, 0 = background, 1..K = pieces.
    """
    count, labels = cv2.connectedComponents(mask, connectivity=8)
    if count <= 1 or depth <= 0:
        return labels.astype(np.int32)
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    # Morphological reconstruction by dilation of dist - h under dist; dist - reconstruction
    # is h exactly on the tops of the domes that rise >= h above their saddles.
    reconstruction = np.maximum(dist - depth, 0).astype(np.float32)
    cross = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
    while True:
        grown = np.minimum(cv2.dilate(reconstruction, cross), dist)
        if np.array_equal(grown, reconstruction):
            break
        reconstruction = grown
    tops = (dist - reconstruction >= depth - 1e-3) & (mask > 0)
    n_tops, markers = cv2.connectedComponents(tops.astype(np.uint8), connectivity=8)
    if n_tops - 1 <= len(np.unique(labels[tops])):  # at most one top per blob: nothing to split
        return labels.astype(np.int32)
    # Flood from the tops downhill, one distance level at a time (the immersion watershed of
    # Vincent & Soille 1991), so the basins meet at the necks. At equal distance a pixel
    # goes to the larger label: ties only move a one-pixel boundary.
    pieces = markers.astype(np.float32)
    for level in np.arange(math.floor(float(dist.max())), -1.0, -1.0):
        allowed = (dist >= level) & (mask > 0)
        while True:
            grown = cv2.dilate(pieces, cross)
            new = allowed & (pieces == 0) & (grown > 0)
            if not new.any():
                break
            pieces[new] = grown[new]
    pieces = pieces.astype(np.int32)
    leftover = (mask > 0) & (pieces == 0)  # blobs too shallow to hold a top
    if leftover.any():
        _, rest = cv2.connectedComponents(leftover.astype(np.uint8), connectivity=8)
        pieces[leftover] = rest[leftover] + n_tops
    return pieces.astype(np.int32)


def group_lobes(pieces: np.ndarray, lobe_area: float, distance: float) -> np.ndarray:
    """Merge the lobes of one cell: a piece smaller than `lobe_area` pixels (a lobe of a
    neutrophil's 3-5-lobed nucleus, or a sliver cut off a nucleus) joins every piece within
    `distance` pixels of it; larger pieces (round blast or lymphocyte nuclei) are never
    merged with each other directly.

    Args:
        pieces: HxW int32 labels (0 = background).
        lobe_area: pieces below this area (pixels) are lobes.
        distance: lobes closer than this to another piece are merged with it.

    Returns:
        HxW int32 group labels, 0 = background, 1..G.
    """
    from scipy import ndimage

    n = int(pieces.max())
    if n == 0:
        return pieces
    areas = np.bincount(pieces.ravel(), minlength=n + 1)
    parent = list(range(n + 1))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    reach = math.ceil(distance)
    kernel = _disk(2 * distance + 1)
    h, w = pieces.shape
    for label, window in enumerate(ndimage.find_objects(pieces), start=1):
        if window is None or areas[label] >= lobe_area or distance <= 0:
            continue
        ys = slice(max(0, window[0].start - reach), min(h, window[0].stop + reach))
        xs = slice(max(0, window[1].start - reach), min(w, window[1].stop + reach))
        near = cv2.dilate((pieces[ys, xs] == label).astype(np.uint8), kernel) > 0
        for other in np.unique(pieces[ys, xs][near]):
            if other not in (0, label):
                parent[root(int(other))] = root(label)
    roots = np.asarray([root(i) for i in range(n + 1)])
    _, group_of = np.unique(roots, return_inverse=True)  # root 0 (background) -> 0
    return group_of[pieces].astype(np.int32)


def cell_crop(image: np.ndarray, box: CellBox, cfg: ScreenConfig) -> np.ndarray:
    """Cut one cell out of the field as C-NMC does: the cell on a black background.

    Pixels inside the nucleus hull grown by `cfg.margin` x the nucleus's equivalent radius
    (the cytoplasm ring) are kept; everything else in the box is set to 0. A box without a
    hull keeps the ellipse inscribed in the box.

    Args:
        image: HxWx3 uint8 RGB smear field.
        box: a detected cell (`detect_leukocytes`) or a hand-made box.
        cfg: provides `margin`.

    Returns:
        (y1 - y0) x (x1 - x0) x 3 uint8 RGB.

    Raises:
        ValueError: `image` is not HxWx3 uint8, or the box is empty or outside the image.
    """
    check_rgb(image)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = max(0, box.x0), max(0, box.y0), min(w, box.x1), min(h, box.y1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"cell box ({box.x0}, {box.y0}, {box.x1}, {box.y1}) is empty or outside the {w}x{h} image")
    keep = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    if box.hull is None or len(box.hull) < 3:
        centre = ((x1 - x0 - 1) / 2.0, (y1 - y0 - 1) / 2.0)
        cv2.ellipse(
            keep,
            (round(centre[0]), round(centre[1])),
            (max(1, (x1 - x0) // 2), max(1, (y1 - y0) // 2)),
            0,
            0,
            360,
            1,
            -1,
        )
    else:
        cv2.fillConvexPoly(keep, (box.hull - np.array([x0, y0])).astype(np.int32), 1)
        ring = cfg.margin * math.sqrt(max(box.area, 1) / math.pi)
        if ring >= 1:
            keep = cv2.dilate(keep, _disk(2 * ring + 1))
    crop = image[y0:y1, x0:x1].copy()
    crop[keep == 0] = 0
    return crop


def detection_recall(boxes: Sequence[CellBox], centres: np.ndarray | Sequence[tuple[float, float]]) -> float:
    """Share of annotated cell centres (N x 2, x y) that fall inside a detected box; each box
    may claim one centre (so one box over two cells counts once). NaN without centres."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if len(centres) == 0:
        return math.nan
    free = list(range(len(boxes)))
    hit = 0
    for x, y in centres:
        inside = [i for i in free if boxes[i].contains(x, y)]
        if inside:
            # the box whose nucleus centroid is nearest claims the centre
            best = min(inside, key=lambda i: (boxes[i].cx - x) ** 2 + (boxes[i].cy - y) ** 2)
            free.remove(best)
            hit += 1
    return hit / len(centres)


# -- the Ray Data stage ---------------------------------------------------------------------


def detect_and_crop(
    batch: dict[str, np.ndarray],
    cfg: ScreenConfig,
    preprocess_cfg: PreprocessConfig,
    read_bytes: Callable[[str], bytes],
    cell_families: tuple[str, ...] = (),
    read_region: RegionReader | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data batch function: slides (or whole-slide tiles) in, cells out.

    Args:
        batch: column `path` (str), one row per slide; or the rows of `slide_tile_rows`
            (TILE_COLUMNS), one per camera field or whole-slide tile.
        cfg: detection parameters.
        preprocess_cfg: the bundle's preprocessing (`Bundle.preprocess`), applied to each
            crop exactly as in training.
        read_bytes: path or URI -> file bytes.
        cell_families: hand-crafted families (`leukray.ops.cellfeatures`) to measure on each
            cut-out cell, as the bundle's classifier was trained with.
        read_region: (path, level, x, y, width, height) -> the pixels of a whole-slide
            region (`leukray.io.wholeslide.read_region`); needed for tile rows.

    Returns:
        One row per detected cell: `slide` (the path), `cell_index` (0, 1, ... per slide; in a
        whole slide tile * TILE_CELL_STRIDE + the cell's index in the tile), x0, y0, x1, y1,
        cx, cy, area (see `CellBox`; level-0 pixels of a whole slide), `image` (N x size x
        size x 3 uint8, preprocessed) and `error` (""). A slide or tile that cannot be read
        or decoded, or has no cells, gives one row with `cell_index` -1, a blank image and the
        reason in `error`; so does a cell whose crop preprocessing rejects (with its own
        index), so no slide, tile or cell is dropped silently.
    """
    size = preprocess_cfg.size
    blank = np.zeros((size, size, 3), dtype=np.uint8)
    rows: list[CellRow] = []
    tiled = "tile_index" in batch
    for i, path in enumerate(map(str, batch["path"])):
        if tiled and str(batch["error"][i]):
            rows.append((path, -1, NO_BOX, blank, str(batch["error"][i]), _no_cell(cell_families)))
        elif tiled and int(batch["tile_index"][i]) >= 0:
            if read_region is None:
                raise ValueError("detect_and_crop: tile rows need a read_region function")
            tile = {c: batch[c][i] for c in TILE_COLUMNS}
            rows.extend(_tile_rows(path, tile, cfg, preprocess_cfg, read_region, blank, cell_families))
        else:
            rows.extend(_slide_rows(path, cfg, preprocess_cfg, read_bytes, blank, cell_families))
    out: dict[str, np.ndarray] = {
        "slide": np.asarray([r[0] for r in rows], dtype=object),
        "cell_index": np.asarray([r[1] for r in rows], dtype=np.int64),
    }
    coords = np.asarray([r[2] for r in rows], dtype=np.float64).reshape(-1, len(BOX_COLUMNS))
    for k, name in enumerate(BOX_COLUMNS):
        out[name] = coords[:, k] if name in ("cx", "cy") else coords[:, k].astype(np.int64)
    out["image"] = np.stack([r[3] for r in rows]) if rows else np.zeros((0, size, size, 3), np.uint8)
    out["error"] = np.asarray([r[4] for r in rows], dtype=object)
    if cell_families:
        dim = cellfeatures.feature_dim(cell_families)
        out["cell_features"] = (
            np.stack([r[5] for r in rows]).reshape(-1, dim) if rows else np.zeros((0, dim), np.float32)
        )
    return out


# -- whole-slide tiles ------------------------------------------------------------------------

# A whole slide's cell_index: tile index x this + the cell's index within the tile (unique per
# slide, in tile then reading order, without a pass over the whole slide).
TILE_CELL_STRIDE = 100_000
# One row per camera field (tile_index -1: decode the whole file) or whole-slide tile.
TILE_COLUMNS = [
    "tile_index", "level", "downsample", "x", "y", "width", "height",
    "core_x0", "core_y0", "core_x1", "core_y1", "red_cell_px", "error",
]  # fmt: skip
_TILE_BOX = ("x", "y", "width", "height", "core_x0", "core_y0", "core_x1", "core_y1")
# (path, level, x, y, width, height) -> the region's pixels, HxWxS
RegionReader = Callable[[str, int, int, int, int, int], np.ndarray]


def field_row(path: str, error: str = "") -> dict[str, object]:
    """The one row of a camera field (decoded whole), or of a slide that could not be
    opened (`error` says why)."""
    return {"path": path, **{c: 0 for c in TILE_COLUMNS}, "tile_index": -1, "downsample": 1.0, "error": error}


def slide_tile_rows(
    path: str,
    levels: Sequence[tuple[int, int, float]],
    mpp: float,
    read_level_region: Callable[[int, int, int, int, int], np.ndarray],
    cfg: ScreenConfig,
) -> list[dict[str, object]]:
    """The tiles of one whole slide, as rows for `detect_and_crop`.

    The level is `choose_level`'s (by `cfg.target_mpp` or `cfg.level`). The red-cell
    diameter, the unit of every detection size, is `cfg.red_cell_diameter_px` (level-0
    pixels) when set, else estimated once on the slide's central tile and used for every
    tile, so all tiles detect alike; the overlap is `cfg.tile_overlap` of them.

    Args:
        path: the slide.
        levels: (width, height, downsample) per level, level 0 first.
        mpp: level 0's microns per pixel (0 = unknown).
        read_level_region: (level, x, y, width, height) -> pixels.
        cfg: tiling and detection parameters.

    Raises:
        ImageError, ValueError: the central tile cannot be read as an image.
    """
    level = choose_level([d for _, _, d in levels], mpp, cfg.target_mpp, cfg.level)
    width, height, downsample = levels[level]
    if cfg.red_cell_diameter_px:
        red_px = cfg.red_cell_diameter_px / downsample
    else:
        side = min(cfg.tile_px, width, height)
        centre = read_level_region(level, (width - side) // 2, (height - side) // 2, side, side)
        red_px = estimate_red_cell_diameter(to_rgb_uint8(centre), cfg.min_stain)
    red_px = max(red_px, 4.0)
    overlap = math.ceil(cfg.tile_overlap * red_px)
    return [
        {
            "path": path,
            "tile_index": tile.index,
            **{f: getattr(tile, f) for f in _TILE_BOX},
            "level": level,
            "downsample": float(downsample),
            "red_cell_px": float(red_px),
            "error": "",
        }
        for tile in tile_grid(width, height, cfg.tile_px, overlap)
    ]


def _tile_rows(
    path: str,
    row: dict[str, object],
    cfg: ScreenConfig,
    preprocess_cfg: PreprocessConfig,
    read_region: RegionReader,
    blank: np.ndarray,
    cell_families: tuple[str, ...],
) -> list[CellRow]:
    """The rows of one whole-slide tile: the cells it owns, in level-0 coordinates."""
    tile = Tile(index=int(row["tile_index"]), **{f: int(row[f]) for f in _TILE_BOX})
    where = f"tile {tile.index} (level {int(row['level'])}, x {tile.x}, y {tile.y})"
    try:
        image = to_rgb_uint8(read_region(path, int(row["level"]), tile.x, tile.y, tile.width, tile.height))
        tile_cfg = dataclasses.replace(cfg, red_cell_diameter_px=float(row["red_cell_px"]))
        cells = [c for c in detect_leukocytes(image, tile_cfg) if tile.owns(c.cx + tile.x, c.cy + tile.y)]
    except (*READ_ERRORS, ValueError) as exc:
        return [(path, -1, NO_BOX, blank, f"{where}: {read_error_reason(exc)}", _no_cell(cell_families))]
    if not cells:
        return [(path, -1, NO_BOX, blank, NO_CELLS, _no_cell(cell_families))]
    ds = float(row["downsample"])
    rows = _cell_rows(path, image, cells, cfg, preprocess_cfg, blank, cell_families)
    first = tile.index * TILE_CELL_STRIDE
    return [(p, i if i < 0 else first + i, _to_slide(box, tile, ds), *rest) for p, i, box, *rest in rows]


def _to_slide(box: tuple[float, ...], tile: Tile, downsample: float) -> tuple[float, ...]:
    """A box in tile pixels -> level-0 slide pixels (BOX_COLUMNS order)."""
    if math.isnan(box[4]):
        return box
    x0, y0, x1, y1, cx, cy, area = box
    ds = downsample
    return (
        math.floor((x0 + tile.x) * ds),
        math.floor((y0 + tile.y) * ds),
        math.ceil((x1 + tile.x) * ds),
        math.ceil((y1 + tile.y) * ds),
        (cx + tile.x + 0.5) * ds - 0.5,
        (cy + tile.y + 0.5) * ds - 0.5,
        round(area * ds * ds),
    )


def normalise_field_cells(crops: list[np.ndarray], cfg: PreprocessConfig) -> list[np.ndarray]:
    """The cut-out cells of one field normalised toward `cfg.stain_target` by `cfg.stain`
    (`leukray.ops.stain`), all with one source estimate from their stained pixels pooled:
    the field's leukocytes, like for like with the reference cells (a field's red cells and
    plasma would skew it), and one mapping per field, so differences between its cells stay.

    Raises:
        ImageError: no target configured, or too few stained pixels in the field's cells.
    """
    if cfg.stain == "none":
        return crops
    if not cfg.stain_target:
        raise ImageError(f"preprocess.stain is {cfg.stain} but preprocess.stain_target is empty")
    try:
        target = stain.parse_target(cfg.stain, cfg.stain_target)
        source = stain.fit_target(cfg.stain, crops)
        return [stain.normalise(crop, cfg.stain, target, source) for crop in crops]
    except stain.StainError as exc:
        raise ImageError(f"stain normalisation: {exc}") from None


# slide, cell index (-1: the slide itself), box (BOX_COLUMNS), preprocessed crop, error, cell features
CellRow = tuple[str, int, tuple[float, ...], np.ndarray, str, np.ndarray]
NO_BOX = (0, 0, 0, 0, math.nan, math.nan, 0)


def _no_cell(cell_families: tuple[str, ...]) -> np.ndarray:
    return np.zeros(cellfeatures.feature_dim(cell_families) if cell_families else 0, np.float32)


def _slide_rows(
    path: str,
    cfg: ScreenConfig,
    preprocess_cfg: PreprocessConfig,
    read_bytes: Callable[[str], bytes],
    blank: np.ndarray,
    cell_families: tuple[str, ...] = (),
) -> list[CellRow]:
    """The rows of one camera field (see `detect_and_crop`)."""
    try:
        field_image = decode_image(read_bytes(path), cfg.max_pixels)
        cells = detect_leukocytes(field_image, cfg)
    except (*READ_ERRORS, ValueError) as exc:  # ValueError: check_rgb's shape check
        return [(path, -1, NO_BOX, blank, read_error_reason(exc), _no_cell(cell_families))]
    if not cells:
        return [(path, -1, NO_BOX, blank, NO_CELLS, _no_cell(cell_families))]
    return _cell_rows(path, field_image, cells, cfg, preprocess_cfg, blank, cell_families)


def _cell_rows(
    path: str,
    image: np.ndarray,
    cells: list[CellBox],
    cfg: ScreenConfig,
    preprocess_cfg: PreprocessConfig,
    blank: np.ndarray,
    cell_families: tuple[str, ...],
) -> list[CellRow]:
    """The detected `cells` of one field or tile cut out, stain-normalised together and
    preprocessed (coordinates in `image`'s pixels)."""
    no_cell = _no_cell(cell_families)
    crops = [cell_crop(image, cell, cfg) for cell in cells]
    try:
        crops = normalise_field_cells(crops, preprocess_cfg)
    except ImageError as exc:
        return [(path, -1, NO_BOX, blank, str(exc), no_cell)]
    crop_cfg = dataclasses.replace(preprocess_cfg, stain="none", stain_target="")
    rows: list[CellRow] = []
    for index, (cell, cut) in enumerate(zip(cells, crops, strict=True)):
        coords = (cell.x0, cell.y0, cell.x1, cell.y1, cell.cx, cell.cy, cell.area)
        try:
            crop, cell_rgb, cell_mask = preprocess_image_with_cell(cut, crop_cfg)
            measured = cellfeatures.cell_features(cell_rgb, cell_mask, cell_families) if cell_families else no_cell
            rows.append((path, index, coords, crop, "", measured))
        except ImageError as exc:
            rows.append((path, index, coords, blank, f"crop rejected by preprocessing: {exc}", no_cell))
    return rows
