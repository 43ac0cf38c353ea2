"""Otsu threshold, crop and decode on constructed images with known geometry."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from leukray.ops.augment import augment_image, augmentation_rng, plan_copies
from leukray.config import AugmentConfig, PreprocessConfig
from leukray.ops.preprocess import (
    ImageError,
    crop_to_foreground,
    decode_image,
    foreground_box,
    load_and_preprocess,
    otsu_threshold,
    preprocess_image,
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
