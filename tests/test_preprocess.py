"""Otsu threshold, crop and decode on constructed images with known geometry."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest

from leukray.config import AugmentConfig, PreprocessConfig
from leukray.ops.augment import augment_image, augmentation_rng, plan_copies
from leukray.ops.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    cell_region,
    crop_to_foreground,
    decode_image,
    foreground_box,
    image_size,
    keep_freed_image_memory,
    load_and_preprocess,
    otsu_threshold,
    preprocess_bytes,
    preprocess_bytes_with_cell,
    preprocess_image,
    preprocess_image_with_cell,
    resize_square,
)


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def cell_on_black(h=200, w=300, box=(40, 120, 60, 200), value=(120, 40, 140)) -> np.ndarray:
    """RGB image, black background, one filled rectangle at rows y0:y1, cols x0:x1."""
    image = np.zeros((h, w, 3), np.uint8)
    y0, y1, x0, x1 = box
    image[y0:y1, x0:x1] = value
    return image


class TestOtsu:
    def test_two_levels_threshold_separates_them(self):
        gray = np.zeros((100, 100), np.uint8)
        gray[:, :30] = 20
        gray[:, 30:] = 200
        t = otsu_threshold(gray)
        assert 20 <= t < 200
        assert ((gray > t) == (gray == 200)).all()

    def test_matches_opencv_on_a_noisy_bimodal_image(self):
        rng = np.random.default_rng(0)
        gray = np.concatenate([rng.normal(60, 10, 5000), rng.normal(170, 15, 3000)])
        gray = np.clip(gray, 0, 255).astype(np.uint8).reshape(80, 100)
        cv_t, _ = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        ours = otsu_threshold(gray)
        # Where the histogram is empty between the modes every level there is optimal;
        # OpenCV takes the first, we take the middle: the partition must be the same.
        assert ((gray > ours) == (gray > cv_t)).all()
        assert 90 < ours < 140  # between the modes

    def test_a_flat_maximum_gives_the_middle_of_the_plateau(self):
        gray = np.zeros((100, 100), np.uint8)
        gray[:, :30] = 20
        gray[:, 30:] = 200
        assert otsu_threshold(gray) == 20 + 180 // 2  # every t in 20..199 is optimal
        assert otsu_threshold(gray[:, 10:90]) == 110  # a view, not contiguous

    def test_constant_image_has_no_foreground(self):
        gray = np.full((50, 50), 77, np.uint8)
        assert not (gray > otsu_threshold(gray)).any()

    def test_rejects_wrong_dtype(self):
        with pytest.raises(ValueError, match="uint8"):
            otsu_threshold(np.zeros((4, 4), np.uint16))


class TestCrop:
    def test_crop_is_the_rectangle_plus_margin(self):
        image = cell_on_black(box=(40, 120, 60, 200))
        crop = crop_to_foreground(image, PreprocessConfig(margin=0))
        assert crop.shape == (80, 140, 3)
        assert (crop == (120, 40, 140)).all()
        crop = crop_to_foreground(image, PreprocessConfig(margin=5))
        assert crop.shape == (90, 150, 3)

    def test_dust_speck_does_not_stretch_the_crop(self):
        image = cell_on_black(box=(40, 120, 60, 200))
        image[190:193, 290:293] = 255  # a bright 3x3 speck far away
        assert foreground_box(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 10, 5) == (40, 120, 60, 200)

    def test_margin_is_clipped_at_the_border(self):
        image = cell_on_black(box=(0, 50, 0, 60))
        assert crop_to_foreground(image, PreprocessConfig(margin=10)).shape == (60, 70, 3)

    def test_all_black_is_no_foreground(self):
        with pytest.raises(ImageError, match="no foreground"):
            crop_to_foreground(np.zeros((100, 100, 3), np.uint8), PreprocessConfig())

    def test_too_small(self):
        with pytest.raises(ImageError, match="too small: 10x10"):
            crop_to_foreground(np.full((10, 10, 3), 200, np.uint8), PreprocessConfig())

    def test_resize_keeps_aspect_by_padding(self):
        crop = np.full((50, 100, 3), 200, np.uint8)
        out = resize_square(crop, 64, keep_aspect=True)
        assert out.shape == (64, 64, 3)
        assert out[0, 32].sum() == 0 and out[32, 32].sum() > 0  # black bands above, cell in the middle
        stretched = resize_square(crop, 64, keep_aspect=False)
        assert stretched.min() == 200

    def test_preprocess_output_shape(self):
        out = preprocess_image(cell_on_black(), PreprocessConfig(size=224))
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8


class TestCell:
    def disk_image(self):
        """A filled disk of radius 30 centred at (row 70, col 110), plus a 3x3 speck."""
        image = np.zeros((160, 240, 3), np.uint8)
        cv2.circle(image, (110, 70), 30, (200, 60, 150), thickness=-1)
        image[150:153, 5:8] = 255
        return image

    def test_cell_region_is_the_disk_box_and_mask(self):
        image = self.disk_image()
        cell, mask = cell_region(image, PreprocessConfig())
        assert cell.shape == (61, 61, 3) and cell.dtype == np.uint8
        assert mask.shape == (61, 61) and mask.dtype == bool
        disk = image[40:101, 80:141].any(axis=2)
        assert np.array_equal(mask, disk)  # no margin, the speck is not in it
        assert mask.sum() == np.count_nonzero(image[:140].any(axis=2))  # the whole disk
        assert abs(int(mask.sum()) - np.pi * 30**2) < 0.03 * np.pi * 30**2
        assert (cell[mask] == (200, 60, 150)).all() and (cell[~mask] == 0).all()
        assert mask[30, 30] and not mask[0, 0]

    def test_one_pass_gives_the_crop_and_the_cell(self):
        image = self.disk_image()
        cfg = PreprocessConfig(size=64)
        crop, cell, mask = preprocess_image_with_cell(image, cfg)
        assert np.array_equal(crop, preprocess_image(image, cfg))
        ref_cell, ref_mask = cell_region(image, cfg)
        assert np.array_equal(cell, ref_cell) and np.array_equal(mask, ref_mask)
        data = encode(image[:, :, ::-1])  # a BGR file: the fast path must flip to RGB
        crop2, cell2, mask2 = preprocess_bytes_with_cell(data, cfg)
        assert np.array_equal(crop2, crop) and np.array_equal(cell2, cell) and np.array_equal(mask2, mask)
        assert np.array_equal(preprocess_bytes(data, cfg), crop)

    def test_mask_keeps_holes_and_drops_other_components(self):
        image = cell_on_black(box=(40, 120, 60, 200))
        image[70:90, 100:120] = 0  # a hole inside the cell ...
        image[77:83, 107:113] = 90  # ... with a separate speck in it, inside the cell's box
        cell, mask = cell_region(image, PreprocessConfig())
        assert cell.shape[:2] == mask.shape == (80, 140)
        assert mask.sum() == 80 * 140 - 20 * 20 and not mask[30:50, 40:60].any()
        assert (cell[37:43, 47:53] == 90).all()  # the speck is in the crop, not in the mask

    def test_equal_components_pick_the_same_box_as_labelling_the_whole_image(self):
        for y, x in [(11, 13), (12, 14), (13, 12), (10, 11)]:
            gray = np.zeros((120, 140), np.uint8)
            gray[y : y + 20, x : x + 20] = 200
            gray[y + 50 : y + 70, x + 71 : x + 91] = 200  # the same area, lower right
            gray[y + 30 : y + 50, x + 5 : x + 25] = 200  # the same area, lower left
            n, _, stats, _ = cv2.connectedComponentsWithStats((gray > 100).astype(np.uint8), connectivity=8)
            k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            left, top, w, h = stats[k, :4]
            assert foreground_box(gray, 100, 5) == (top, top + h, left, left + w)

    def test_random_specks_give_the_whole_image_labelling_box(self):
        rng = np.random.default_rng(3)
        for _ in range(200):  # many components of equal area: ties everywhere
            h, w = (int(v) for v in rng.integers(2, 40, 2))
            gray = ((rng.random((h, w)) < rng.uniform(0.05, 0.6)) * rng.integers(0, 256, (h, w))).astype(np.uint8)
            for threshold in (-1, 0, 90):
                mask = (gray > threshold).astype(np.uint8)
                n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
                want = None
                if n > 1:
                    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
                    left, top, bw, bh, area = (int(v) for v in stats[k])
                    want = (top, top + bh, left, left + bw) if area >= 2 else None
                assert foreground_box(gray, threshold, 2) == want

    def test_tiny_foreground_is_no_foreground(self):
        image = np.zeros((100, 100, 3), np.uint8)
        image[10:15, 10:15] = 200  # 25 px < min_foreground_px 50
        with pytest.raises(ImageError, match="no foreground"):
            cell_region(image, PreprocessConfig())
        with pytest.raises(ImageError, match="no foreground"):
            preprocess_image_with_cell(image, PreprocessConfig())


class TestDecode:
    def test_png_roundtrip_is_rgb(self):
        rgb = cell_on_black(value=(200, 10, 30))
        decoded = decode_image(encode(rgb[:, :, ::-1]))  # cv2 writes BGR
        assert (decoded == rgb).all()

    def test_grayscale_becomes_three_channels(self):
        gray = np.zeros((64, 64), np.uint8)
        gray[10:50, 10:50] = 180
        out = decode_image(encode(gray))
        assert out.shape == (64, 64, 3) and (out[20, 20] == 180).all()

    def test_rgba_is_composited_on_black(self):
        rgba = np.zeros((64, 64, 4), np.uint8)
        rgba[..., :3] = 255
        rgba[:32, :, 3] = 255  # top half opaque white, bottom half transparent
        out = decode_image(encode(rgba))
        assert out.shape == (64, 64, 3)
        assert (out[:32] == 255).all() and (out[32:] == 0).all()

    def test_16_bit_is_scaled_to_8_bit(self):
        img16 = np.zeros((64, 64, 3), np.uint16)
        img16[20:40, 20:40] = 40000
        out = decode_image(encode(img16))
        assert out.dtype == np.uint8 and out[30, 30, 0] == 40000 >> 8

    def test_zero_bytes(self):
        with pytest.raises(ImageError, match="empty file"):
            decode_image(b"")

    def test_text_and_truncated_files(self):
        with pytest.raises(ImageError, match="not a decodable image"):
            decode_image(b"this is a text file, not a bitmap\n")
        data = encode(cell_on_black(), ".bmp")
        with pytest.raises(ImageError, match="not a decodable image"):
            decode_image(data[:200])


def png_declaring(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A tiny PNG whose IHDR declares width x height (its data is one compressed row)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class TestPixelCap:
    def refused_fast(self, data: bytes, match: str):
        tracemalloc.start()
        start = time.perf_counter()
        try:
            with pytest.raises(ImageError, match=match) as info:
                decode_image(data)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert time.perf_counter() - start < 1.0 and peak < 1_000_000
        assert "\n" not in str(info.value)
        return str(info.value)

    def test_png_bomb_is_refused_before_decoding(self):
        data = png_declaring(10000, 10000)
        assert len(data) < 1000 and image_size(data) == ("PNG", 10000, 10000)
        message = self.refused_fast(data, r"image too large: 10000x10000 px \(limit 50,000,000 px")
        assert "PNG header" in message

    def test_huge_16_bit_rgba_and_40000_square_headers(self):
        self.refused_fast(png_declaring(32000, 32000, bit_depth=16, color_type=6), "too large: 32000x32000")
        self.refused_fast(png_declaring(40000, 40000), "too large: 40000x40000")

    def test_bmp_and_jpeg_headers_of_huge_size(self):
        bmp = bytearray(encode(cell_on_black(), ".bmp"))
        bmp[18:26] = struct.pack("<ii", 20000, -20000)  # top-down: a negative height
        self.refused_fast(bytes(bmp), "too large: 20000x20000 px .*BMP header")
        jpeg = bytearray(encode(cell_on_black(), ".jpg"))
        sof = jpeg.index(b"\xff\xc0")
        jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 40000)  # height, width
        self.refused_fast(bytes(jpeg), "too large: 40000x30000 px .*JPEG header")

    def test_other_headers_are_read(self):
        image = cell_on_black(h=123, w=321)
        for ext, fmt in ((".png", "PNG"), (".bmp", "BMP"), (".jpg", "JPEG"), (".tif", "TIFF"), (".ppm", "PNM")):
            assert image_size(encode(image, ext)) == (fmt, 321, 123), ext
        tiff = bytearray(encode(image, ".tif"))
        order = "<" if tiff[:2] == b"II" else ">"
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):  # make ImageWidth / ImageLength huge LONGs
            at = ifd + 2 + 12 * k
            tag = struct.unpack_from(order + "H", tiff, at)[0]
            if tag in (256, 257):
                tiff[at + 2 : at + 12] = struct.pack(order + "HII", 4, 1, 60000)
        self.refused_fast(bytes(tiff), "too large: 60000x60000 px .*TIFF header")
        gif = b"GIF89a" + struct.pack("<HH", 9000, 9000) + b"\0" * 20
        self.refused_fast(gif, "too large: 9000x9000")
        webp = b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8X" + struct.pack("<I", 10) + b"\0" * 4
        webp += (12000 - 1).to_bytes(3, "little") + (12000 - 1).to_bytes(3, "little")
        self.refused_fast(webp, "too large: 12000x12000 px .*WEBP header")

    def test_normal_images_pass_and_the_limit_is_a_parameter(self):
        data = encode(cell_on_black(h=200, w=300))
        assert decode_image(data).shape == (200, 300, 3)
        assert DEFAULT_MAX_PIXELS == 50_000_000
        with pytest.raises(ImageError, match=r"too large: 300x200 px \(limit 59,999 px"):
            decode_image(data, max_pixels=59_999)
        assert decode_image(data, max_pixels=60_000).shape == (200, 300, 3)
        assert decode_image(data, max_pixels=None).shape == (200, 300, 3)
        with pytest.raises(ImageError, match="too large"):
            preprocess_bytes(data, PreprocessConfig(), max_pixels=1000)

    def test_cv2_errors_become_image_errors(self, monkeypatch):
        def boom(*_):
            raise cv2.error(
                "OpenCV(5.0.0) loadsave.cpp:1: error: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS"
            )

        monkeypatch.setattr(cv2, "imdecode", boom)
        with pytest.raises(ImageError, match="not a decodable image") as info:
            decode_image(b"\x00\x01 an unknown format")
        assert "\n" not in str(info.value)

    def test_the_batch_records_a_bomb_as_an_error(self):
        files = {"bomb": png_declaring(10000, 10000), "good": encode(cell_on_black())}
        batch = {"path": np.array(["bomb", "good"], dtype=object)}
        out = load_and_preprocess(batch, PreprocessConfig(size=32), AugmentConfig(), 0, files.__getitem__)
        assert out["error"][0].startswith("image too large: 10000x10000 px") and out["error"][1] == ""
        assert out["image"].shape == (2, 32, 32, 3) and not out["image"][0].any()

    def test_the_cap_is_the_configs(self):
        files = {"cell": encode(cell_on_black())}  # 300x200 = 60,000 px
        batch = {"path": np.array(["cell"], dtype=object)}
        tight = load_and_preprocess(batch, PreprocessConfig(size=32, max_pixels=59_999), AugmentConfig(), 0, files.get)
        assert (
            tight["error"][0]
            == "image too large: 300x200 px (limit 59,999 px; from its PNG header, refused before decoding)"
        )
        loose = load_and_preprocess(batch, PreprocessConfig(size=32, max_pixels=60_000), AugmentConfig(), 0, files.get)
        assert loose["error"][0] == ""


class TestBatch:
    def test_batch_reports_errors_and_emits_augmented_copies(self):
        files = {"good": encode(cell_on_black()), "black": encode(np.zeros((80, 80, 3), np.uint8)), "empty": b""}
        batch = {
            "path": np.array(["good", "black", "empty"], dtype=object),
            "label": np.array(["all", "hem", "hem"], dtype=object),
            "n_aug": np.array([2, 3, 0]),
        }
        out = load_and_preprocess(batch, PreprocessConfig(size=32), AugmentConfig(), 0, files.__getitem__)
        assert list(out["path"]) == ["good", "good", "good", "black", "empty"]
        assert list(out["aug_index"]) == [0, 1, 2, 0, 0]
        assert out["error"][0] == "" and "no foreground" in out["error"][3] and "empty file" in out["error"][4]
        assert out["image"].shape == (5, 32, 32, 3)
        assert list(out["label"]) == ["all", "all", "all", "hem", "hem"]
        assert not np.array_equal(out["image"][1], out["image"][0])  # the copies are augmented

    def test_missing_file_is_an_error_not_a_crash(self):
        def read(_):
            raise FileNotFoundError("gone")

        out = load_and_preprocess({"path": np.array(["x"], dtype=object)}, PreprocessConfig(), AugmentConfig(), 0, read)
        assert out["error"][0] == "file not found"


class TestAugment:
    def test_deterministic_and_shape_preserving(self):
        crop = resize_square(cell_on_black(), 64, True)
        a = augment_image(crop, augmentation_rng(1, "p", 1), AugmentConfig())
        b = augment_image(crop, augmentation_rng(1, "p", 1), AugmentConfig())
        c = augment_image(crop, augmentation_rng(1, "p", 2), AugmentConfig())
        assert a.shape == crop.shape and a.dtype == np.uint8
        assert np.array_equal(a, b) and not np.array_equal(a, c)

    def test_oversampling_balances_classes(self):
        import pandas as pd

        train = pd.DataFrame({"label": ["all"] * 20 + ["hem"] * 7})
        n_aug = plan_copies(train, AugmentConfig(oversample=1.0), seed=0)
        per_class = (1 + n_aug).groupby(train["label"]).sum()
        assert per_class["all"] == 20 and per_class["hem"] == 20
        assert n_aug[train["label"] == "all"].sum() == 0
        assert set(n_aug[train["label"] == "hem"]) <= {1, 2}  # spread evenly

    def test_oversampling_off(self):
        import pandas as pd

        train = pd.DataFrame({"label": ["all"] * 5 + ["hem"] * 2})
        assert plan_copies(train, AugmentConfig(oversample=0.0), seed=0).sum() == 0
        assert plan_copies(train, AugmentConfig(oversample=0.0, copies=2), seed=0).tolist() == [2] * 7


def test_the_allocator_setting_yields_to_the_users_own(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_image_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    if not sys.platform.startswith("linux"):
        pytest.skip("mallopt is glibc's")
    assert keep_freed_image_memory() is True


# Minor page faults per image of read + decode + preprocess over synthetic 450x450 C-NMC-style
# BMPs, in a fresh process (argv[1]: a folder to write them to).
_FAULTS_PER_IMAGE = """
import os, resource, sys
if sys.argv[2] == "glibc-default":  # read by leukray only: glibc read its variables at start-up
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
from leukray.config import PreprocessConfig
from leukray.io import storage
from leukray.ops.preprocess import decode_image, preprocess_image
from leukray.tools.synth import generate_dataset
paths = generate_dataset(sys.argv[1], cells=50, subjects=2, seed=0)["path"].tolist()
cfg = PreprocessConfig()
for path in paths[:10]:
    preprocess_image(decode_image(storage.read_bytes(path)), cfg)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for path in paths[10:]:
    preprocess_image(decode_image(storage.read_bytes(path)), cfg)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and minor-fault counts are Linux's")
def test_preprocessing_reuses_freed_memory_instead_of_faulting_in_fresh_pages(tmp_path):
    def faults(allocator):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        code = [sys.executable, "-c", _FAULTS_PER_IMAGE, str(tmp_path / allocator), allocator]
        return float(subprocess.run(code, env=env, capture_output=True, text=True, check=True).stdout.strip())

    # glibc's own adaptive thresholds map and zero fresh pages for most images (~400 faults each)
    assert faults("glibc-default") > 50
    assert faults("leukray") < 5
