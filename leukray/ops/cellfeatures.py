"""Hand-crafted features of one segmented blood cell: morphology, colour and texture.

What it is for: a random-init ResNet50 carries little signal about C-NMC cells, while size,
shape, stain and chromatin texture are what a haematologist looks at. This module turns one
cell (its bounding-box crop at ORIGINAL resolution plus its foreground mask) into a fixed-length
float32 vector that a classical classifier can use, in the CPU preprocessing stage, in a few
milliseconds per cell.

It is a pure function module: it imports only numpy and cv2 and nothing from leukray (nor Ray
or torch), so it can be moved and called from any worker.

Public API:
    FAMILIES                         -> ("morphology", "colour", "texture")
    feature_names(families)          -> list[str], stable order
    feature_dim(families)            -> int
    cell_features(image, mask, families) -> float32 vector of length feature_dim(families)

Conventions: images are HxWx3 uint8 RGB; lengths are in pixels of the original image (never
resized, because absolute size is the strongest single cue between ALL and normal cells);
the nucleus is the darker part of the cell (gray <= Otsu threshold of the cell's own pixels).
Every output is finite: undefined quantities (e.g. the circularity of a 1-pixel cell) are 0.

Cost, measured on the C-NMC dev fold (crops of ~46k px, one core of a shared 2-core VM):
~4 ms per cell in a tight loop, ~5.3 ms CPU in a decode-then-featurise loop over all 3,527
cells; morphology ~1.1, colour ~1.0, texture ~1.6 ms alone (gray + nucleus shared, ~0.3 ms).
Colour statistics use every second pixel and the GLCM / second LBP a half-resolution image
(see _colour and _texture) to stay near that budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import cv2
import numpy as np

FAMILIES: tuple[str, ...] = ("morphology", "colour", "texture")

# --- feature names ------------------------------------------------------------------------
# Fourier descriptor orders kept: |F_k| / |F_1| for these k (F_1 = the dominant first harmonic
# after orienting the outline counter-clockwise). Low orders describe the overall outline
# (elongation, triangularity, ...); high ones are mostly pixel noise at these sizes.
_FD_ORDERS = (-1, 2, -2, 3, -3, 4, -4, 5, -5, 6)
_FD_SAMPLES = 64  # outline resampled to this many equally spaced points before the FFT

_SHAPE_NAMES = (
    "area",
    "perimeter",
    "circularity",
    "eccentricity",
    "major_axis",
    "minor_axis",
    "solidity",
    "convexity",
    "equiv_diameter",
    "feret_max",
    "feret_min",
    "feret_aspect",
    "extent",
)
_NUCLEUS_NAMES = (
    "nucleus_area",
    "nucleus_ratio",
    "nucleus_circularity",
    "nucleus_solidity",
    "nucleus_eccentricity",
    "nucleus_parts",
    "nucleus_offset",
)
_MORPHOLOGY = (
    [f"morph_{n}" for n in _SHAPE_NAMES]
    + [f"morph_{n}" for n in _NUCLEUS_NAMES]
    + [f"morph_hu{i}" for i in range(1, 8)]
    + [f"morph_fd{'m' if k < 0 else ''}{abs(k)}" for k in _FD_ORDERS]
)

# Colour channels, in the order their histograms are stacked. HSV and Lab are OpenCV's 8-bit
# encodings (H in 0..179, L scaled to 0..255, a/b offset by 128). OD = -log((I+1)/256) per RGB
# channel: Beer-Lambert optical density, roughly proportional to stain amount.
_CHANNELS = ("r", "g", "b", "h", "s", "v", "lab_l", "lab_a", "lab_b", "od_r", "od_g", "od_b")
_CELL_STATS = ("mean", "std", "p10", "p50", "p90")
_COLOUR = (
    [f"colour_{c}_{s}" for c in _CHANNELS for s in _CELL_STATS]
    + [f"colour_nuc_{c}_mean" for c in _CHANNELS]
    + [f"colour_cyto_{c}_mean" for c in _CHANNELS]
)

_GLCM_DISTANCES = (1, 2, 4)  # in pixels of the half-resolution texture image (see _texture)
_GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
_HARALICK = (
    "entropy",
    "variance",
    "sum_average",
    "sum_variance",
    "sum_entropy",
    "diff_variance",
    "diff_entropy",
    "imc1",
    "imc2",
    "max_prob",
)
_LBP_BINS = 10  # rotation-invariant uniform LBP with P=8: 9 uniform codes + 1 "non-uniform"
_TEXTURE = (
    [f"tex_glcm_{p}_d{d}" for d in _GLCM_DISTANCES for p in _GLCM_PROPS]
    + [f"tex_haralick_{n}" for n in _HARALICK]
    + [f"tex_lbp_r1_{i}" for i in range(_LBP_BINS)]
    + [f"tex_lbp_r2_{i}" for i in range(_LBP_BINS)]
    + ["tex_grad_mean", "tex_grad_std", "tex_laplace_mean"]
    + [f"tex_haar{level}_{what}" for level in (1, 2) for what in ("detail", "approx_var", "detail_share")]
)

_NAMES = {"morphology": tuple(_MORPHOLOGY), "colour": tuple(_COLOUR), "texture": tuple(_TEXTURE)}


def _check_families(families: Iterable[str] | str) -> tuple[str, ...]:
    # A bare string would otherwise be iterated character by character.
    families = (families,) if isinstance(families, str) else tuple(families)
    unknown = [f for f in families if f not in _NAMES]
    if unknown:
        raise ValueError(f"unknown feature families {unknown}; choose from {FAMILIES}")
    # Canonical order, duplicates dropped, so the vector layout depends only on the set asked for.
    return tuple(f for f in FAMILIES if f in families)


def feature_names(families: Iterable[str] | str = FAMILIES) -> list[str]:
    """Names of the features `cell_features` returns for `families`, in vector order.

    Args:
        families: any subset of FAMILIES (or one family name). The order is always
            morphology, colour, texture, whatever order they are given in.

    Returns:
        One name per vector element, prefixed by its family (``morph_``, ``colour_``, ``tex_``).

    Raises:
        ValueError: an unknown family name.
    """
    return [name for fam in _check_families(families) for name in _NAMES[fam]]


def feature_dim(families: Iterable[str] | str = FAMILIES) -> int:
    """Length of the vector `cell_features` returns for `families`."""
    return len(feature_names(families))


# --- helpers ------------------------------------------------------------------------------
def _otsu_from_hist(hist: np.ndarray) -> int | None:
    """Otsu's threshold t of a 256-bin histogram (low class = values <= t), or None when
    there is no split (fewer than two occupied levels)."""
    hist = hist.astype(np.float64)
    levels = np.arange(hist.size, dtype=np.float64)
    w_low = np.cumsum(hist)
    w_high = w_low[-1] - w_low
    s_low = np.cumsum(hist * levels)
    valid = (w_low > 0) & (w_high > 0)
    if not valid.any():
        return None
    m_low = np.divide(s_low, w_low, out=np.zeros_like(s_low), where=w_low > 0)
    m_high = np.divide(s_low[-1] - s_low, w_high, out=np.zeros_like(s_low), where=w_high > 0)
    between = np.where(valid, w_low * w_high * (m_low - m_high) ** 2, -1.0)
    best = np.flatnonzero(between == between.max())
    return int(best[len(best) // 2])  # middle of a flat maximum = the valley between two modes


def _perimeter(contour: np.ndarray) -> float:
    """Perimeter of a closed 8-connected pixel outline (N x 1 x 2 int32, as from
    cv2.findContours with CHAIN_APPROX_NONE).

    Vossepoel & Smeulders (1982) weights: 0.980 per axial step, 1.406 per diagonal step, and
    -0.091 per corner. Plain chain length (1 and sqrt 2) overestimates a digital circle's
    perimeter by ~6-8 %, which would cap a disk's circularity near 0.87.
    """
    pts = contour.reshape(-1, 2)
    if len(pts) < 2:
        return 0.0
    steps = np.diff(pts, axis=0, append=pts[:1])
    n_odd = int(np.count_nonzero(steps[:, 0] * steps[:, 1]))  # diagonal: both coordinates move
    n_even = len(steps) - n_odd
    # A corner = a change of chain direction between consecutive steps.
    direction = steps[:, 0] * 3 + steps[:, 1]
    corners = int(np.count_nonzero(direction != np.roll(direction, 1)))
    return max(0.980 * n_even + 1.406 * n_odd - 0.091 * corners, 0.0)


def _ellipse_axes(mu20: float, mu02: float, mu11: float, m00: float) -> tuple[float, float, float]:
    """(major axis, minor axis, eccentricity) of the ellipse with the same second moments."""
    if m00 <= 0:
        return 0.0, 0.0, 0.0
    a, c, b = mu20 / m00, mu02 / m00, mu11 / m00
    root = np.sqrt(max(((a - c) / 2.0) ** 2 + b * b, 0.0))
    lam1 = max((a + c) / 2.0 + root, 0.0)
    lam2 = max((a + c) / 2.0 - root, 0.0)
    ecc = float(np.sqrt(max(1.0 - lam2 / lam1, 0.0))) if lam1 > 0 else 0.0
    return 4.0 * np.sqrt(lam1), 4.0 * np.sqrt(lam2), ecc


def _ferets(hull: np.ndarray) -> tuple[float, float]:
    """(max, min) Feret (caliper) diameters of a convex polygon (M x 2 float).

    The maximum is the largest vertex-to-vertex distance; the minimum is found by rotating
    calipers: the smallest, over hull edges, of the farthest vertex from that edge's line.
    Exact for the polygon and O(M^2) with M the hull's vertex count (tens), i.e. microseconds.
    """
    m = len(hull)
    if m < 2:
        return 0.0, 0.0
    x, y = hull[:, 0], hull[:, 1]
    dx = x[:, None] - x[None, :]
    dy = y[:, None] - y[None, :]
    fmax = float(np.sqrt((dx * dx + dy * dy).max()))
    if m < 3:
        return fmax, 0.0
    ex, ey = np.roll(x, -1) - x, np.roll(y, -1) - y
    lengths = np.hypot(ex, ey)
    keep = lengths > 0
    if not keep.any():
        return fmax, 0.0
    # |edge_i x (p_j - p_i)| / |edge_i| = distance of vertex j from edge i's line.
    cross = np.abs(ex[keep, None] * dy[keep] - ey[keep, None] * dx[keep])
    return fmax, float((cross.max(axis=1) / lengths[keep]).min())


def _fourier_descriptors(contour: np.ndarray) -> np.ndarray:
    """|F_k| / |F_1| of the outline for k in _FD_ORDERS: invariant to translation (F_0 dropped),
    rotation and start point (magnitudes only) and scale (divided by |F_1|)."""
    out = np.zeros(len(_FD_ORDERS), np.float64)
    pts = contour.reshape(-1, 2).astype(np.float64)
    if len(pts) < 3:
        return out
    closed = np.vstack([pts, pts[:1]])
    seg = np.hypot(*np.diff(closed, axis=0).T)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] <= 0:
        return out
    # Equal arc-length resampling, so the descriptors do not depend on how many pixels (or
    # which chain steps) the outline happens to have.
    t = np.linspace(0.0, s[-1], _FD_SAMPLES, endpoint=False)
    z = np.interp(t, s, closed[:, 0]) + 1j * np.interp(t, s, closed[:, 1])
    spectrum = np.fft.fft(z) / _FD_SAMPLES
    if abs(spectrum[-1]) > abs(spectrum[1]):
        # Traversed the other way round: mirror the spectrum so F_1 is always the dominant one.
        spectrum = np.concatenate([spectrum[:1], spectrum[1:][::-1]])
    f1 = abs(spectrum[1])
    if f1 <= 0:
        return out
    return np.array([abs(spectrum[k]) for k in _FD_ORDERS]) / f1


def _log_hu(moments: dict) -> np.ndarray:
    """Hu's seven moment invariants as -log10|h|, with |h| floored at 1e-15.

    The raw invariants span ~20 orders of magnitude, which no scaler tames. The sign is
    dropped: it only separates a shape from its mirror image (same cell), and for nearly
    symmetric cells h5..h7 are ~0 with a sign that is digitisation noise. The floor keeps
    those noise values from scattering over -log10 ~ 15..25.
    """
    hu = np.abs(cv2.HuMoments(moments).ravel())
    return -np.log10(np.maximum(hu, 1e-15))


def _largest_contour(mask_u8: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """The outer outline enclosing the most pixels, and every outer outline's pixel count
    (polygon area + half its rim, Pick's theorem: ~ the pixels it encloses, >0 for a single
    pixel or a line, where the polygon area alone is 0)."""
    contours, _ = cv2.findContours(mask_u8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None, np.zeros(0)
    sizes = np.array([cv2.contourArea(c) + 0.5 * len(c) + 1.0 for c in contours])
    return contours[int(np.argmax(sizes))], sizes


def _outline_shape(contour: np.ndarray) -> tuple[float, float, float, float, np.ndarray]:
    """(perimeter, circularity, solidity, convexity, convex hull) of one outline. Circularity
    uses the outline's own polygon area (through the pixel centres) so that it is ~1 for a
    disk; the hull (M x 1 x 2 int32) is returned for the Feret diameters."""
    perim = _perimeter(contour)
    poly_area = cv2.contourArea(contour)
    hull = cv2.convexHull(contour)
    hull_area = cv2.contourArea(hull)
    circ = 4.0 * np.pi * poly_area / (perim * perim) if perim > 0 else 0.0
    solidity = poly_area / hull_area if hull_area > 0 else 0.0
    convexity = _perimeter_polygon(hull) / perim if perim > 0 else 0.0
    return perim, circ, solidity, convexity, hull


def _perimeter_polygon(polygon: np.ndarray) -> float:
    return float(cv2.arcLength(polygon, True)) if len(polygon) >= 2 else 0.0


# --- families -----------------------------------------------------------------------------
def _morphology(mask_u8: np.ndarray, area: int, nucleus_u8: np.ndarray, n_nucleus: int) -> np.ndarray:
    out = np.zeros(len(_MORPHOLOGY), np.float64)
    contour, _ = _largest_contour(mask_u8)
    if contour is None:
        return out
    # Moments of the outline polygon (Green's theorem over its points): the same ellipse and
    # Hu invariants as the pixel moments to within the half-pixel rim, at a small fraction
    # of the cost of cv2.moments over the mask (it scans every pixel of the crop).
    m = cv2.moments(contour)
    major, minor, ecc = _ellipse_axes(m["mu20"], m["mu02"], m["mu11"], m["m00"])
    perim, circ, solidity, convexity, hull = _outline_shape(contour)
    fmax, fmin = _ferets(hull.reshape(-1, 2).astype(np.float64))
    # +1: Feret diameters are measured between pixel centres; the cell extends half a pixel
    # beyond them on each side (and a 1-pixel cell is 1 pixel wide, not 0).
    fmax, fmin = fmax + 1.0, fmin + 1.0
    (_, _), (rw, rh), _ = cv2.minAreaRect(contour)
    rect_area = (rw + 1.0) * (rh + 1.0)
    out[:13] = (
        area,
        perim,
        circ,
        ecc,
        major,
        minor,
        solidity,
        convexity,
        np.sqrt(4.0 * area / np.pi),
        fmax,
        fmin,
        fmax / fmin,
        area / rect_area,
    )
    i = 13
    if n_nucleus > 0:
        ncontour, nsizes = _largest_contour(nucleus_u8)
        nm = cv2.moments(ncontour)
        _, _, necc = _ellipse_axes(nm["mu20"], nm["mu02"], nm["mu11"], nm["m00"])
        _, ncirc, nsol, _, _ = _outline_shape(ncontour)
        # Fragments under 2 % of the cell are stain speckle, not nuclear lobes.
        parts = int(np.count_nonzero(nsizes >= 0.02 * area))
        # How far the nucleus sits from the cell's centre, in cell radii (eccentric nuclei
        # with a cytoplasm crescent vs central ones).
        radius = np.sqrt(area / np.pi)
        if nm["m00"] > 0 and m["m00"] > 0:
            dx = nm["m10"] / nm["m00"] - m["m10"] / m["m00"]
            dy = nm["m01"] / nm["m00"] - m["m01"] / m["m00"]
            offset = np.hypot(dx, dy) / radius
        else:
            offset = 0.0
        out[i : i + 7] = (n_nucleus, n_nucleus / area, ncirc, nsol, necc, parts, offset)
    i += 7
    out[i : i + 7] = _log_hu(m)
    i += 7
    out[i : i + len(_FD_ORDERS)] = _fourier_descriptors(contour)
    return out


# Optical density -log((I+1)/256) per 8-bit intensity I (decreasing in I).
_OD_LUT = -np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)
_LEVELS = np.arange(256, dtype=np.float64)


def _hist_stats(hists: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(mean, std, p10, p50, p90) per row of distributions given as counts (C x K) over
    increasing `values` (C x K); rows with no counts give zeros. Returns C x 5."""
    n = hists.sum(axis=1)
    safe = np.where(n > 0, n, 1.0)
    mean = (hists * values).sum(axis=1) / safe
    var = np.maximum((hists * values * values).sum(axis=1) / safe - mean * mean, 0.0)
    cum = np.cumsum(hists, axis=1)
    # Percentile p = the first value whose cumulative count reaches p * n.
    idx = np.stack([(cum < q * n[:, None]).sum(axis=1) for q in (0.1, 0.5, 0.9)], axis=1)
    idx = np.minimum(idx, values.shape[1] - 1)
    pct = np.take_along_axis(values, idx, axis=1)
    out = np.column_stack([mean, np.sqrt(var), pct])
    out[n <= 0] = 0.0
    return out


