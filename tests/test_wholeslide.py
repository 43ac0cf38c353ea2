"""Whole-slide screening: region reads of pyramidal, tiled and stripped TIFFs (tifffile) and of
OpenSlide files, the tile plan, and detection over overlapping tiles finding the cells of the
smear fields a synthetic slide was stitched from, each once."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from test_screen import encode, smear_field, tiny_bundle  # noqa: F401 - tiny_bundle is a fixture

from leukray.config import PreprocessConfig, ScreenConfig
from leukray.distributed.actors import slide_tiles
from leukray.errors import ConfigError, DataError
from leukray.io import wholeslide
from leukray.ops.smear import NO_CELLS, TILE_CELL_STRIDE, TILE_COLUMNS, detect_and_crop, detect_leukocytes
from leukray.ops.tiles import choose_level, tile_grid
from leukray.stages.screen import list_slides, screen

FIELD_H, FIELD_W = 360, 480
SEEDS = [[0, 5], [7, 9]]  # a 2 x 2 mosaic of constructed smear fields
MPP = 0.25


def mosaic() -> np.ndarray:
    """The 720 x 960 x 3 slide: four constructed smear fields side by side."""
    return np.concatenate([np.concatenate([smear_field(seed=s) for s in row], axis=1) for row in SEEDS], axis=0)


def write_pyramid(path, image: np.ndarray, tile: int = 128, compression: str = "zlib") -> None:
    """A pyramidal tiled TIFF: level 0 and two 2x-reduced levels as SubIFDs, 0.25 um/px."""
    resolution = (1e4 / MPP, 1e4 / MPP)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        options = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
        tif.write(image, subifds=2, resolution=resolution, resolutionunit="CENTIMETER", **options)
        for factor in (2, 4):
            tif.write(image[::factor, ::factor], subfiletype=1, **options)


def field_cells(cfg: ScreenConfig) -> np.ndarray:
    """(x, y) of every cell the detector finds in each field alone, in mosaic pixels."""
    centres = []
    for r, row in enumerate(SEEDS):
        for c, seed in enumerate(row):
            for cell in detect_leukocytes(smear_field(seed=seed), cfg):
                centres.append((cell.cx + c * FIELD_W, cell.cy + r * FIELD_H))
    return np.asarray(centres)


def tile_batch(path: str, cfg: ScreenConfig) -> dict[str, np.ndarray]:
    rows = slide_tiles({"path": path}, cfg)
    return {c: np.asarray([r[c] for r in rows]) for c in ["path", *TILE_COLUMNS]}


def detect_slide(path: str, cfg: ScreenConfig) -> dict[str, np.ndarray]:
    """The detection rows of a whole slide, tile by tile, without Ray."""
    return detect_and_crop(
        tile_batch(path, cfg),
        cfg,
        PreprocessConfig(size=32),
        read_bytes=lambda p: open(p, "rb").read(),
        read_region=wholeslide.read_region,
    )


def nearest(points: np.ndarray, to: np.ndarray) -> np.ndarray:
    """For each of `points` (N x 2), the distance to the nearest of `to` (M x 2)."""
    return np.sqrt(((points[:, None, :] - to[None, :, :]) ** 2).sum(-1)).min(axis=1)


# -- tile plan ------------------------------------------------------------------------------


def test_tiling_options_are_checked():
    with pytest.raises(ConfigError, match="screen.tile_px must be >= 64"):
        ScreenConfig(tile_px=32)
    with pytest.raises(ConfigError, match="screen.tile_overlap must be between 1.0"):
        ScreenConfig(tile_overlap=0.5)  # less than a leukocyte: border cells would be cut
    with pytest.raises(ConfigError, match="screen.level must be >= -1"):
        ScreenConfig(level=-2)


def test_choose_level_by_resolution_and_by_hand():
    downsamples = [1.0, 4.0, 16.0]
    assert choose_level(downsamples, mpp=0.1, target_mpp=0.25, level=-1) == 0  # level 1 is 0.4 um/px
    assert choose_level(downsamples, mpp=0.06, target_mpp=0.25, level=-1) == 1  # 0.24 um/px
    assert choose_level(downsamples, mpp=0.0625, target_mpp=0.25, level=-1) == 1  # 0.25 exactly
    assert choose_level(downsamples, mpp=0.01, target_mpp=0.25, level=-1) == 2
    assert choose_level(downsamples, mpp=0.0, target_mpp=0.25, level=-1) == 0  # no metadata
    assert choose_level(downsamples, mpp=0.01, target_mpp=0.25, level=1) == 1  # by hand
    assert choose_level(downsamples, mpp=0.01, target_mpp=0.25, level=7) == 2


def test_tile_cores_partition_the_level_and_reads_overlap_them():
    tiles = tile_grid(1000, 700, 256, 40)
    owners = np.zeros((700, 1000), np.int32)
    for t in tiles:
        owners[t.core_y0 : t.core_y1, t.core_x0 : t.core_x1] += 1
        assert t.x == max(0, t.core_x0 - 40) and t.x + t.width == min(1000, t.core_x1 + 40)
        assert t.y == max(0, t.core_y0 - 40) and t.y + t.height == min(700, t.core_y1 + 40)
    assert (owners == 1).all()  # every pixel in exactly one core
    assert len(tiles) == 4 * 3 and [t.index for t in tiles] == list(range(12))
    with pytest.raises(ValueError, match="positive sizes"):
        tile_grid(1000, 700, 0, 40)


# -- region reads ---------------------------------------------------------------------------


def test_tiff_regions_decode_only_the_tiles_they_touch(tmp_path, monkeypatch):
    image = mosaic()
    path = tmp_path / "slide.tif"
    write_pyramid(path, image)
    info = wholeslide.slide_info(str(path))
    assert [(lv.width, lv.height, lv.downsample) for lv in info.levels] == [
        (960, 720, 1.0),
        (480, 360, 2.0),
        (240, 180, 4.0),
    ]
    assert info.mpp == pytest.approx(MPP)
    decoded = []
    original = wholeslide._TiffReader._decode
    monkeypatch.setattr(wholeslide._TiffReader, "_decode", lambda self, p, i: decoded.append(i) or original(self, p, i))
    region = wholeslide.read_region(str(path), 0, 130, 140, 100, 90)  # inside TIFF tile (1, 1)
    assert np.array_equal(region, image[140:230, 130:230]) and decoded == [1 * 8 + 1]
    decoded.clear()
    region = wholeslide.read_region(str(path), 0, 900, 600, 300, 300)  # clipped at the corner
    assert np.array_equal(region, image[600:, 900:]) and len(decoded) == 2 * 1
    assert np.array_equal(wholeslide.read_region(str(path), 1, 100, 50, 200, 150), image[::2, ::2][50:200, 100:300])


def test_stripped_and_jpeg_tiffs_and_openslide_read_the_same_pixels(tmp_path):
    image = mosaic()
    stripped = tmp_path / "big.tif"
    tifffile.imwrite(stripped, image, photometric="rgb", rowsperstrip=50)
    assert np.array_equal(wholeslide.read_region(str(stripped), 0, 100, 75, 400, 310), image[75:385, 100:500])
    assert not wholeslide.tiff_is_whole_slide(str(stripped), max_pixels=10**7)  # a camera field
    assert wholeslide.tiff_is_whole_slide(str(stripped), max_pixels=500_000)  # too big to decode whole
    jpeg = tmp_path / "jpeg.tif"
    write_pyramid(jpeg, image, compression="jpeg")
    lossy = wholeslide.read_region(str(jpeg), 0, 200, 100, 300, 300).astype(int)
    assert np.abs(lossy - image[100:400, 200:500]).mean() < 4
    if not wholeslide.openslide_available():
        pytest.skip("OpenSlide is not installed (pip install 'leukray[wsi]')")
    scanner = tmp_path / "slide.svs"  # OpenSlide reads a generic tiled TIFF whatever its name
    write_pyramid(scanner, image)
    info = wholeslide.slide_info(str(scanner))
    assert info.reader == "openslide" and (info.levels[0].width, info.levels[0].height) == (960, 720)
    rgba = wholeslide.read_region(str(scanner), 0, 130, 140, 300, 200)
    assert rgba.shape == (200, 300, 4) and np.array_equal(rgba[..., :3], image[140:340, 130:430])


def test_unreadable_slides_are_recorded_with_a_reason(tmp_path):
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00" + b"\x00" * 50)
    rows = slide_tiles({"path": str(broken)}, ScreenConfig())
    assert len(rows) == 1 and rows[0]["tile_index"] == -1 and rows[0]["error"] == ""  # left to the field decoder
    if wholeslide.openslide_available():
        fake = tmp_path / "fake.ndpi"
        fake.write_bytes(b"not a slide")
        rows = slide_tiles({"path": str(fake)}, ScreenConfig())
        assert len(rows) == 1 and "OpenSlide cannot open it" in rows[0]["error"]


def test_scanner_files_without_openslide_are_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "case-1.svs").write_bytes(b"x")
    monkeypatch.setattr(wholeslide, "openslide_available", lambda: False)
    with pytest.raises(DataError, match=r"case-1.svs is a whole-slide image and needs OpenSlide: .*leukray\[wsi\]"):
        list_slides(str(tmp_path))


# -- detection over tiles -------------------------------------------------------------------


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("wsi") / "slide.tif"
    write_pyramid(path, mosaic())
    return path


def test_tiles_find_each_field_cell_once(slide_path):
    cfg = ScreenConfig(tile_px=256, red_cell_diameter_px=40)
    plan = tile_batch(str(slide_path), cfg)
    assert len(plan["path"]) == 4 * 3 and set(plan["level"]) == {0}
    assert set(plan["x"]) == {0, 256 - 120, 512 - 120, 768 - 120}  # overlap: 3 red cells of 40 px
    out = detect_slide(str(slide_path), cfg)
    cells = out["cell_index"] >= 0
    found = np.stack([out["cx"][cells], out["cy"][cells]], axis=1)
    truth = field_cells(cfg)
    assert len(truth) == 12
    assert len(found) == len(truth)
    assert nearest(truth, found).max() < 3  # every field cell, at its place
    gaps = np.sqrt(((found[:, None] - found[None]) ** 2).sum(-1)) + np.eye(len(found)) * 1e9
    assert gaps.min() > 40  # no cell twice
    # cells straddling a core border (the one at x = 260 of each left-hand field sits 4 px right
    # of x = 256) are read whole by the tiles on both sides, and kept by one
    x0, x1, y0, y1 = (out[c][cells] for c in ("x0", "x1", "y0", "y1"))
    straddle = (x0 // 256 != (x1 - 1) // 256) | (y0 // 256 != (y1 - 1) // 256)
    assert straddle.sum() == 2
    assert len(set(out["cell_index"][cells])) == len(found)
    assert (out["cell_index"][cells] // TILE_CELL_STRIDE < 12).all()
    assert set(out["error"][~cells]) == {NO_CELLS}  # the empty tiles say so


def test_a_coarser_level_finds_the_same_cells_in_level0_coordinates(slide_path):
    cfg0 = ScreenConfig(tile_px=256, red_cell_diameter_px=40)
    cfg1 = ScreenConfig(tile_px=128, red_cell_diameter_px=40, level=1)
    assert set(tile_batch(str(slide_path), cfg1)["level"]) == {1}
    full, coarse = detect_slide(str(slide_path), cfg0), detect_slide(str(slide_path), cfg1)
    at = [np.stack([o["cx"][o["cell_index"] >= 0], o["cy"][o["cell_index"] >= 0]], axis=1) for o in (full, coarse)]
    assert len(at[1]) == len(at[0]) and nearest(at[1], at[0]).max() < 4


def test_a_big_stripped_tiff_is_tiled_like_the_pyramid(slide_path, tmp_path):
    stripped = tmp_path / "big.tif"
    tifffile.imwrite(stripped, mosaic(), photometric="rgb", rowsperstrip=64)
    cfg = ScreenConfig(tile_px=256, red_cell_diameter_px=40, max_pixels=500_000)
    out, ref = detect_slide(str(stripped), cfg), detect_slide(str(slide_path), cfg)
    assert len(tile_batch(str(stripped), cfg)["path"]) == 12
    for column in ("cell_index", "x0", "y0", "x1", "y1", "area"):
        assert np.array_equal(out[column], ref[column]), column


def test_the_red_cell_size_is_estimated_once_per_slide(slide_path):
    rows = slide_tiles({"path": str(slide_path)}, ScreenConfig(tile_px=256))
    sizes = {r["red_cell_px"] for r in rows}
    assert len(sizes) == 1 and sizes.pop() == pytest.approx(40, rel=0.15)


# -- the whole job --------------------------------------------------------------------------


@pytest.mark.slow
def test_screen_whole_slide_end_to_end(ray_local, tiny_bundle, slide_path, tmp_path):  # noqa: F811
    data = tmp_path / "slides"
    data.mkdir()
    (data / "slide.tif").write_bytes(slide_path.read_bytes())
    (data / "field.png").write_bytes(encode(smear_field(seed=0)))
    (data / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 50)
    cfg = ScreenConfig(tile_px=256, batch_size=2)
    summary = screen(str(tiny_bundle), str(data), str(tmp_path / "out"), cfg)
    cells = pd.read_parquet(tmp_path / "out" / "cells.parquet")
    slides = pd.read_csv(tmp_path / "out" / "slides.csv", keep_default_na=False).set_index("slide")
    per_slide = cells.groupby("slide").size().to_dict()
    assert per_slide == {str(data / "slide.tif"): 12, str(data / "field.png"): 3}
    wsi = cells[cells["slide"] == str(data / "slide.tif")]
    assert not wsi.duplicated("cell_index").any()
    truth = field_cells(ScreenConfig())
    assert nearest(truth, wsi[["cx", "cy"]].to_numpy()).max() < 3
    assert slides.loc[str(data / "slide.tif"), "error"] == ""  # empty tiles are no error
    assert slides.loc[str(data / "broken.tif"), "status"] == "error"
    assert summary["counts"]["cells"] == 15 and summary["counts"]["slides"] == 3
    assert 0 <= float(slides.loc[str(data / "slide.tif"), "mean_prob_all"]) <= 1
    # the review: the whole slide's thumbnail comes from its coarsest level, scaled to level 0
    from leukray.io import screenparts

    parts, _ = screenparts.list_parts(str(tmp_path / "out"))
    media = [screenparts.read_media(part.path, str(data / "slide.tif")) for part in parts]
    thumb, scale, crops = next(m for m in media if m[0])
    image = cv2.imdecode(np.frombuffer(thumb, np.uint8), cv2.IMREAD_COLOR)
    with tifffile.TiffFile(slide_path) as tif:
        width = tif.pages.first.imagewidth
    assert abs(image.shape[1] - width * scale) <= 1 and max(image.shape[:2]) <= cfg.thumbnail_px
    assert crops and set(crops) <= set(wsi["cell_index"])
    assert "slide.tif" in (tmp_path / "out" / "report.html").read_text()
