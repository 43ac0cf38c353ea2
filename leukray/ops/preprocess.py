"""Decode and preprocess single-cell images (the paper's step 1) as pure numpy/cv2 functions.

Otsu threshold (Otsu 1979) -> binary threshold -> crop to the cell's bounding box -> resize.
Images are HWC uint8 RGB everywhere outside torch. Nothing here imports Ray: the batch
function `load_and_preprocess` is handed to `Dataset.map_batches` by
`leukray.distributed.actors.preprocess_batch`.

Speed: the common case (an 8-bit 3-channel file) stays in OpenCV's native BGR order from
decode to the final small crop, and only that crop is flipped to RGB; the gray image, the
Otsu threshold and the largest connected component are computed once and shared between
the crop and the cell's own region (`preprocess_image_with_cell`). The results are the
same as converting the whole image to RGB first (every step is per channel or uses the
same per-channel weights).

Safety: `decode_image` reads the width and height from the header (PNG, BMP, JPEG, TIFF,
GIF, WebP, PNM) and refuses an image of more than `max_pixels` pixels before decoding it,
so a small file that declares a huge image cannot allocate gigabytes.

May import: numpy, cv2, `leukray.config`, `leukray.ops.augment`, `leukray.ops.stain`,
`leukray.ops.cellfeatures`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import cv2
import numpy as np

from leukray.config import AugmentConfig, PreprocessConfig
from leukray.ops import allocator, cellfeatures, stain
from leukray.ops.augment import augment_image, augmentation_rng

# Decoding and resizing run one image per Ray worker; cv2's own thread pool would only
# oversubscribe the CPUs that Ray already hands out one per worker.
cv2.setNumThreads(1)


def keep_freed_image_memory() -> bool:
    """Let this process reuse the memory of the image it just freed for the next one
    (`allocator.IMAGE`).

    A 450x450 image and its temporaries are a few 100-600 KB buffers. Under glibc's default
    thresholds such buffers are mapped and unmapped around every image, so each image costs
    ~350 fresh page faults (1.4 MB zeroed by the kernel): ~40 % of the CPU time of
    decode + Otsu-crop, and page faults scale badly across processes (measured on 2 cores:
    two processes preprocessed synthetic C-NMC BMPs 0.8-1.1x as fast as one; with these
    thresholds 2.1x, and one process 1.4x faster). Called when this module is imported,
    which every preprocessing process (Ray worker, pool, CLI) does.

    Returns:
        True when the thresholds are in force (False where the user's own
        ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or the C library decide).
    """
    return allocator.keep_freed_memory(*allocator.IMAGE)


keep_freed_image_memory()

DEFAULT_MAX_PIXELS = 50_000_000
"""The most pixels `decode_image` decodes by default: covers 2592x1944 smear fields and
whole camera frames, refuses decompression bombs (a 97 KB PNG can declare 10000x10000)."""


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


# -- decoding ---------------------------------------------------------------------------


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes (BMP, PNG, JPEG, TIFF, ...) to HxWx3 uint8 RGB.

    Grayscale is replicated to three channels, an alpha channel is composited onto black
    (the C-NMC background), and 16-bit or float images are scaled to 8 bits.

    Args:
        data: the encoded file.
        max_pixels: refuse images of more pixels than this, judged from the header before
            decoding (PNG, BMP, JPEG, TIFF, GIF, WebP, PNM); None = no limit.

    Raises:
        ImageError: empty, truncated, undecodable or too large data.
    """
    image = _decode_native(data, max_pixels)
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # the same pixels as [:, :, ::-1], faster
    return to_rgb_uint8(image, bgr=True)


