"""Stain (colour) normalisation of stained blood-cell images, as pure numpy/cv2 functions.

Two labs' May-Grunwald-Giemsa smears differ in dye batch, staining time, microscope and
camera, so a classifier trained on one lab's cells sees another's as a colour shift. Both
methods map an image's colours toward a *target* fitted once on reference images (the
training data), and the target travels with the model (`preprocess.stain_target`):

- **Reinhard** (Reinhard, Ashikhmin, Gooch & Shirley, "Color transfer between images",
  IEEE CG&A 21(5), 2001): match the per-channel mean and standard deviation in a decorrelated
  colour space. We use CIE L*a*b* (OpenCV's float conversion: L 0-100, a/b about -128-127),
  as most histology implementations do. Target: 6 numbers (3 means, 3 standard deviations).
- **Macenko** (Macenko et al., "A method for normalizing histology slides for quantitative
  analysis", ISBI 2009): in optical density OD = -ln((I + 1) / 256), the two stains span a
  plane; the extreme angles (1st/99th percentiles) of the OD pixels projected onto it are the
  stain vectors, each pixel's concentrations come from least squares, and the image is
  rebuilt with the target's stain vectors and concentration maxima. Target: 8 numbers (the
  3x2 stain matrix column by column, then the two 99th-percentile concentrations). With
  Giemsa the first stain (the one absorbing red most) is the basic dye of nuclei (azure /
  methylene blue), the second eosin.

Robust to background: statistics are taken over *stained* pixels only (`stained_mask`):
not the black padding around a C-NMC crop (gray <= 8) and not bright plasma / glass (mean
OD below `BACKGROUND_OD`). Pixels outside the mask are left exactly as they are, so a cell
on black stays on black (Otsu cropping downstream still finds it) and an image that is
nearly all background is still normalised from the few stained pixels it has.

May import: numpy, cv2. Nothing from leukray.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import cv2
import numpy as np

METHODS = ("none", "reinhard", "macenko")
TARGET_SIZES = {"reinhard": 6, "macenko": 8}
BLACK_LEVEL = 8  # gray <= this is padding (C-NMC crops sit on pure black)
BACKGROUND_OD = 0.15  # Macenko's beta: mean OD below this is unstained background
MIN_STAINED_PX = 50  # fewer stained pixels than this: too little to estimate anything
MACENKO_ALPHA = 1.0  # percentile of the extreme angles (Macenko 2009)


class StainError(ValueError):
    """An image has too few stained pixels, or a target is malformed."""


def _check_rgb(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise StainError(f"expected HxWx3 uint8 RGB, got {getattr(image, 'shape', None)} {getattr(image, 'dtype', '')}")


def optical_density(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> HxWx3 float32 OD = -ln((I + 1) / 256) (Beer-Lambert; 0 on white)."""
    return -np.log((image.astype(np.float32) + 1.0) / 256.0)


def stained_mask(image: np.ndarray) -> np.ndarray:
    """HxW bool: pixels that are neither black padding (gray <= 8) nor unstained background
    (mean optical density < 0.15, Macenko's beta)."""
    _check_rgb(image)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return (gray > BLACK_LEVEL) & (optical_density(image).mean(axis=2) >= BACKGROUND_OD)


def _stained_pixels(images: Iterable[np.ndarray], masks: Iterable[np.ndarray | None] | None) -> np.ndarray:
    """N x 3 uint8 RGB stained pixels of all images together (within their masks)."""
    images = list(images)
    masks = list(masks) if masks is not None else [None] * len(images)
    parts = []
    for image, mask in zip(images, masks, strict=True):
        keep = stained_mask(image) if mask is None else (stained_mask(image) & mask.astype(bool))
        parts.append(image[keep])
    pixels = np.concatenate(parts) if parts else np.zeros((0, 3), np.uint8)
    if len(pixels) < MIN_STAINED_PX:
        raise StainError(f"only {len(pixels)} stained pixels (need >= {MIN_STAINED_PX}) to estimate the stain")
    return pixels


def _lab(pixels: np.ndarray) -> np.ndarray:
    """N x 3 uint8 RGB -> N x 3 float32 CIE L*a*b*."""
    rgb = (pixels.astype(np.float32) / 255.0).reshape(-1, 1, 3)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3)


