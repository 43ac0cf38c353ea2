"""Deterministic synthetic single-cell images in the C-NMC 2019 layout.

This is the built-in default data of the project (used by ``leukray demo`` and
the tests). It writes segmented, stain-normalised white-blood-cell images the
way the C-NMC 2019 challenge ships them::

    <out_dir>/fold_<k>/{all,hem}/UID_<subject>_<image>_<cell>_<all|hem>.bmp

Every image is a 450x450 8-bit RGB BMP holding one dark-purple cell on a pure
black background. ALL (leukaemic) subjects are named by numbers (``UID_3_...``)
and normal subjects by ``H`` + number (``UID_H7_...``); each subject has a
single class, and there are about two ALL cells (and subjects) per normal one.

The morphology follows the haematology of the two cell types and was tuned
against statistics measured on real C-NMC cells (foreground = gray > 8):

* Lymphoblasts (ALL): larger, a high nucleus-to-cytoplasm ratio (thin rim),
  fine open chromatin, one to three paler nucleoli, and more irregular,
  sometimes cleft, outlines.
* Normal lymphocytes (hem): smaller and round, with dense clumped chromatin
  (coarse, blotchy texture) and occasionally a wider rim of cytoplasm.

Each cell draws a latent "blastness" in [0, 1] from a class-dependent Beta
distribution; size, shape, texture, nucleoli and rim all depend on it plus
independent noise, so the classes overlap in every feature at once (a good
classifier is clearly better than chance but far from perfect). Each subject
draws a :class:`SubjectStyle` (stain hue, brightness, scale, texture contrast,
focus, ...) that shifts the features of all its cells, so splits by image are
optimistic compared with splits by subject.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

__all__ = ["SubjectStyle", "generate_dataset", "render_cell"]

#: Side of the square images in the C-NMC layout.
IMAGE_SIZE = 450

#: `generate_dataset` starts at most one process per this many cells (~1 s of writing).
CELLS_PER_WORKER = 100

_LABELS = ("all", "hem")

# Class-conditional Beta parameters of the latent "blastness".
_BLASTNESS_BETA = {"all": (6.0, 2.5), "hem": (2.5, 6.0)}

# Cell area (px, at 450x450) at blastness 0, and log-area gained per unit of
# blastness. Chosen so that the class medians land near the real C-NMC medians
# (ALL ~35.8k px, normal ~23.7k px).
_AREA_AT_B0 = 18_000.0
_LOG_AREA_PER_B = 0.87
_LOG_AREA_NOISE = 0.10

# Colours (RGB, 0-255 floats) measured on real stain-normalised cells.
_NUCLEUS_MID = np.array([64.0, 25.5, 76.0], np.float32)
# Direction of chromatin density in RGB, scaled to one gray level per unit.
_CHROMATIN_AXIS = np.array([8.5, 4.2, 4.0], np.float32) / np.float32(0.299 * 8.5 + 0.587 * 4.2 + 0.114 * 4.0)
_RIM_COLOUR = np.array([100.0, 60.0, 110.0], np.float32)
_DEBRIS_COLOUR = np.array([88.0, 55.0, 86.0], np.float32)
_EDGE_DIM = (-0.1, 0.95)  # outermost pixels: a + b * coverage, relative to neighbours
_NUCLEOLUS_COLOUR = np.array([94.0, 46.0, 93.0], np.float32)
# Channel-wise floor inside the cell: guarantees gray > 8 on every cell pixel.
_FLOOR = np.array([22.0, 9.0, 26.0], np.float32)


@dataclasses.dataclass(frozen=True)
class SubjectStyle:
    """Per-subject (per-slide) appearance variation.

    Attributes:
        hue_shift: Stain hue shift; positive is pinker (more red, less blue),
            negative bluer. Applied as log channel gains.
        brightness: Multiplicative intensity factor of the whole cell.
        scale: Multiplicative factor on the linear cell size.
        texture_contrast: Multiplicative factor on the chromatin texture.
        rim_width: Multiplicative factor on the width of the bright rim.
        blur: Gaussian sigma (px at 450x450) of the optical blur.
        blastness_shift: Additive offset on the latent blastness of every
            cell of the subject (disease stage / sample preparation).
    """

    hue_shift: float = 0.0
    brightness: float = 1.0
    scale: float = 1.0
    texture_contrast: float = 1.0
    rim_width: float = 1.0
    blur: float = 1.1
    blastness_shift: float = 0.0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> SubjectStyle:
        """Draws a random subject style.

        Args:
            rng: Source of randomness.

        Returns:
            A new :class:`SubjectStyle`.
        """
        return cls(
            hue_shift=float(rng.normal(0.0, 0.05)),
            brightness=float(np.exp(rng.normal(0.0, 0.08))),
            scale=float(np.exp(rng.normal(0.0, 0.05))),
            texture_contrast=float(np.exp(rng.normal(0.0, 0.2))),
            rim_width=float(np.exp(rng.normal(0.0, 0.2))),
            blur=float(np.clip(rng.normal(1.1, 0.25), 0.6, 1.8)),
            blastness_shift=float(rng.normal(0.0, 0.06)),
        )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Returns Gaussian-correlated noise with unit standard deviation.

    Large correlation lengths are drawn on a coarse grid and upsampled, which
    keeps the cost independent of ``sigma``.
    """
    h, w = shape
    f = max(1, int(sigma / 2.0))
    hs, ws = h // f + 4, w // f + 4
    n = rng.standard_normal((hs, ws), dtype=np.float32)
    n = cv2.GaussianBlur(n, (0, 0), sigma / f, borderType=cv2.BORDER_REFLECT)
    if f > 1:
        n = cv2.resize(n, (ws * f, hs * f), interpolation=cv2.INTER_CUBIC)
    n = n[f : f + h, f : f + w]
    sd = float(n.std())
    return (n - float(n.mean())) / (sd if sd > 0 else 1.0)