def image_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) read from the header of PNG, BMP, JPEG, TIFF, GIF, WebP or
    PNM data without decoding it, or None when the format is not one of these or the header
    is cut short (the decoder then has the last word)."""
    if not isinstance(data, (bytes, bytearray)):
        data = bytes(data)  # a memoryview or a numpy buffer
    try:
        for magic, reader in _HEADER_READERS:
            if data.startswith(magic):
                size = reader(data)
                return None if size is None else (reader.__name__[1:-5].upper(), size[0], size[1])
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _decode_native(data: bytes, max_pixels: int | None) -> np.ndarray:
    """cv2.imdecode(IMREAD_UNCHANGED) behind the size check: channels in OpenCV's order."""
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    if max_pixels is not None:
        size = image_size(data)
        if size is not None:
            fmt, width, height = size
            if width * height > max_pixels:
                raise ImageError(
                    f"image too large: {width}x{height} px (limit {max_pixels:,} px; "
                    f"from its {fmt} header, refused before decoding)"
                )
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        reason = (getattr(exc, "err", "") or str(exc)).strip().splitlines()
        raise ImageError(
            f"not a decodable image ({len(data)} bytes; OpenCV: {reason[0][:200] if reason else 'error'})"
        ) from None
    if image is None:
        raise ImageError(f"not a decodable image ({len(data)} bytes; truncated or not an image format)")
    return image


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR":
        return None
    return struct.unpack_from(">II", data, 16)


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    (header,) = struct.unpack_from("<I", data, 14)
    if header not in (12, 16, 40, 52, 56, 64, 108, 124):  # not a BMP info header ("BM..." text)
        return None
    if header == 12:  # BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack_from("<HH", data, 18)
    width, height = struct.unpack_from("<ii", data, 18)
    return abs(width), abs(height)  # a negative height is a top-down bitmap


_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        elif marker in _JPEG_SOF:
            height, width = struct.unpack_from(">HH", data, i + 5)
            return width, height
        else:
            i += 2 + struct.unpack_from(">H", data, i + 2)[0]
    return None


_TIFF_TYPES = {3: "H", 4: "I", 16: "Q"}


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    order = "<" if data[:2] == b"II" else ">"
    (version,) = struct.unpack_from(order + "H", data, 2)
    if version == 42:
        (offset,) = struct.unpack_from(order + "I", data, 4)
        count_fmt, entry_size, count_size, value_at = "H", 12, 2, 8
        entry_fmt = order + "HHI"
    elif version == 43:  # BigTIFF
        (offset,) = struct.unpack_from(order + "Q", data, 8)
        count_fmt, entry_size, count_size, value_at = "Q", 20, 8, 12
        entry_fmt = order + "HHQ"
    else:
        return None
    (count,) = struct.unpack_from(order + count_fmt, data, offset)
    found: dict[int, int] = {}
    for k in range(min(count, 4096)):
        at = offset + count_size + k * entry_size
        tag, typ, _ = struct.unpack_from(entry_fmt, data, at)
        if tag in (256, 257) and typ in _TIFF_TYPES:
            (found[tag],) = struct.unpack_from(order + _TIFF_TYPES[typ], data, at + value_at)
            if len(found) == 2:
                return found[256], found[257]
    return None


def _gif_size(data: bytes) -> tuple[int, int] | None:
    return struct.unpack_from("<HH", data, 6)


def _webp_size(data: bytes) -> tuple[int, int] | None:
    if data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    return None


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    if data[1:2] not in (b"1", b"2", b"3", b"4", b"5", b"6", b"F", b"f"):
        return None
    numbers: list[int] = []
    for line in data[2:512].split(b"\n"):
        for token in line.split(b"#", 1)[0].split():
            numbers.append(int(token))
            if len(numbers) == 2:
                return numbers[0], numbers[1]
    return None


_HEADER_READERS: tuple[tuple[bytes, Callable[[bytes], tuple[int, int] | None]], ...] = (
    (b"\x89PNG\r\n\x1a\n", _png_size),
    (b"BM", _bmp_size),
    (b"\xff\xd8", _jpeg_size),
    (b"II*\x00", _tiff_size),
    (b"MM\x00*", _tiff_size),
    (b"II+\x00", _tiff_size),
    (b"MM\x00+", _tiff_size),
    (b"GIF87a", _gif_size),
    (b"GIF89a", _gif_size),
    (b"RIFF", _webp_size),
    (b"P", _pnm_size),
)


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