_OD_LUT3 = np.repeat(_OD_LUT.astype(np.float32)[:, None], 3, axis=1).reshape(1, 256, 3)


def _colour(image: np.ndarray, mask_u8: np.ndarray, nucleus_u8: np.ndarray) -> np.ndarray:
    out = np.zeros(len(_COLOUR), np.float64)
    # Every second row and column: a quarter of the pixels (still ~5-10k per cell) gives the
    # same means and percentiles to well under one gray level, at a quarter of the cost of the
    # colour conversions and histograms, which dominated this family's time. (INTER_NEAREST
    # resize = exact [::2, ::2] sampling, several times faster than a numpy strided copy.)
    h, w = mask_u8.shape
    size = ((w + 1) // 2, (h + 1) // 2)
    sub, cell, nuc = (cv2.resize(x, size, interpolation=cv2.INTER_NEAREST) for x in (image, mask_u8, nucleus_u8))
    if not cv2.countNonZero(cell):  # a cell of a pixel or two can fall between the samples
        sub, cell, nuc = image, mask_u8, nucleus_u8
    cyto = cell - nuc  # nucleus is inside the cell: 1 - 1 or 1 - 0
    # Whole-crop conversions: indexing the cell's pixels out first (image[mask]) costs more
    # than converting the black background along with them.
    spaces = (sub, cv2.cvtColor(sub, cv2.COLOR_RGB2HSV), cv2.cvtColor(sub, cv2.COLOR_RGB2Lab))
    hists = np.empty((12, 256), np.float64)
    for k, space in enumerate(spaces):
        for c in range(3):
            hists[3 * k + c] = cv2.calcHist([space], [c], cell, [256], [0, 256]).ravel()
    # OD is a decreasing function of intensity: reverse the RGB histograms so that OD values
    # increase with the bin index and the percentile lookup stays a cumulative count.
    hists[9:] = hists[:3, ::-1]
    values = np.concatenate([np.broadcast_to(_LEVELS, (9, 256)), np.broadcast_to(_OD_LUT[::-1], (3, 256))])
    out[: 12 * 5] = _hist_stats(hists, values).ravel()
    # Nucleus and cytoplasm means: cv2.mean gives a region's 3 channel means in one pass; OD
    # via a per-pixel lookup first (the mean of OD, not the OD of the mean intensity).
    od = cv2.LUT(sub, _OD_LUT3)
    i = 12 * 5
    for region in (nuc, cyto):
        if cv2.countNonZero(region):
            out[i : i + 12] = [v for space in (*spaces, od) for v in cv2.mean(space, mask=region)[:3]]
        i += 12
    return out


# Rotation-invariant uniform LBP (riu2, Ojala et al. 2002): an 8-bit code with at most two
# 0/1 transitions around the circle maps to its number of ones (0..8); every other code to 9.
def _riu2_table() -> np.ndarray:
    table = np.empty(256, np.uint8)
    for code in range(256):
        bits = [(code >> k) & 1 for k in range(8)]
        transitions = sum(bits[k] != bits[(k + 1) % 8] for k in range(8))
        table[code] = sum(bits) if transitions <= 2 else 9
    return table


_RIU2 = _riu2_table()
# Neighbour offsets (dy, dx) in circular order; the 3x3 square neighbourhood (classic LBP,
# no interpolation at the diagonals: cheaper, and as discriminative at R=1).
_LBP_OFFSETS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))
_SQUARE3 = np.ones((3, 3), np.uint8)