def _rgb_from_lab(lab: np.ndarray) -> np.ndarray:
    rgb = cv2.cvtColor(lab.astype(np.float32).reshape(-1, 1, 3), cv2.COLOR_LAB2RGB).reshape(-1, 3)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def reinhard_stats(images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """Reinhard (2001) statistics of the stained pixels of `images` pooled: float64 (6,) =
    L*, a*, b* means then standard deviations (a target, or an image's own source)."""
    lab = _lab(_stained_pixels(images, masks)).astype(np.float64)
    return np.concatenate([lab.mean(axis=0), np.maximum(lab.std(axis=0), 1e-3)])


def reinhard_normalise(image: np.ndarray, target: np.ndarray, source: np.ndarray | None = None) -> np.ndarray:
    """Map the stained pixels of `image` so their L*a*b* means and standard deviations become
    `target`'s (Reinhard et al. 2001); other pixels are returned unchanged.

    Args:
        image: HxWx3 uint8 RGB.
        target: (6,) `reinhard_stats` of the reference.
        source: (6,) statistics to map from; None = the image's own stained pixels.

    Returns:
        HxWx3 uint8 RGB.
    """
    _check_rgb(image)
    target = np.asarray(target, np.float64)
    source = reinhard_stats([image]) if source is None else np.asarray(source, np.float64)
    keep = stained_mask(image)
    lab = _lab(image[keep]).astype(np.float64)
    mapped = (lab - source[:3]) / source[3:] * target[3:] + target[:3]
    out = image.copy()
    out[keep] = _rgb_from_lab(mapped)
    return out


def macenko_stains(images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """Macenko (2009) stain estimate of the stained pixels of `images` pooled: float64 (8,) =
    the 3x2 OD stain matrix (unit columns; the first absorbs red most: nuclei) flattened
    column by column, then each stain's 99th-percentile concentration."""
    od = optical_density(_stained_pixels(images, masks).reshape(-1, 1, 3)).reshape(-1, 3).astype(np.float64)
    _, eigvecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = eigvecs[:, 1:3]  # the two largest eigenvalues (eigh sorts ascending)
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive OD
    projected = od @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [MACENKO_ALPHA, 100.0 - MACENKO_ALPHA])
    vectors = [plane @ np.array([np.cos(a), np.sin(a)]) for a in (low, high)]
    vectors = [v / np.linalg.norm(v) for v in vectors]
    if vectors[0][0] < vectors[1][0]:  # the basic (nuclear) dye absorbs red most
        vectors.reverse()
    stains = np.stack(vectors, axis=1)
    concentrations = _concentrations(od, stains)
    maxima = np.maximum(np.percentile(concentrations, 99, axis=0), 1e-6)
    return np.concatenate([stains.ravel(order="F"), maxima])


def _concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """N x 2 least-squares stain concentrations of N x 3 OD pixels."""
    return np.linalg.lstsq(stains, od.T, rcond=None)[0].T


def macenko_normalise(image: np.ndarray, target: np.ndarray, source: np.ndarray | None = None) -> np.ndarray:
    """Rebuild the non-black pixels of `image` with the target's stain vectors and
    concentration scale (Macenko et al. 2009); black padding is returned unchanged.

    Args:
        image: HxWx3 uint8 RGB.
        target: (8,) `macenko_stains` of the reference.
        source: (8,) stains to unmix with; None = estimated from the image itself.

    Returns:
        HxWx3 uint8 RGB.
    """
    _check_rgb(image)
    target = np.asarray(target, np.float64)
    source = macenko_stains([image]) if source is None else np.asarray(source, np.float64)
    keep = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) > BLACK_LEVEL
    od = optical_density(image[keep].reshape(-1, 1, 3)).reshape(-1, 3).astype(np.float64)
    concentrations = _concentrations(od, source[:6].reshape(3, 2, order="F"))
    concentrations *= target[6:] / source[6:]
    rebuilt = 256.0 * np.exp(-concentrations @ target[:6].reshape(3, 2, order="F").T) - 1.0
    out = image.copy()
    out[keep] = np.clip(np.rint(rebuilt), 0, 255).astype(np.uint8)
    return out


def fit_target(
    method: str, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None
) -> np.ndarray:
    """The `method`'s target (reinhard: 6 numbers, macenko: 8) from reference images.

    Raises:
        StainError: an unknown method, or too few stained pixels.
    """
    if method == "reinhard":
        return reinhard_stats(images, masks)
    if method == "macenko":
        return macenko_stains(images, masks)
    raise StainError(f"unknown stain normalisation {method!r} (one of {', '.join(METHODS[1:])})")


def normalise(image: np.ndarray, method: str, target: np.ndarray, source: np.ndarray | None = None) -> np.ndarray:
    """`image` normalised toward `target` by `method` (none returns it unchanged)."""
    if method == "none":
        return image
    if method == "reinhard":
        return reinhard_normalise(image, target, source)
    if method == "macenko":
        return macenko_normalise(image, target, source)
    raise StainError(f"unknown stain normalisation {method!r} (one of {', '.join(METHODS)})")


def format_target(target: np.ndarray) -> str:
    """A target as the comma-separated text of `preprocess.stain_target` (6 significant digits)."""
    return ",".join(f"{float(v):.6g}" for v in np.asarray(target).ravel())


def parse_target(method: str, text: str) -> np.ndarray:
    """`preprocess.stain_target` text -> float64 vector of the method's size.

    Raises:
        StainError: not numbers, or the wrong count for `method`.
    """
    try:
        values = np.asarray([float(v) for v in text.split(",")], np.float64)
    except ValueError:
        raise StainError(f"stain target {text!r} is not comma-separated numbers") from None
    want = TARGET_SIZES.get(method)
    if want is None or len(values) != want or not np.isfinite(values).all():
        raise StainError(f"a {method} stain target has {want} finite numbers, got {len(values)} in {text!r}")
    return values
