"""What a reviewer sees of a screened slide, made as the slide is screened: a small JPEG
thumbnail of the field, a JPEG of each cut-out cell, and the colour a detection is drawn in
(by its probability of ALL). The screen stage stores these in its result parts, so the
visual review (`leukray.report.review`) never holds or decodes a whole field.

May import: numpy, cv2, `leukray.ops.preprocess`.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from leukray.ops.preprocess import READ_ERRORS, decode_image

# unit: the detection unit a row came from (a camera field: 0; a whole slide: its tile);
# units: how many units its slide has; unit_rows: how many rows its unit gave. A consumer
# knows a slide is complete once it holds unit_rows distinct rows of each of its units.
REVIEW_COLUMNS = ["unit", "units", "unit_rows", "thumbnail", "thumb_scale", "crop_jpeg"]


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """HxWx3 uint8 RGB -> JPEG bytes."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8, got {image.shape} {image.dtype}")
    ok, buf = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def field_thumbnail(image: np.ndarray, max_side: int) -> tuple[bytes, float]:
    """A field shrunk (area averaging) so its longer side is at most `max_side` pixels.

    Returns:
        (JPEG bytes, scale): thumbnail pixel = field pixel * scale (1.0 when the field is
        already small enough).
    """
    scale = min(1.0, max_side / max(image.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        scale = image.shape[1] / size[0] * scale  # exact for the width the resize produced
    return encode_jpeg(image, quality=80), float(scale)


def thumbnail_of_file(data: bytes, max_side: int, max_pixels: int) -> tuple[bytes, float]:
    """`field_thumbnail` of encoded image bytes; (b"", 0.0) when they do not decode (the
    slide is then an error row of the screen, with the decoder's reason)."""
    try:
        return field_thumbnail(decode_image(data, max_pixels), max_side)
    except (*READ_ERRORS, ValueError):
        return b"", 0.0


def prob_colour(prob: float) -> str:
    """A detection's colour, `#rrggbb`: green (prob_all 0) through amber (0.5) to red (1);
    grey when the cell has no probability (its crop was rejected)."""
    if not np.isfinite(prob):
        return "#8a8a8a"
    p = float(np.clip(prob, 0.0, 1.0))
    red = round(255 * min(1.0, 2 * p))
    green = round(200 * min(1.0, 2 * (1 - p)))
    return f"#{red:02x}{green:02x}20"


def add_review_media(cells: dict[str, np.ndarray], thumbnails: dict[str, tuple[bytes, float]]) -> dict[str, np.ndarray]:
    """Add the review's columns to a `detect_and_crop` batch (every slide's rows complete).

    Args:
        cells: `detect_and_crop`'s output (slide, cell_index, image, error, ...).
        thumbnails: slide path -> (`field_thumbnail` JPEG, scale), b"" when it did not decode.

    Returns:
        `cells` with `unit`, `units` and `unit_rows` (see REVIEW_COLUMNS; when `cells` does
        not have them, each slide is one unit: 0, 1 and its row count here), `thumbnail` and
        `thumb_scale` on each slide's first row (b"" and 0 on the others), and `crop_jpeg`,
        the preprocessed crop the classifier sees as JPEG (b"" for error rows).
    """
    slides = np.asarray(cells["slide"], dtype=object)
    names, counts = np.unique(slides.astype(str), return_counts=True)
    per_slide = dict(zip(names, counts.tolist()))
    first = {}
    for row, slide in enumerate(map(str, slides)):
        first.setdefault(slide, row)
    thumbs = np.full(len(slides), b"", dtype=object)
    scales = np.zeros(len(slides), dtype=np.float64)
    for slide, row in first.items():
        thumbs[row], scales[row] = thumbnails.get(slide, (b"", 0.0))
    ok = [not e for e in cells["error"]]
    crops = [encode_jpeg(np.ascontiguousarray(img)) if good else b"" for img, good in zip(cells["image"], ok)]
    if "unit_rows" not in cells:
        cells["unit"] = np.zeros(len(slides), dtype=np.int64)
        cells["units"] = np.ones(len(slides), dtype=np.int64)
        cells["unit_rows"] = np.asarray([per_slide[str(s)] for s in slides], dtype=np.int64)
    cells["thumbnail"] = thumbs
    cells["thumb_scale"] = scales
    cells["crop_jpeg"] = np.asarray(crops, dtype=object).reshape(len(slides))
    return cells


def thumbnailing_reader(
    read_bytes: Callable[[str], bytes], max_side: int, max_pixels: int
) -> tuple[Callable[[str], bytes], dict[str, tuple[bytes, float]]]:
    """A `read_bytes` that also makes each file's thumbnail as it is read (the bytes are
    not kept), and the dict the thumbnails land in, by path."""
    thumbnails: dict[str, tuple[bytes, float]] = {}

    def read(path: str) -> bytes:
        data = read_bytes(path)
        thumbnails[path] = thumbnail_of_file(data, max_side, max_pixels)
        return data

    return read, thumbnails