def _lbp_hist(gray: np.ndarray, mask_u8: np.ndarray, inner: np.ndarray | None = None) -> np.ndarray:
    """Normalised riu2 LBP histogram (10 bins, P=8, R=1) of an HxW uint8 image over the pixels
    whose 3x3 neighbourhood lies in the mask (HxW uint8 0/1), so the black background never
    enters a code. `inner` = the mask eroded by 3x3, when the caller has it already. Built
    from OpenCV's compare/bitwise ops: a few times faster than the same numpy expressions."""
    h, w = gray.shape
    if h < 3 or w < 3:
        return np.zeros(_LBP_BINS)
    centre = gray[1:-1, 1:-1]
    code = np.zeros(centre.shape, np.uint8)
    for bit, (dy, dx) in enumerate(_LBP_OFFSETS):
        ge = cv2.compare(gray[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx], centre, cv2.CMP_GE)  # 255 / 0
        cv2.bitwise_or(code, cv2.bitwise_and(ge, 1 << bit), dst=code)
    if inner is None:
        inner = cv2.erode(mask_u8, _SQUARE3, borderValue=0)
    inner = np.ascontiguousarray(inner[1:-1, 1:-1])
    riu2 = cv2.LUT(code, _RIU2)
    hist = cv2.calcHist([riu2], [0], inner, [_LBP_BINS], [0, _LBP_BINS]).ravel().astype(np.float64)
    total = hist.sum()
    return hist / total if total > 0 else hist


