"""Decode and preprocess single-cell images (the paper's step 1) as pure numpy/cv2 functions.

Otsu threshold (Otsu 1979) -> binary threshold -> crop to the cell's bounding box -> resize.
Images are HWC uint8 RGB everywhere outside torch. Nothing here imports Ray: the batch
function `load_and_preprocess` is handed to `Dataset.map_batches` by
`leukray.distributed.actors.preprocess_batch`.

May import: numpy, cv2, `leukray.config`, `leukray.ops.augment`.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from leukray.ops.augment import augment_image, augmentation_rng
from leukray.config import AugmentConfig, PreprocessConfig

# Decoding and resizing run one image per Ray worker; cv2's own thread pool would only
# oversubscribe the CPUs that Ray already hands out one per worker.
cv2.setNumThreads(1)


class ImageError(ValueError):
    """An image that cannot be used; the message is the reason recorded in errors.csv."""


# What reading and decoding one image can raise that makes the image, not the run, fail.
READ_ERRORS = (ImageError, OSError, cv2.error)


def read_error_reason(exc: BaseException) -> str:
    """The one-line reason recorded in errors.csv for an exception in READ_ERRORS."""
    if isinstance(exc, ImageError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    return f"could not read: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def decode_image(data: bytes) -> np.ndarray:
    """Decode encoded image bytes (BMP, PNG, JPEG, TIFF, ...) to HxWx3 uint8 RGB.

    Grayscale is replicated to three channels, an alpha channel is composited onto black
    (the C-NMC background), and 16-bit or float images are scaled to 8 bits.

    Raises:
        ImageError: empty, truncated or undecodable data.
    """
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    buf = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"not a decodable image ({len(data)} bytes; truncated or not an image format)")
    return to_rgb_uint8(image, bgr=True)


def to_rgb_uint8(image: np.ndarray, bgr: bool = False) -> np.ndarray:
    """Convert gray / gray+alpha / RGB(A) of any integer or float depth to HxWx3 uint8 RGB."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ImageError(f"expected HxW, HxWx1, HxWx3 or HxWx4 pixels, got shape {image.shape}")
    image = _to_uint8(image)
    channels = image.shape[2]
    if channels in (2, 4):  # composite onto black: the C-NMC background
        alpha = image[:, :, -1:].astype(np.uint16)
        image = (image[:, :, :-1].astype(np.uint16) * alpha // 255).astype(np.uint8)
        channels -= 1
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, ::-1]) if bgr else image


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        top = float(np.nanmax(image)) if image.size else 1.0
        scale = 255.0 if top <= 1.0 else 255.0 / top
        return np.clip(np.nan_to_num(image) * scale, 0, 255).astype(np.uint8)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        shifted = image.astype(np.float64) - info.min
        return (shifted * (255.0 / (info.max - info.min))).astype(np.uint8)
    raise ImageError(f"unsupported pixel type {image.dtype}")


