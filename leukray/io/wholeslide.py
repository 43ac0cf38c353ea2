"""Whole-slide images read a region at a time: pyramidal or tiled TIFFs (and very large
stripped ones) through `tifffile`, the scanner formats (SVS, NDPI, MRXS, ...) through
OpenSlide (the optional `wsi` extra: `pip install 'leukray[wsi]'`).

Nothing here decodes a whole slide: `read_region` decodes only the TIFF tiles or strips that
the region touches (seeking to each in the file), or asks OpenSlide for the region.

May import: numpy, tifffile, openslide (lazily), `leukray.io.storage`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from leukray.io import storage

# Read through OpenSlide (SVS, NDPI and the rest of OpenSlide's vendor formats).
OPENSLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".svslide", ".vms")
TIFF_EXTENSIONS = (".tif", ".tiff")
WSI_EXTRA = "pip install 'leukray[wsi]'"
_RESOLUTION_UNIT_UM = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: inch, centimetre


class SlideError(OSError):
    """A whole-slide image that cannot be opened or read (one-line reason)."""


@dataclass(frozen=True)
class SlideLevel:
    """One resolution of a slide: its size in pixels and its downsample from level 0."""

    width: int
    height: int
    downsample: float


@dataclass(frozen=True)
class SlideInfo:
    """A slide's levels (level 0 = full resolution) and level 0's microns per pixel (0 =
    the file does not say)."""

    levels: tuple[SlideLevel, ...]
    mpp: float
    reader: str  # "tifffile" or "openslide"


def is_openslide_path(path: str) -> bool:
    return path.lower().endswith(OPENSLIDE_EXTENSIONS)


@functools.lru_cache(maxsize=1)
def openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):  # OSError: the python binding without its library
        return False
    return True


def tiff_is_whole_slide(path: str, max_pixels: int) -> bool:
    """Whether a .tif/.tiff is read region by region (tiled, several resolutions, or more
    than `max_pixels` pixels) rather than decoded whole like a camera field. Reads the
    header only; a file tifffile cannot parse is left to the field decoder (which says why)."""
    try:
        with _open_tiff(path) as tif:
            page = tif.pages.first
            levels = len(tif.series[0].levels) if tif.series else 1
            return bool(page.is_tiled or levels > 1 or page.imagewidth * page.imagelength > max_pixels)
    except Exception:  # noqa: BLE001 - any parse failure: not ours to judge, the decoder reports it
        return False


@contextlib.contextmanager
def _open_tiff(path: str):
    import tifffile

    fs, inner = storage.resolve(path)
    if storage.is_uri(path):
        with fs.open_input_file(inner) as handle, tifffile.TiffFile(handle) as tif:
            yield tif
    else:
        with tifffile.TiffFile(inner) as tif:
            yield tif


def slide_info(path: str) -> SlideInfo:
    """The levels and resolution of a whole-slide image (header only).

    Raises:
        SlideError: the file is not a readable whole-slide image.
    """
    with open_slide(path) as slide:
        return slide.info


@contextlib.contextmanager
def open_slide(path: str) -> Iterator[Any]:
    """A context manager giving a reader with `.info` (SlideInfo) and
    `.read_region(level, x, y, width, height)` (coordinates in that level's pixels).

    Raises:
        SlideError: OpenSlide missing for a scanner format, or the file cannot be opened.
        FileNotFoundError: no such file.
    """
    if is_openslide_path(path):
        reader = _OpenSlideReader(path)
        try:
            yield reader
        finally:
            reader.close()
        return
    with contextlib.ExitStack() as stack:
        try:
            tiff_reader = _TiffReader(stack.enter_context(_open_tiff(path)))
        except (FileNotFoundError, SlideError):
            raise
        except Exception as exc:  # noqa: BLE001 - tifffile raises many kinds on a bad file
            reason = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise SlideError(f"not a readable TIFF: {type(exc).__name__}: {reason}") from None
        yield tiff_reader


class _TiffReader:
    """Regions of a TIFF's level pages, decoding only the tiles/strips they touch."""

    def __init__(self, tif: Any):
        series = tif.series[0]
        self._pages = [level.keyframe for level in series.levels] or [tif.pages.first]
        self._pages = [p.aspage() if hasattr(p, "aspage") else p for p in self._pages]
        self._fh = tif.filehandle
        first = self._pages[0]
        levels = tuple(
            SlideLevel(int(p.imagewidth), int(p.imagelength), first.imagewidth / p.imagewidth) for p in self._pages
        )
        self.info = SlideInfo(levels, _tiff_mpp(first), "tifffile")

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """HxWxS pixels (the file's dtype and samples) of `level`, clipped to the level."""
        page = self._pages[level]
        if page.planarconfig != 1 and page.samplesperpixel > 1:
            raise SlideError("planar (separate-plane) TIFFs are not supported")
        x1, y1 = min(x + width, page.imagewidth), min(y + height, page.imagelength)
        x, y = max(0, x), max(0, y)
        out = np.zeros((max(0, y1 - y), max(0, x1 - x), page.samplesperpixel), page.dtype)
        th, tw = page.chunks[0], page.chunks[1]
        per_row = page.chunked[1]
        for row in range(y // th, (y1 - 1) // th + 1 if y1 > y else 0):
            for col in range(x // tw, (x1 - 1) // tw + 1 if x1 > x else 0):
                segment = self._decode(page, row * per_row + col)
                sy, sx = row * th, col * tw
                seg = segment.reshape(segment.shape[-3:]) if segment.ndim > 3 else segment
                ya, yb = max(y, sy), min(y1, sy + seg.shape[0])
                xa, xb = max(x, sx), min(x1, sx + seg.shape[1])
                if ya < yb and xa < xb:
                    out[ya - y : yb - y, xa - x : xb - x] = seg[ya - sy : yb - sy, xa - sx : xb - sx]
        return out

    def _decode(self, page: Any, index: int) -> np.ndarray:
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:  # a sparse tile: never written, reads as zeros
            return np.zeros((*page.chunks[:2], page.samplesperpixel), page.dtype)
        self._fh.seek(offset)
        data = self._fh.read(count)
        try:
            segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except (ValueError, RuntimeError) as exc:  # e.g. a codec that needs imagecodecs
            raise SlideError(f"cannot decode TIFF tile {index}: {str(exc).splitlines()[0][:200]}") from None
        return np.asarray(segment)


def _tiff_mpp(page: Any) -> float:
    """Microns per pixel from the TIFF's XResolution and ResolutionUnit (0 when absent)."""
    unit = _RESOLUTION_UNIT_UM.get(int(page.resolutionunit))
    x_resolution = page.resolution[0] if page.resolution else 0
    if not unit or not x_resolution or x_resolution <= 1:  # 1 px/unit: the "no resolution" default
        return 0.0
    return unit / float(x_resolution)


class _OpenSlideReader:
    def __init__(self, path: str):
        if not openslide_available():
            raise SlideError(f"{path.rsplit('/', 1)[-1]} needs OpenSlide: {WSI_EXTRA}")
        if storage.is_uri(path):
            raise SlideError("OpenSlide reads local files only: copy the slide to a local or mounted folder")
        import openslide

        try:
            self._slide = openslide.OpenSlide(storage.resolve(path)[1])
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(f"OpenSlide cannot open it: {str(exc).splitlines()[0][:200]}") from None
        props = self._slide.properties
        levels = tuple(
            SlideLevel(int(w), int(h), float(d))
            for (w, h), d in zip(self._slide.level_dimensions, self._slide.level_downsamples)
        )
        mpp = _float_or_zero(props.get("openslide.mpp-x"))
        self.info = SlideInfo(levels, mpp, "openslide")

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """HxWx4 uint8 RGBA of `level` (OpenSlide's premultiplied RGBA; outside the scanned
        area alpha is 0), clipped to the level."""
        lv = self.info.levels[level]
        x1, y1 = min(x + width, lv.width), min(y + height, lv.height)
        x, y = max(0, x), max(0, y)
        origin = (math.floor(x * lv.downsample), math.floor(y * lv.downsample))  # OpenSlide wants level-0 coords
        region = self._slide.read_region(origin, level, (max(1, x1 - x), max(1, y1 - y)))
        return np.asarray(region)[: max(0, y1 - y), : max(0, x1 - x)]

    def close(self) -> None:
        self._slide.close()


def _float_or_zero(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


def read_region(path: str, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
    """One region of a slide (see `open_slide`), opening and closing the file around it."""
    with open_slide(path) as slide:
        return slide.read_region(level, x, y, width, height)