_GLCM_LEVELS = 16
_GLEVELS = np.arange(_GLCM_LEVELS, dtype=np.float64)
_GI, _GJ = np.meshgrid(_GLEVELS, _GLEVELS, indexing="ij")
_GLCM_WEIGHTS = np.stack(
    [(_GI - _GJ) ** 2, np.abs(_GI - _GJ), 1.0 / (1.0 + (_GI - _GJ) ** 2), _GI * _GJ], axis=-1
).reshape(-1, 4)  # contrast, dissimilarity, homogeneity, E[i j]


def _glcm_features(q: np.ndarray) -> np.ndarray:
    """GLCM properties per distance and Haralick statistics (distance 1) of a quantised image
    `q` (HxW uint8, 0 = outside the cell, 1..L inside).

    The four angles (0, 45, 90, 135 degrees) are pooled into one symmetric co-occurrence
    matrix per distance before the properties are taken (rotation-robust, and one matrix
    instead of four to summarise)."""
    L = _GLCM_LEVELS
    n_props = len(_GLCM_PROPS)
    out = np.zeros(n_props * len(_GLCM_DISTANCES) + len(_HARALICK))
    h, w = q.shape
    mats = np.zeros((len(_GLCM_DISTANCES), L, L))
    for di, d in enumerate(_GLCM_DISTANCES):
        glcm = np.zeros((L + 1, L + 1), np.float32)
        for dy, dx in ((0, d), (-d, d), (-d, 0), (-d, -d)):
            y0, y1 = max(0, -dy), h - max(0, dy)
            x0, x1 = max(0, -dx), w - max(0, dx)
            if y1 <= y0 or x1 <= x0:
                continue
            a = np.ascontiguousarray(q[y0:y1, x0:x1])
            b = np.ascontiguousarray(q[y0 + dy : y1 + dy, x0 + dx : x1 + dx])
            # Joint histogram of (pixel, neighbour) levels = the co-occurrence matrix, in one
            # OpenCV call (~10x numpy's bincount of pair codes); accumulate=True sums angles.
            # Pairs with an end outside the cell land in row/column 0, dropped below.
            glcm = cv2.calcHist([a, b], [0, 1], None, [L + 1, L + 1], [0, L + 1, 0, L + 1], hist=glcm, accumulate=True)
        glcm = glcm[1:, 1:].astype(np.float64)
        glcm += glcm.T  # symmetric: direction-free pairs
        total = glcm.sum()
        if total > 0:
            mats[di] = glcm / total
    flat = mats.reshape(len(mats), -1)
    filled = flat.sum(axis=1) > 0
    # Every property is a dot product of the flattened matrix with a fixed weight table, and
    # the matrices are symmetric (row and column marginals equal): a handful of mat-vec
    # products instead of ~30 broadcast array operations.
    contrast, dissimilarity, homogeneity, e_ij = (flat @ _GLCM_WEIGHTS).T
    energy = np.sqrt((flat * flat).sum(axis=1))
    px = mats.sum(axis=2)
    mu = px @ _GLEVELS
    var = px @ (_GLEVELS * _GLEVELS) - mu * mu
    # A constant region has no defined correlation; skimage reports 1 there, we report 0
    # (the cell's texture is simply absent).
    corr = np.divide(e_ij - mu * mu, var, out=np.zeros_like(var), where=var > 1e-12)
    props = np.stack([contrast, dissimilarity, homogeneity, energy, corr], axis=1) * filled[:, None]
    out[: n_props * len(_GLCM_DISTANCES)] = props.ravel()
    if filled[0]:
        out[n_props * len(_GLCM_DISTANCES) :] = _haralick(mats[0], _GI, _GJ)
    return out