def otsu_threshold(gray: np.ndarray) -> int:
    """Otsu's threshold (Otsu 1979): the level t maximising the between-class variance of
    {gray <= t} and {gray > t} over the 256-bin histogram.

    Args:
        gray: HxW uint8.

    Returns:
        t in [0, 255]; foreground is `gray > t`. A constant image returns its value, so it
        has no foreground.
    """
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected HxW uint8, got {gray.shape} {gray.dtype}")
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(hist)  # pixels <= t
    weight_high = total - weight_low
    sum_low = np.cumsum(hist * levels)
    mean_low = np.divide(sum_low, weight_low, out=np.zeros(256), where=weight_low > 0)
    mean_high = np.divide(sum_low[-1] - sum_low, weight_high, out=np.zeros(256), where=weight_high > 0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    valid = (weight_low > 0) & (weight_high > 0)
    if not valid.any():
        return int(gray.flat[0]) if gray.size else 0
    between[~valid] = -1.0
    # Ties (a flat maximum between two separated modes): take the middle of the plateau,
    # which is where the valley between them lies.
    best = np.flatnonzero(between == between.max())
    return int(best[len(best) // 2])


def foreground_box(gray: np.ndarray, threshold: int, min_pixels: int) -> tuple[int, int, int, int] | None:
    """Bounding box (y0, y1, x0, x1), end-exclusive, of the largest connected component of
    the binary mask `gray > threshold`, or None when it has fewer than `min_pixels` pixels.

    The largest component, not every foreground pixel, so that dust or a neighbouring
    cell's edge does not stretch the crop.
    """
    mask = (gray > threshold).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    biggest = 1 + int(np.argmax(areas))
    if stats[biggest, cv2.CC_STAT_AREA] < min_pixels:
        return None
    x, y, w, h = (int(stats[biggest, k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    return y, y + h, x, x + w


def crop_to_foreground(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Otsu threshold -> binary mask -> crop the RGB image to the cell (plus a margin).

    Raises:
        ImageError: the image is too small or has no foreground (e.g. all black).
    """
    h, w = image.shape[:2]
    if min(h, w) < cfg.min_side:
        raise ImageError(f"image too small: {w}x{h} px (preprocess.min_side is {cfg.min_side})")
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    threshold = otsu_threshold(gray)
    box = foreground_box(gray, threshold, cfg.min_foreground_px)
    if box is None:
        raise ImageError(
            f"no foreground: nothing brighter than the Otsu threshold {threshold} "
            f"in a region of >= {cfg.min_foreground_px} px (blank or all-black image)"
        )
    y0, y1, x0, x1 = box
    m = cfg.margin
    return image[max(0, y0 - m) : min(h, y1 + m), max(0, x0 - m) : min(w, x1 + m)]


def resize_square(image: np.ndarray, size: int, keep_aspect: bool) -> np.ndarray:
    """Resize to size x size; with keep_aspect, pad to a centred black square first."""
    if keep_aspect:
        h, w = image.shape[:2]
        side = max(h, w)
        canvas = np.zeros((side, side, 3), dtype=np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top : top + h, left : left + w] = image
        image = canvas
    interpolation = cv2.INTER_AREA if image.shape[0] >= size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def preprocess_image(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """HxWx3 uint8 RGB -> size x size x 3 uint8 RGB crop of the cell."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageError(f"expected HxWx3 uint8, got {image.shape} {image.dtype}")
    return resize_square(crop_to_foreground(image, cfg), cfg.size, cfg.keep_aspect)


def load_and_preprocess(
    batch: dict[str, np.ndarray],
    cfg: PreprocessConfig,
    augment: AugmentConfig,
    seed: int,
    read_bytes: Callable[[str], bytes],
) -> dict[str, np.ndarray]:
    """Ray Data batch function: read, decode and preprocess each image, and emit the
    augmented copies that the manifest asks for.

    Args:
        batch: columns `path` (str) and `n_aug` (int, augmented copies to add; 0 outside
            the training split), plus any metadata columns, which are passed through.
        cfg: preprocessing parameters.
        augment: augmentation parameters (used only where n_aug > 0).
        seed: run seed; each copy's augmentation is seeded by (seed, path, copy index).
        read_bytes: path or URI -> file bytes.

    Returns:
        One row per original image and per augmented copy: the input columns, `image`
        (N x size x size x 3 uint8; zeros where it failed), `aug_index` (0 = original) and
        `error` ("" when the image is usable, else the reason).
    """
    paths = batch["path"]
    n_aug = batch["n_aug"] if "n_aug" in batch else np.zeros(len(paths), dtype=np.int64)
    blank = np.zeros((cfg.size, cfg.size, 3), dtype=np.uint8)
    images: list[np.ndarray] = []
    errors: list[str] = []
    aug_index: list[int] = []
    source_row: list[int] = []
    for row, path in enumerate(paths):
        path = str(path)
        try:
            crop = preprocess_image(decode_image(read_bytes(path)), cfg)
            error = ""
        except READ_ERRORS as exc:
            crop, error = blank, read_error_reason(exc)
        images.append(crop)
        errors.append(error)
        aug_index.append(0)
        source_row.append(row)
        if error:
            continue  # an unreadable image has no augmented copies; its error is recorded once
        for k in range(1, int(n_aug[row]) + 1):
            images.append(augment_image(crop, augmentation_rng(seed, path, k), augment))
            errors.append("")
            aug_index.append(k)
            source_row.append(row)
    take = np.asarray(source_row, dtype=np.int64)
    out = {name: np.asarray(column)[take] for name, column in batch.items()}
    out["image"] = np.stack(images) if images else np.zeros((0, cfg.size, cfg.size, 3), np.uint8)
    out["aug_index"] = np.asarray(aug_index, dtype=np.int64)
    out["error"] = np.asarray(errors, dtype=object)
    return out