def _outline(rng: np.random.Generator, b: float, radius: float, n_pts: int = 360) -> np.ndarray:
    """Returns the polar outline r(theta) of a cell with mean radius ~``radius``."""
    theta = np.linspace(0.0, 2.0 * np.pi, n_pts, endpoint=False)
    r = np.ones(n_pts)
    # Elongation: ellipse with a random aspect ratio (blasts a bit more).
    aspect = 1.0 + abs(rng.normal(0.0, 0.06 + 0.05 * b))
    r *= 1.0 / np.sqrt((np.cos(theta) / aspect) ** 2 + (np.sin(theta) * aspect) ** 2)
    # Low-order irregularity, stronger in blasts.
    irr = (0.012 + 0.04 * b) * float(np.exp(rng.normal(0.0, 0.45)))
    for k in range(2, 9):
        amp = irr * rng.normal(0.0, 1.0) / k**0.8
        r *= 1.0 + amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    # Fine edge roughness (segmentation wiggle).
    rough = min(0.0045, 0.003 * float(np.exp(rng.normal(0.0, 0.3))))
    for k in range(10, 40, 3):
        r *= 1.0 + rough * rng.normal(0.0, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    # Nuclear cleft / indentation: typical of blasts, occasional otherwise.
    n_clefts = int(rng.random() < 0.05 + 0.4 * b) + int(rng.random() < 0.12 * b)
    for _ in range(n_clefts):
        centre = rng.uniform(0, 2 * np.pi)
        width = rng.uniform(0.06, 0.25)
        depth = rng.uniform(0.05, 0.15 + 0.25 * b)
        dist = np.angle(np.exp(1j * (theta - centre)))
        r *= 1.0 - depth * np.exp(-0.5 * (dist / width) ** 2)
    return radius * r


def _fragment(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, px: float) -> tuple[str, np.ndarray, int]:
    """Returns a piece of debris left attached by the segmentation.

    Real C-NMC crops often keep a torn tag of cytoplasm or a fragment of a
    neighbouring cell attached to the nucleus (the main cause of low
    circularity). The result is ``(kind, points, thickness)`` in the same
    coordinates as the outline; ``kind`` is ``"line"`` or ``"poly"``.
    """
    i = int(rng.integers(0, xs.size))
    ex, ey = float(xs[i]), float(ys[i])
    norm = math.hypot(ex, ey) or 1.0
    ux, uy = ex / norm, ey / norm
    if rng.random() < 0.55:  # thin curved tendril
        n = 12
        length = rng.uniform(25.0, 120.0) * px
        heading = math.atan2(uy, ux) + rng.normal(0.0, 0.6)
        turn = rng.normal(0.0, 0.25)
        pts = [(ex - 4.0 * px * ux, ey - 4.0 * px * uy)]
        for _ in range(n):
            heading += turn + rng.normal(0.0, 0.15)
            x, y = pts[-1]
            pts.append((x + length / n * math.cos(heading), y + length / n * math.sin(heading)))
        thick = max(2, int(round(rng.uniform(4.0, 12.0) * px)))
        return "line", np.array(pts), thick
    rb = rng.uniform(14.0, 34.0) * px  # blob of cytoplasm / neighbour
    cx, cy = ex + 0.6 * rb * ux, ey + 0.6 * rb * uy
    th = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
    rr = rb * (1.0 + 0.25 * _smooth_noise_1d(rng, th.size))
    return "poly", np.stack([cx + rr * np.cos(th), cy + rr * 0.7 * np.sin(th)], axis=1), 0


def _smooth_noise_1d(rng: np.random.Generator, n: int) -> np.ndarray:
    """Returns a smooth periodic 1-D noise of length ``n`` in about [-1, 1]."""
    th = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    out = np.zeros(n)
    for k in range(1, 5):
        out += rng.normal(0.0, 1.0 / k) * np.cos(k * th + rng.uniform(0, 2 * np.pi))
    return np.clip(out / 1.5, -1.0, 1.0)


def render_cell(
    rng: np.random.Generator,
    label: str,
    subject_style: SubjectStyle,
    size: int = IMAGE_SIZE,
) -> np.ndarray:
    """Renders one segmented, stained white blood cell on a black background.

    Args:
        rng: Source of randomness; the image depends only on its state and the
            other arguments.
        label: ``"all"`` for a lymphoblast, ``"hem"`` for a normal lymphocyte.
        subject_style: Appearance of the subject the cell belongs to.
        size: Side of the square image in pixels; geometry is scaled from the
            450x450 C-NMC layout.

    Returns:
        A ``size`` x ``size`` x 3 ``uint8`` RGB image. Pixels outside the cell
        are exactly 0; every cell pixel has gray (BT.601) > 8; the cell does
        not touch the image border.

    Raises:
        ValueError: If ``label`` is not ``"all"`` or ``"hem"`` or ``size`` is
            below 64.
    """
    if label not in _BLASTNESS_BETA:
        raise ValueError(f"label must be 'all' or 'hem', got {label!r}")
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    st = subject_style
    px = size / IMAGE_SIZE  # pixel scale relative to the C-NMC images
    margin = max(4, int(round(10 * px)))

    a, bb = _BLASTNESS_BETA[label]
    b = float(np.clip(rng.beta(a, bb) + st.blastness_shift, 0.0, 1.0))

    # --- Geometry (centred on the origin) ----------------------------------
    log_area = math.log(_AREA_AT_B0) + _LOG_AREA_PER_B * b + rng.normal(0.0, _LOG_AREA_NOISE + 0.06 * (1.0 - b))
    if rng.random() < 0.2 * (1.0 - b):  # large (reactive) lymphocytes
        log_area += rng.uniform(0.15, 0.45)
    area = float(np.clip(math.exp(log_area), 8_000.0, 75_000.0)) * (st.scale * px) ** 2
    r_theta = _outline(rng, b, 1.0)
    theta = np.linspace(0.0, 2.0 * np.pi, r_theta.size, endpoint=False) + rng.uniform(0, 2 * np.pi)
    xs, ys = r_theta * np.cos(theta), r_theta * np.sin(theta)
    poly_area = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
    k = math.sqrt(area / poly_area)
    xs, ys = xs * k, ys * k
    half_room = size / 2.0 - margin - 3.0
    ext = max(float(np.abs(xs).max()), float(np.abs(ys).max()))
    if ext > half_room:  # keep the whole cell inside the image
        xs, ys = xs * (half_room / ext), ys * (half_room / ext)
    room_x = half_room - float(np.abs(xs).max())
    room_y = half_room - float(np.abs(ys).max())
    cx = size / 2.0 + float(np.clip(rng.normal(0.0, 10.0 * px), -room_x, room_x))
    cy = size / 2.0 + float(np.clip(rng.normal(0.0, 10.0 * px), -room_y, room_y))
    cell_pts = np.stack([xs + cx, ys + cy], axis=1)

    # Debris attached by the segmentation, and small blebs.
    extras: list[tuple[str, np.ndarray, int]] = []
    if rng.random() < 0.06 + 0.14 * b:
        extras.append(_fragment(rng, xs, ys, px))
        if rng.random() < 0.35:
            extras.append(_fragment(rng, xs, ys, px))
    if rng.random() < 0.12:
        i = int(rng.integers(0, xs.size))
        rb = rng.uniform(4.0, 10.0) * px
        u = np.array([xs[i], ys[i]]) / (math.hypot(xs[i], ys[i]) or 1.0)
        extras.append(("circle", np.array([[xs[i] + 0.4 * rb * u[0], ys[i] + 0.4 * rb * u[1]]]), int(round(rb))))
    lo, hi = margin + 1.0, size - margin - 2.0
    clipped = []
    for kind, pts, thick in extras:
        pts = pts + np.array([cx, cy])
        rad = thick / 2.0 + 1.0 if kind == "line" else (thick + 1.0 if kind == "circle" else 0.0)
        clipped.append((kind, np.clip(pts, lo + rad, hi - rad), thick))
    all_pts = np.concatenate([cell_pts] + [c[1] for c in clipped])

    # Work on a crop around the cell for speed.
    pad = int(math.ceil(12 * px)) + 4
    x0 = max(0, int(math.floor(all_pts[:, 0].min())) - pad)
    x1 = min(size, int(math.ceil(all_pts[:, 0].max())) + pad + 1)
    y0 = max(0, int(math.floor(all_pts[:, 1].min())) - pad)
    y1 = min(size, int(math.ceil(all_pts[:, 1].max())) + pad + 1)
    h, w = y1 - y0, x1 - x0
    off = np.array([x0, y0], np.float64)

    # Shapes are drawn at 4x and area-averaged: the coverage gives the
    # partial-volume darkening of the outermost pixels seen in real crops.
    ss = 4

    def fix(p: np.ndarray) -> np.ndarray:
        return np.round((p - off) * (16 * ss)).astype(np.int32)

    cell4 = np.zeros((h * ss, w * ss), np.uint8)
    cv2.fillPoly(cell4, [fix(cell_pts)], 255, lineType=cv2.LINE_8, shift=4)
    debris4 = np.zeros_like(cell4)
    for kind, pts, thick in clipped:
        if kind == "line":
            cv2.polylines(debris4, [fix(pts)], False, 255, thick * ss, cv2.LINE_8, shift=4)
        elif kind == "poly":
            cv2.fillPoly(debris4, [fix(pts)], 255, lineType=cv2.LINE_8, shift=4)
        else:
            c = fix(pts)[0]
            cv2.circle(cell4, (int(c[0]), int(c[1])), max(2, thick) * ss * 16, 255, -1, cv2.LINE_8, shift=4)
    cover = cv2.resize(cv2.bitwise_or(cell4, debris4), (w, h), interpolation=cv2.INTER_AREA)
    cell_in = cv2.resize(cell4, (w, h), interpolation=cv2.INTER_NEAREST) > 0
    mask = (cover > 51).astype(np.uint8)
    n_lab, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n_lab > 2:  # keep only the largest piece (drop specks of debris)
        keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        mask = (labels == keep).astype(np.uint8)
    inside = mask > 0
    cell_in &= inside
    debris = inside & ~cell_in
    cover_f = cover.astype(np.float32) / np.float32(255.0)

    # --- Colour (RGB float32, one 2-D plane per channel) ------------------------
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)

    # Chromatin, in gray levels: a large-scale gradient and mottle common to
    # both classes, coarse dense clumps (normal) and fine open chromatin
    # (blasts); right-skewed (pale parachromatin on a mostly dark nucleus).
    contrast = st.texture_contrast * float(np.exp(rng.normal(0.05 * b, 0.12 + 0.25 * b)))
    t = (
        3.4 * _smooth_noise(rng, (h, w), rng.uniform(22.0, 34.0) * px)
        + 2.0 * _smooth_noise(rng, (h, w), rng.uniform(8.0, 13.0) * px)
        + (0.8 + 0.8 * (1.0 - b)) * np.tanh(1.5 * _smooth_noise(rng, (h, w), rng.uniform(4.0, 6.0) * px))
        + (0.5 + 0.7 * b) * _smooth_noise(rng, (h, w), rng.uniform(2.0, 3.0) * px)
    )
    skew = 7.0
    t = np.float32(contrast * skew) * (np.exp(t / np.float32(skew)) - np.float32(1.0))
    t += np.float32(rng.normal(0.0, 2.0))
    planes = [np.float32(_NUCLEUS_MID[c]) + t * _CHROMATIN_AXIS[c] for c in range(3)]

    # Nucleoli: paler round spots, mostly (but not only) in blasts, placed well
    # inside the nucleus (rejection sampling).
    n_nucleoli = min(3, int(rng.poisson(0.3 + 1.8 * b**2)))
    for _ in range(n_nucleoli):
        rad = rng.uniform(3.5, 8.0) * px
        strength = float(np.clip(rng.normal(0.3 + 0.45 * b, 0.2), 0.1, 1.0))
        for _try in range(40):
            yy, xx = int(rng.integers(0, h)), int(rng.integers(0, w))
            if cell_in[yy, xx] and dist[yy, xx] > 24.0 * px:
                break
        else:
            continue
        ly0, ly1 = max(0, int(yy - 3 * rad)), min(h, int(yy + 3 * rad) + 1)
        lx0, lx1 = max(0, int(xx - 3 * rad)), min(w, int(xx + 3 * rad) + 1)
        gy, gx = np.ogrid[ly0:ly1, lx0:lx1]
        r2 = ((gy - yy) ** 2 + (gx - xx) ** 2) / rad**2
        wgt = (strength * np.exp(-0.5 * r2**1.5)).astype(np.float32)
        for c in range(3):
            win = planes[c][ly0:ly1, lx0:lx1]
            win += (np.float32(_NUCLEOLUS_COLOUR[c]) - win) * wgt

    # Bright rim (thin cytoplasm / halo) decaying inwards, uneven along the
    # perimeter; normal lymphocytes sometimes carry a wider rim of cytoplasm.
    rim = 3.3 * (0.85 + 0.3 * (1.0 - b)) * st.rim_width * float(np.exp(rng.normal(0.0, 0.2))) * px
    rim_w = np.exp(-np.maximum(dist - np.float32(1.0), np.float32(0.0)) / np.float32(rim))
    if rng.random() < 0.15 * (1.0 - b):
        band = rng.uniform(6.0, 14.0) * px
        z = np.clip((dist - np.float32(band)) / np.float32(1.2 * px), -30.0, 30.0)
        rim_w = np.maximum(rim_w, np.float32(0.75) / (np.float32(1.0) + np.exp(z)))
    rim_mod = 1.0 + 0.35 * _smooth_noise(rng, (h, w), rng.uniform(15.0, 30.0) * px)
    rim_w = np.clip(rim_w * np.clip(rim_mod, 0.3, 1.7) * np.float32(0.95 + 0.35 * (1.0 - b)), 0.0, 1.0)
    rim_w[~inside] = 1.0  # rim colour outside, so that the blur does not bleed black inwards
    debris_val = _DEBRIS_COLOUR * float(np.exp(rng.normal(0.0, 0.08)))

    # Stain: per-subject hue and brightness, small per-cell jitter.
    hue = st.hue_shift + rng.normal(0.0, 0.02)
    gains = np.exp(np.array([hue, 0.4 * hue, -0.7 * hue])) * st.brightness * float(np.exp(rng.normal(0.0, 0.04)))
    noise = np.float32(0.8) * rng.standard_normal((h, w), dtype=np.float32)  # sensor noise
    sigma = max(0.3, st.blur * px)
    # Outermost pixels are darker (partial volume with the black background).
    edge = np.where(dist <= 1.0, _EDGE_DIM[0] + _EDGE_DIM[1] * cover_f, 1.0).astype(np.float32)
    out_planes = []
    for c in range(3):
        p = planes[c] + (np.float32(_RIM_COLOUR[c]) - planes[c]) * rim_w
        if debris.any():
            p[debris] = debris_val[c]
        p = cv2.GaussianBlur(p * np.float32(gains[c]), (0, 0), sigma)
        p = np.maximum((p + noise) * edge, np.float32(_FLOOR[c]))
        out_planes.append(np.clip(np.rint(p), 0, 255).astype(np.uint8) * mask)
    out = np.zeros((size, size, 3), np.uint8)
    out[y0:y1, x0:x1] = cv2.merge(out_planes)
    return out