def _entropy(p: np.ndarray) -> float:
    nz = p[p > 0]
    return float(-(nz * np.log2(nz)).sum())


def _haralick(p: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Haralick et al. (1973) statistics of a normalised symmetric GLCM beyond the props above."""
    L = p.shape[0]
    entropy = _entropy(p)
    mu = float((p * i).sum())
    variance = float((p * (i - mu) ** 2).sum())
    flat = p.ravel()
    p_sum = np.bincount((i + j).astype(np.int64).ravel(), weights=flat, minlength=2 * L - 1)
    p_diff = np.bincount(np.abs(i - j).astype(np.int64).ravel(), weights=flat, minlength=L)
    ks = np.arange(p_sum.size, dtype=np.float64)
    kd = np.arange(p_diff.size, dtype=np.float64)
    sum_avg = float(ks @ p_sum)
    sum_var = float(((ks - sum_avg) ** 2) @ p_sum)
    diff_mean = float(kd @ p_diff)
    diff_var = float(((kd - diff_mean) ** 2) @ p_diff)
    # Information measures of correlation (Haralick's f12, f13).
    px = p.sum(axis=1)
    hx = _entropy(px)
    outer = np.outer(px, px)
    nz = p > 0
    hxy1 = float(-(p[nz] * np.log2(outer[nz])).sum())
    onz = outer > 0
    hxy2 = float(-(outer[onz] * np.log2(outer[onz])).sum())
    imc1 = (entropy - hxy1) / hx if hx > 0 else 0.0
    imc2 = float(np.sqrt(max(1.0 - np.exp(-2.0 * (hxy2 - entropy)), 0.0)))
    return np.array(
        [
            entropy,
            variance,
            sum_avg,
            sum_var,
            _entropy(p_sum),
            diff_var,
            _entropy(p_diff),
            imc1,
            imc2,
            float(p.max()),
        ]
    )


def _texture(gray: np.ndarray, mask_u8: np.ndarray) -> np.ndarray:
    out = np.zeros(len(_TEXTURE), np.float64)
    n_glcm = len(_GLCM_PROPS) * len(_GLCM_DISTANCES) + len(_HARALICK)
    i_lbp1, i_lbp2, i_grad = n_glcm, n_glcm + _LBP_BINS, n_glcm + 2 * _LBP_BINS
    g = gray.astype(np.float32)
    # Gradient energy at full resolution over the eroded cell, so the cell/black edge (the
    # largest gradient in the crop) is excluded.
    inner = cv2.erode(mask_u8, _SQUARE3, borderValue=0)
    if cv2.countNonZero(inner):
        mag = cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3))
        mean, sd = cv2.meanStdDev(mag, mask=inner)
        lap = cv2.mean(np.abs(cv2.Laplacian(g, cv2.CV_32F, ksize=1)), mask=inner)[0]
        out[i_grad : i_grad + 3] = (mean[0, 0], sd[0, 0], lap)
    out[i_lbp1:i_lbp2] = _lbp_hist(gray, mask_u8, inner)

    # Two levels of the orthonormal 2-D Haar wavelet. Per 2x2 block its three detail
    # coefficients carry sum(x^2) - (sum x)^2 / 4 = 4 (mean(x^2) - mean(x)^2) of energy, so the
    # detail energy comes from two 2x2 box means (cv2.resize INTER_AREA, exact for factor 2)
    # without forming the bands. Summed over the three orientations on purpose: cells lie at
    # random angles, so horizontal vs vertical detail means nothing. The LL band (the cell at
    # half resolution) is where the GLCM and the second LBP are computed: 4x fewer pixels, and
    # GLCM distances 1, 2, 4 there span 2, 4, 8 original pixels, the scale of chromatin
    # clumps in these 150-250 px wide cells.
    haar = np.zeros(6)
    img, msk = g, mask_u8.astype(np.float32)
    ll, ll_mask = None, None
    for level in range(2):
        h2, w2 = img.shape[0] // 2, img.shape[1] // 2
        if h2 == 0 or w2 == 0:
            break
        img, sq, msk = (
            cv2.resize(x[: 2 * h2, : 2 * w2], (w2, h2), interpolation=cv2.INTER_AREA) for x in (img, img * img, msk)
        )
        # Blocks wholly inside the cell only: a block straddling the edge is all "detail".
        inside = (msk > 0.999).view(np.uint8)
        msk = inside.astype(np.float32)
        if level == 0:
            ll, ll_mask = img, np.ascontiguousarray(inside)
        n = cv2.countNonZero(inside)
        if n:
            # A block's detail energy 4 (mean(x^2) - mean(x)^2), per original pixel.
            detail = cv2.mean(sq - img * img, mask=inside)[0]
            _, sd = cv2.meanStdDev(img, mask=inside)
            approx = float(sd[0, 0]) ** 2
            share = detail / (detail + approx) if detail + approx > 0 else 0.0
            haar[3 * level : 3 * level + 3] = (detail, approx, share)
    out[-6:] = haar

    if ll is not None and ll_mask.any():
        inside = ll[ll_mask > 0]
        # Quantise relative to the cell's own gray distribution (mean +- 2.5 sd into 16 levels):
        # the GLCM then describes the pattern of the chromatin, not its brightness, which the
        # colour family already measures.
        mean, sd = float(inside.mean()), float(inside.std())
        lo, span = mean - 2.5 * sd, max(5.0 * sd, 1e-6)
        q = (np.clip((ll - lo) * (_GLCM_LEVELS / span), 0, _GLCM_LEVELS - 1).astype(np.uint8) + 1) * ll_mask
        out[:n_glcm] = _glcm_features(q)
        # LBP at half resolution ~ radius 2 at full resolution.
        out[i_lbp2:i_grad] = _lbp_hist(np.clip(ll + 0.5, 0, 255).astype(np.uint8), ll_mask)
    return out


# --- entry point --------------------------------------------------------------------------
def cell_features(image: np.ndarray, mask: np.ndarray, families: Sequence[str] | str = FAMILIES) -> np.ndarray:
    """Hand-crafted features of one cell.

    Args:
        image: HxWx3 uint8 RGB, the cell's bounding-box crop at ORIGINAL resolution (do not
            resize: areas and lengths are absolute pixel measures).
        mask: HxW, the cell's foreground (the largest connected component of the Otsu
            foreground); bool, or any dtype where nonzero = cell. Any size is accepted,
            including empty or a few pixels.
        families: subset of FAMILIES; the vector is laid out morphology, colour, texture
            (see feature_names).

    Returns:
        float32 vector of length feature_dim(families), always finite. Features that are
        undefined for the given cell (an empty mask, a cell without a darker nucleus) are 0.

    Raises:
        ValueError: wrong image shape/dtype, a mask of another size, or an unknown family.
    """
    fams = _check_families(families)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8 RGB, got {image.shape} {image.dtype}")
    mask = np.asarray(mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image {image.shape[:2]}")
    # 0/1 uint8, contiguous: the form every OpenCV call below takes as a mask.
    mask_u8 = (
        np.ascontiguousarray(mask != 0, dtype=np.uint8)
        if mask.dtype != bool
        else np.ascontiguousarray(mask).view(np.uint8)
    )
    dims = {f: len(_NAMES[f]) for f in fams}
    area = cv2.countNonZero(mask_u8)
    if area == 0:
        return np.zeros(sum(dims.values()), np.float32)
    image = np.ascontiguousarray(image)

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    nucleus_u8 = _nucleus(gray, mask_u8) if "morphology" in fams or "colour" in fams else np.zeros_like(mask_u8)
    n_nucleus = cv2.countNonZero(nucleus_u8)

    parts = []
    for fam in fams:
        if fam == "morphology":
            parts.append(_morphology(mask_u8, area, nucleus_u8, n_nucleus))
        elif fam == "colour":
            parts.append(_colour(image, mask_u8, nucleus_u8))
        else:
            parts.append(_texture(gray, mask_u8))
    vec = np.concatenate(parts)
    # Guard the contract, whatever a degenerate cell did to a ratio: finite float32.
    vec = np.nan_to_num(vec, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(vec, -1e30, 1e30).astype(np.float32)


def _nucleus(gray: np.ndarray, mask_u8: np.ndarray) -> np.ndarray:
    """The nucleus = the darker (purple, chromatin-dense) part of the cell, 0/1 uint8: Otsu on
    the cell's own gray levels. A cell with a single gray level has no nucleus/cytoplasm
    split: empty."""
    # Thresholded on a 5x5 Gaussian-smoothed gray: raw pixels speckle the nucleus into
    # dozens of fragments (wrong part count, ragged outline, and slow to trace).
    # The background is first set to the cell's mean, or the blur would darken the rim
    # with black and call it nucleus.
    level = round(cv2.mean(gray, mask=mask_u8)[0])
    smooth = cv2.GaussianBlur(np.where(mask_u8 > 0, gray, np.uint8(level)), (5, 5), 0)
    t = _otsu_from_hist(cv2.calcHist([smooth], [0], mask_u8, [256], [0, 256]).ravel())
    if t is None:
        return np.zeros_like(mask_u8)
    return mask_u8 & (smooth <= t).view(np.uint8)


def family_columns(measured: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
    """Column indices, in a vector of `measured` families, of the `wanted` ones (each a
    contiguous block, in FAMILIES order)."""
    measured, wanted = _check_families(measured), _check_families(wanted)
    missing = sorted(set(wanted) - set(measured))
    if missing:
        raise ValueError(f"families {missing} were not measured (measured: {list(measured)})")
    blocks, start = [], 0
    for family in measured:
        width = feature_dim((family,))
        if family in wanted:
            blocks.append(np.arange(start, start + width))
        start += width
    return np.concatenate(blocks) if blocks else np.zeros(0, np.int64)