# -- threshold and the largest component --------------------------------------------------

_LEVELS = np.arange(256, dtype=np.float64)


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
    return _otsu_from_histogram(_histogram(gray))


def _histogram(gray: np.ndarray, zeros_outside: int = 0) -> np.ndarray:
    """256-bin float64 histogram of `gray`, plus `zeros_outside` pixels of value 0."""
    if 0 < gray.size < (1 << 24):  # cv2's float32 bins count exactly below 2**24
        hist = cv2.calcHist([gray], [0], None, [256], [0, 256]).reshape(256).astype(np.float64)
    else:
        hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    hist[0] += zeros_outside
    return hist


def _otsu_from_histogram(hist: np.ndarray) -> int:
    levels = np.flatnonzero(hist)
    if len(levels) < 2:  # one level (a constant image: its value) or no pixels
        return int(levels[0]) if len(levels) else 0
    # Both classes are nonempty for t in [lo, hi): the first and the last level present.
    lo, hi = int(levels[0]), int(levels[-1])
    weight = np.cumsum(hist)  # pixels <= t (whole numbers: exact, whatever the order)
    moment = np.cumsum(hist * _LEVELS)
    weight_low, sum_low = weight[lo:hi], moment[lo:hi]
    weight_high = weight[-1] - weight_low
    mean_low = sum_low / weight_low
    mean_high = (moment[-1] - sum_low) / weight_high
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    # Ties (a flat maximum between two separated modes): take the middle of the plateau,
    # which is where the valley between them lies.
    best = np.flatnonzero(between == between.max())
    return lo + int(best[len(best) // 2])


class _Component(NamedTuple):
    """The largest connected component of `gray > threshold`."""

    box: tuple[int, int, int, int]  # y0, y1, x0, x1 in the image, end-exclusive
    labels: np.ndarray  # labels of a region that holds the box ...
    origin: tuple[int, int]  # ... whose top-left corner is here in the image
    label: int


def _nonzero_region(gray: np.ndarray) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the nonzero pixels' bounding box, its corner moved to even
    coordinates (see `_largest_component`); w = h = 0 when all are zero. Every foreground
    pixel, so every component, lies inside: the black C-NMC background is 0."""
    x, y, w, h = cv2.boundingRect(gray)
    if w == 0 or h == 0:
        return 0, 0, 0, 0
    return x & ~1, y & ~1, w + (x & 1), h + (y & 1)


def _largest_component(
    gray: np.ndarray, threshold: int, min_pixels: int, nonzero: tuple[int, int, int, int] | None = None
) -> _Component | None:
    threshold = math.floor(threshold)  # gray > 10.5 is gray > 10 on integers
    if threshold < 0:  # zeros are foreground too
        x, y, w, h = 0, 0, gray.shape[1], gray.shape[0]
    else:
        x, y, w, h = _nonzero_region(gray) if nonzero is None else nonzero
    if w == 0 or h == 0:
        return None
    region = gray[y : y + h, x : x + w]
    # gray > threshold as 0/1 (THRESH_BINARY keeps src > thresh, exactly on 8-bit integers)
    _, mask = cv2.threshold(region, threshold, 1, cv2.THRESH_BINARY)
    mx, my, mw, mh = cv2.boundingRect(mask)
    if mw == 0 or mh == 0:
        return None
    # Label the foreground's bounding region, its corner moved to even image coordinates so
    # that OpenCV's 2x2 block scan sees the same blocks in the same order as on the whole
    # image: the labels, and so the choice between components of equal area, are the same.
    y0, x0 = (y + my) & ~1, (x + mx) & ~1
    roi = mask[y0 - y : y + my + mh - y, x0 - x : x + mx + mw - x]
    count, labels = cv2.connectedComponents(roi, connectivity=8)
    if count <= 1:
        return None
    if count == 2:  # one component: the foreground's own box and pixel count
        if cv2.countNonZero(roi) < min_pixels:
            return None
        return _Component((y + my, y + my + mh, x + mx, x + mx + mw), labels, (y0, x0), 1)
    areas = np.bincount(labels.ravel(), minlength=count)
    biggest = 1 + int(np.argmax(areas[1:]))
    if areas[biggest] < min_pixels:
        return None
    left, top, width, height = cv2.boundingRect((labels == biggest).view(np.uint8))
    return _Component((y0 + top, y0 + top + height, x0 + left, x0 + left + width), labels, (y0, x0), biggest)


def foreground_box(gray: np.ndarray, threshold: int, min_pixels: int) -> tuple[int, int, int, int] | None:
    """Bounding box (y0, y1, x0, x1), end-exclusive, of the largest connected component of
    the binary mask `gray > threshold`, or None when it has fewer than `min_pixels` pixels.

    The largest component, not every foreground pixel, so that dust or a neighbouring
    cell's edge does not stretch the crop.
    """
    found = _largest_component(gray, threshold, min_pixels)
    return None if found is None else found.box


def _segment(image: np.ndarray, cfg: PreprocessConfig, bgr: bool) -> _Component:
    h, w = image.shape[:2]
    if min(h, w) < cfg.min_side:
        raise ImageError(f"image too small: {w}x{h} px (preprocess.min_side is {cfg.min_side})")
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)
    # The histogram of the nonzero region plus the zeros around it is the whole image's.
    x, y, rw, rh = nonzero = _nonzero_region(gray)
    threshold = _otsu_from_histogram(_histogram(gray[y : y + rh, x : x + rw], gray.size - rw * rh))
    found = _largest_component(gray, threshold, cfg.min_foreground_px, nonzero)
    if found is None:
        raise ImageError(
            f"no foreground: nothing brighter than the Otsu threshold {threshold} "
            f"in a region of >= {cfg.min_foreground_px} px (blank or all-black image)"
        )
    return found


def _margin_crop(image: np.ndarray, box: tuple[int, int, int, int], margin: int) -> np.ndarray:
    h, w = image.shape[:2]
    y0, y1, x0, x1 = box
    return image[max(0, y0 - margin) : min(h, y1 + margin), max(0, x0 - margin) : min(w, x1 + margin)]


def _cell(image: np.ndarray, found: _Component, bgr: bool) -> tuple[np.ndarray, np.ndarray]:
    y0, y1, x0, x1 = found.box
    oy, ox = found.origin
    mask = found.labels[y0 - oy : y1 - oy, x0 - ox : x1 - ox] == found.label
    cell = image[y0:y1, x0:x1]
    return (cv2.cvtColor(cell, cv2.COLOR_BGR2RGB) if bgr else cell.copy()), mask


def crop_to_foreground(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Otsu threshold -> binary mask -> crop the RGB image to the cell (plus a margin).

    Raises:
        ImageError: the image is too small or has no foreground (e.g. all black).
    """
    return _margin_crop(image, _segment(image, cfg, bgr=False).box, cfg.margin)


def cell_region(image: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """The cell at the image's own resolution: (HxWx3 uint8 RGB crop of the largest
    component's bounding box, without the margin; HxW bool mask of that component in it).

    Raises:
        ImageError: not HxWx3 uint8, too small, or no foreground.
    """
    _check_rgb(image)
    return _cell(image, _segment(image, cfg, bgr=False), bgr=False)


def resize_square(image: np.ndarray, size: int, keep_aspect: bool) -> np.ndarray:
    """Resize to size x size; with keep_aspect, pad to a centred black square first."""
    if keep_aspect:
        h, w = image.shape[:2]
        side = max(h, w)
        if h != w:
            top, left = (side - h) // 2, (side - w) // 2
            image = cv2.copyMakeBorder(
                image, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT, value=(0, 0, 0, 0)
            )
    interpolation = cv2.INTER_AREA if image.shape[0] >= size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def _check_rgb(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageError(f"expected HxWx3 uint8, got {image.shape} {image.dtype}")


def normalise_stain(image: np.ndarray, cfg: PreprocessConfig, bgr: bool = False) -> np.ndarray:
    """`image` (RGB, or BGR when `bgr`) normalised toward `cfg.stain_target` by `cfg.stain`
    (`leukray.ops.stain`), from its own stained pixels; returned in RGB when normalised.

    Raises:
        ImageError: no target configured, or too few stained pixels to estimate the stain.
    """
    if not cfg.stain_target:
        raise ImageError(f"preprocess.stain is {cfg.stain} but preprocess.stain_target is empty")
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if bgr else image
    try:
        return stain.normalise(rgb, cfg.stain, stain.parse_target(cfg.stain, cfg.stain_target))
    except stain.StainError as exc:
        raise ImageError(f"stain normalisation: {exc}") from None


def _preprocess(image: np.ndarray, cfg: PreprocessConfig, bgr: bool, with_cell: bool):
    if cfg.stain != "none":
        image, bgr = normalise_stain(image, cfg, bgr), False
    found = _segment(image, cfg, bgr)
    crop = resize_square(_margin_crop(image, found.box, cfg.margin), cfg.size, cfg.keep_aspect)
    if bgr:
        crop = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)
    if not with_cell:
        return crop
    return (crop, *_cell(image, found, bgr))


def preprocess_image(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """HxWx3 uint8 RGB -> size x size x 3 uint8 RGB crop of the cell."""
    _check_rgb(image)
    return _preprocess(image, cfg, bgr=False, with_cell=False)


def preprocess_image_with_cell(image: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One threshold / components pass for both: (the `preprocess_image` crop, and the
    `cell_region` pair cell_rgb, cell_mask)."""
    _check_rgb(image)
    return _preprocess(image, cfg, bgr=False, with_cell=True)


def _preprocess_data(data: bytes, cfg: PreprocessConfig, max_pixels: int | None, with_cell: bool):
    image = _decode_native(data, max_pixels)
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return _preprocess(image, cfg, bgr=True, with_cell=with_cell)  # stay BGR until the crop
    return _preprocess(to_rgb_uint8(image, bgr=True), cfg, bgr=False, with_cell=with_cell)


def preprocess_bytes(data: bytes, cfg: PreprocessConfig, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`preprocess_image(decode_image(data, max_pixels), cfg)`, the same pixels, faster:
    a BGR file is not flipped to RGB before the crop."""
    return _preprocess_data(data, cfg, max_pixels, with_cell=False)


def preprocess_bytes_with_cell(
    data: bytes, cfg: PreprocessConfig, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`preprocess_image_with_cell(decode_image(data, max_pixels), cfg)`, faster."""
    return _preprocess_data(data, cfg, max_pixels, with_cell=True)


def load_and_preprocess(
    batch: dict[str, np.ndarray],
    cfg: PreprocessConfig,
    augment: AugmentConfig,
    seed: int,
    read_bytes: Callable[[str], bytes],
    cell_families: tuple[str, ...] = (),
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
        cell_families: hand-crafted feature families (`leukray.ops.cellfeatures.FAMILIES`)
            to measure on each cell at its own resolution, in the same pass.

    Returns:
        One row per original image and per augmented copy: the input columns, `image`
        (N x size x size x 3 uint8; zeros where it failed), `aug_index` (0 = original) and
        `error` ("" when the image is usable, else the reason); with `cell_families`, also
        `cell_features` (N x D float32; an augmented copy carries its original's, since
        the families are measured at the cell's own size, which the copy's resize loses).
    """
    paths = batch["path"]
    measure = _cell_measure(cell_families)
    cells: list[np.ndarray] = []
    n_aug = batch["n_aug"] if "n_aug" in batch else np.zeros(len(paths), dtype=np.int64)
    blank = np.zeros((cfg.size, cfg.size, 3), dtype=np.uint8)
    images: list[np.ndarray] = []
    errors: list[str] = []
    aug_index: list[int] = []
    source_row: list[int] = []
    for row, path in enumerate(paths):
        path, content = str(path), b""
        try:
            content = read_bytes(path)
            crop, cell = measure(content, cfg)
            error = ""
        except READ_ERRORS as exc:
            crop, cell, error = blank, None, read_error_reason(exc)
        images.append(crop)
        cells.append(cell)
        errors.append(error)
        aug_index.append(0)
        source_row.append(row)
        if error:
            continue  # an unreadable image has no augmented copies; its error is recorded once
        content_hash = hashlib.sha256(content).hexdigest() if int(n_aug[row]) else ""
        for k in range(1, int(n_aug[row]) + 1):  # seeded by content: the same image anywhere, the same copies
            images.append(augment_image(crop, augmentation_rng(seed, content_hash, k), augment))
            cells.append(cell)
            errors.append("")
            aug_index.append(k)
            source_row.append(row)
    return _stream_batch(batch, cfg, source_row, images, aug_index, errors, cells, cell_families)


def _stream_batch(batch, cfg, source_row, images, aug_index, errors, cells, cell_families) -> dict[str, np.ndarray]:
    """`load_and_preprocess`'s rows as columns (the input columns repeated per copy)."""
    take = np.asarray(source_row, dtype=np.int64)
    out = {name: np.asarray(column)[take] for name, column in batch.items()}
    out["image"] = np.stack(images) if images else np.zeros((0, cfg.size, cfg.size, 3), np.uint8)
    out["aug_index"] = np.asarray(aug_index, dtype=np.int64)
    out["error"] = np.asarray(errors, dtype=object)
    if cell_families:
        dim = cellfeatures.feature_dim(cell_families)
        blank_cell = np.zeros(dim, np.float32)
        out["cell_features"] = np.stack([c if c is not None else blank_cell for c in cells]).reshape(-1, dim)
    return out


def _cell_measure(families: tuple[str, ...]) -> Callable[[bytes, PreprocessConfig], tuple[np.ndarray, Any]]:
    """bytes -> (crop, cell features or None): the features only when families are asked for."""
    if not families:
        return lambda data, cfg: (preprocess_bytes(data, cfg, cfg.max_pixels), None)

    def measure(data: bytes, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
        crop, cell_rgb, cell_mask = preprocess_bytes_with_cell(data, cfg, cfg.max_pixels)
        return crop, cellfeatures.cell_features(cell_rgb, cell_mask, families)

    return measure


STAIN_SAMPLE = 64  # reference images a stain target is fitted on (a seeded sample)


def fit_stain_target(
    paths: Sequence[str], cfg: PreprocessConfig, read_bytes: Callable[[str], bytes], seed: int = 0
) -> PreprocessConfig:
    """`cfg` with `stain_target` fitted (`leukray.ops.stain.fit_target`) on a seeded sample of
    up to 64 of `paths`, each cropped to its cell first (as it will be classified); `cfg`
    itself when stain is none or a target is already set. Unreadable images are skipped
    (they are reported by the pass that preprocesses them).

    Raises:
        ImageError: none of the sampled images could be used.
    """
    if cfg.stain == "none" or cfg.stain_target:
        return cfg
    order = np.random.default_rng(seed).permutation(len(paths))[:STAIN_SAMPLE]
    cells = []
    for i in order:
        try:
            cells.append(crop_to_foreground(decode_image(read_bytes(str(paths[i])), cfg.max_pixels), cfg))
        except (*READ_ERRORS, ValueError):
            continue
    try:
        target = stain.fit_target(cfg.stain, cells)
    except stain.StainError as exc:
        raise ImageError(f"cannot fit a {cfg.stain} stain target on {len(cells)} sampled images: {exc}") from None
    return dataclasses.replace(cfg, stain_target=stain.format_target(target))