def _split_counts(rng: np.random.Generator, total: int, parts: int) -> list[int]:
    """Splits ``total`` into ``parts`` uneven positive integers."""
    weights = rng.dirichlet(np.full(parts, 4.0))
    counts = np.ones(parts, np.int64)
    rest = total - parts
    if rest > 0:
        counts += rng.multinomial(rest, weights)
    return [int(c) for c in counts]


def generate_dataset(
    out_dir: str | os.PathLike,
    cells: int = 600,
    subjects: int = 12,
    seed: int = 0,
    folds: int = 1,
    workers: int = 1,
) -> pd.DataFrame:
    """Writes a synthetic C-NMC-style data set and returns its index.

    Files go to ``<out_dir>/fold_<k>/{all,hem}/UID_<subject>_<image>_<cell>_<label>.bmp``.
    About two thirds of the subjects and of the cells are ALL; each subject
    has one class and lies in exactly one fold, folds being balanced by cell
    count. Existing files are overwritten, other files are left alone. The
    output depends only on the arguments: the same arguments give
    byte-identical files, a different seed gives different images.

    Args:
        out_dir: Root directory of the data set (created if missing).
        cells: Total number of cell images (at least 4 and at least
            ``subjects``).
        subjects: Number of subjects (at least 2: one ALL, one normal).
        seed: Seed of the generator.
        folds: Number of folds the subjects are split into
            (1 <= folds <= subjects).
        workers: Processes that write subjects side by side (each subject
            draws from its own seed, so the files are the same whatever the
            number); at most one per `CELLS_PER_WORKER` cells and one per
            subject, since a process takes ~0.5 s to start.

    Returns:
        A DataFrame with columns ``path`` (absolute, str), ``label``
        (``"all"``/``"hem"``), ``subject`` (e.g. ``"7"`` or ``"H3"``) and
        ``fold`` (int), sorted by path.

    Raises:
        ValueError: On invalid ``cells``, ``subjects`` or ``folds``.
    """
    cells, subjects, folds = int(cells), int(subjects), int(folds)
    _check_sizes(cells, subjects, folds, workers)
    root = Path(out_dir).resolve()
    layout_seq, *subject_seqs = np.random.SeedSequence(int(seed)).spawn(subjects + 1)
    plan = _plan_subjects(np.random.default_rng(layout_seq), cells, subjects)
    fold_of = _assign_folds(plan, folds)
    jobs = [
        (root / f"fold_{fold_of[sid]}" / label, seq, label, sid, count)
        for (label, sid, count), seq in zip(plan, subject_seqs)
    ]
    workers = min(int(workers), len(jobs), cells // CELLS_PER_WORKER)
    if workers > 1:
        # spawned, not forked: callers (the benchmark) may hold Ray's threads and locks
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            parts = list(pool.map(_write_subject_job, jobs))
    else:
        parts = [_write_subject_job(job) for job in jobs]
    rows = [row for part in parts for row in part]
    df = pd.DataFrame(rows, columns=["path", "label", "subject"])
    df["fold"] = df["subject"].map(fold_of).astype(int)
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def _check_sizes(cells: int, subjects: int, folds: int, workers: int) -> None:
    if cells < 4:
        raise ValueError(f"cells must be at least 4, got {cells}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if subjects < 2:
        raise ValueError(f"subjects must be at least 2 (one ALL and one normal subject), got {subjects}")
    if cells < subjects:
        raise ValueError(f"cells ({cells}) must be at least subjects ({subjects}): every subject needs a cell")
    if folds < 1 or folds > subjects:
        raise ValueError(f"folds must be between 1 and subjects ({subjects}), got {folds}")


def _plan_subjects(layout: np.random.Generator, cells: int, subjects: int) -> list[tuple[str, str, int]]:
    """(label, subject id, cells) per subject: about two thirds of the subjects and cells are
    ALL; ids are numbers for ALL and "H" + number for normal (like C-NMC)."""
    n_subj = {"all": min(subjects - 1, max(1, round(subjects * 2 / 3)))}
    n_subj["hem"] = subjects - n_subj["all"]
    n_all_cells = min(cells - n_subj["hem"], max(n_subj["all"], round(cells * 2 / 3)))
    n_cells = {"all": n_all_cells, "hem": cells - n_all_cells}
    pool = max(60, 3 * subjects)
    plan: list[tuple[str, str, int]] = []
    for label in _LABELS:
        ids = np.sort(layout.choice(np.arange(1, pool + 1), size=n_subj[label], replace=False))
        counts = _split_counts(layout, n_cells[label], n_subj[label])
        prefix = "H" if label == "hem" else ""
        plan.extend((label, f"{prefix}{i}", c) for i, c in zip(ids, counts))
    return plan


def _assign_folds(plan: list[tuple[str, str, int]], folds: int) -> dict[str, int]:
    """Greedy by class, largest subjects first, into the fold with the fewest cells of that
    class (ties: fewest cells overall, lowest index)."""
    fold_of: dict[str, int] = {}
    class_load = {lab: [0] * folds for lab in _LABELS}
    total_load = [0] * folds
    for label in _LABELS:
        members = sorted((p for p in plan if p[0] == label), key=lambda p: (-p[2], p[1]))
        for _, sid, count in members:
            f = min(range(folds), key=lambda j: (class_load[label][j], total_load[j], j))
            fold_of[sid] = f
            class_load[label][f] += count
            total_load[f] += count
    return fold_of


def _write_subject_job(job: tuple[Path, np.random.SeedSequence, str, str, int]) -> list[tuple[str, str, str]]:
    folder, seq, label, sid, count = job
    return _write_subject(folder, np.random.default_rng(seq), label, sid, count)


def _write_subject(
    folder: Path, rng: np.random.Generator, label: str, sid: str, count: int
) -> list[tuple[str, str, str]]:
    """One subject's cells, a few per "image" (as C-NMC names them), as BMP files."""
    style = SubjectStyle.draw(rng)
    folder.mkdir(parents=True, exist_ok=True)
    image_idx = int(rng.integers(1, 20))
    done, rows = 0, []
    while done < count:
        per_image = min(count - done, int(rng.integers(1, 6)))
        image_style = dataclasses.replace(style, brightness=style.brightness * float(np.exp(rng.normal(0.0, 0.02))))
        for cell_idx in range(1, per_image + 1):
            rgb = render_cell(rng, label, image_style)
            path = folder / f"UID_{sid}_{image_idx}_{cell_idx}_{label}.bmp"
            if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
                raise OSError(f"could not write {path}")
            rows.append((str(path), label, sid))
        done += per_image
        image_idx += int(rng.integers(1, 3))
    return rows
