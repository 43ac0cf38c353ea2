"""Stain normalisation (leukray.ops.stain) on constructed images with known answers."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from leukray.config import PreprocessConfig
from leukray.errors import ConfigError
from leukray.ops import stain
from leukray.ops.preprocess import fit_stain_target, preprocess_image

# Two Giemsa-like stains as unit optical-density vectors (R, G, B absorbance): a basic
# nuclear dye absorbing red and green (blue-purple), and eosin absorbing green (pink).
NUCLEAR = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])


def two_stain_image(rng: np.random.Generator, side: int = 96, black_border: int = 0) -> np.ndarray:
    """A side x side field whose pixels mix the two stains with random concentrations
    (Beer-Lambert: I = 256 exp(-V c) - 1), optionally padded with black like a C-NMC crop."""
    stains = np.stack([NUCLEAR / np.linalg.norm(NUCLEAR), EOSIN / np.linalg.norm(EOSIN)], axis=1)
    conc = rng.uniform(0.0, 1.0, size=(side * side, 2)) * np.array([1.6, 0.9])
    # a third of the pixels carry one stain alone, as nuclei and red cells do
    conc[: side * side // 6, 1] = 0.0
    conc[side * side // 6 : side * side // 3, 0] = 0.0
    conc[:, :] += 0.2 * rng.random((side * side, 1))  # keep every pixel stained
    rgb = np.clip(np.rint(256.0 * np.exp(-conc @ stains.T) - 1.0), 0, 255).astype(np.uint8)
    image = rgb.reshape(side, side, 3)
    if black_border:
        image = cv2.copyMakeBorder(image, *(black_border,) * 4, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    return image


def lab_stats(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)[mask].astype(np.float64)
    return np.concatenate([lab.mean(axis=0), lab.std(axis=0)])


def test_reinhard_gives_the_target_means_and_keeps_the_background():
    rng = np.random.default_rng(0)
    image = np.zeros((80, 80, 3), np.uint8)
    image[20:60, 20:60] = rng.integers(60, 200, size=(40, 40, 3))  # a "cell" on black padding
    image[:5, :] = 250  # and a strip of bright plasma
    target = np.array([45.0, 30.0, -25.0, 8.0, 6.0, 5.0])
    out = stain.reinhard_normalise(image, target)
    stained = stain.stained_mask(image)
    assert stained[20:60, 20:60].all() and not stained[:5].any() and not stained[70:].any()
    np.testing.assert_allclose(lab_stats(out, stained), target, atol=0.6)
    # black padding and unstained background are untouched
    assert (out[~stained] == image[~stained]).all()


def test_reinhard_toward_a_fitted_target_matches_the_reference():
    rng = np.random.default_rng(1)
    reference = two_stain_image(rng)
    source = np.clip(two_stain_image(rng).astype(np.int16) + np.array([25, -20, 30]), 0, 255).astype(np.uint8)
    target = stain.fit_target("reinhard", [reference])
    out = stain.normalise(source, "reinhard", target)
    np.testing.assert_allclose(lab_stats(out, stain.stained_mask(source))[:3], target[:3], atol=1.0)
    assert abs(lab_stats(source, stain.stained_mask(source))[2] - target[2]) > 5  # it did move


def test_macenko_recovers_the_two_stain_vectors_despite_black_padding():
    image = two_stain_image(np.random.default_rng(2), black_border=60)  # most of it is black
    target = stain.macenko_stains([image])
    stains = target[:6].reshape(3, 2, order="F")
    nuclear, eosin = NUCLEAR / np.linalg.norm(NUCLEAR), EOSIN / np.linalg.norm(EOSIN)
    assert stains[:, 0] @ nuclear > 0.99  # the first column is the nuclear (red-absorbing) dye
    assert stains[:, 1] @ eosin > 0.99
    assert (target[6:] > 0).all()


def test_macenko_maps_one_stain_pair_onto_another():
    rng = np.random.default_rng(3)
    reference = two_stain_image(rng)
    # the same tissue stained with a bluer nuclear dye: a different stain matrix
    bluer = np.array([0.75, 0.55, 0.10])
    stains = np.stack([bluer / np.linalg.norm(bluer), EOSIN / np.linalg.norm(EOSIN)], axis=1)
    conc = rng.uniform(0.05, 1.0, size=(96 * 96, 2))
    source = np.clip(np.rint(256.0 * np.exp(-conc @ stains.T) - 1.0), 0, 255).astype(np.uint8).reshape(96, 96, 3)
    target = stain.fit_target("macenko", [reference])
    out = stain.normalise(source, "macenko", target)
    refit = stain.macenko_stains([out])[:6].reshape(3, 2, order="F")
    assert refit[:, 0] @ (NUCLEAR / np.linalg.norm(NUCLEAR)) > 0.99
    assert stain.macenko_stains([source])[:3] @ (NUCLEAR / np.linalg.norm(NUCLEAR)) < 0.98


def test_too_few_stained_pixels_is_a_stain_error():
    with pytest.raises(stain.StainError, match="stained pixels"):
        stain.fit_target("reinhard", [np.full((40, 40, 3), 250, np.uint8)])


def test_target_text_round_trips_and_the_config_checks_its_length():
    target = np.array([45.0, 30.5, -25.25, 8.0, 6.0, 5.0])
    np.testing.assert_allclose(stain.parse_target("reinhard", stain.format_target(target)), target)
    with pytest.raises(stain.StainError, match="8 finite numbers"):
        stain.parse_target("macenko", stain.format_target(target))
    with pytest.raises(ConfigError, match="stain_target must be 8"):
        PreprocessConfig(stain="macenko", stain_target="1,2,3")
    with pytest.raises(ConfigError, match="preprocess.stain must be one of"):
        PreprocessConfig(stain="vahadane")


def test_preprocessing_normalises_before_the_crop_and_fits_its_target(tmp_path):
    rng = np.random.default_rng(4)
    cell = two_stain_image(rng, side=64, black_border=40)
    path = tmp_path / "cell.png"
    cv2.imwrite(str(path), cv2.cvtColor(cell, cv2.COLOR_RGB2BGR))
    cfg = fit_stain_target([str(path)], PreprocessConfig(size=64, stain="reinhard"), lambda p: open(p, "rb").read())
    assert len(stain.parse_target("reinhard", cfg.stain_target)) == 6
    shifted = dataclasses.replace(cfg, stain_target=stain.format_target([70, 0, 0, 5, 3, 3]))
    crop = preprocess_image(cell, shifted)
    inside = crop.max(axis=2) > stain.BLACK_LEVEL
    assert abs(lab_stats(crop, inside)[0] - 70) < 3  # the crop carries the target's lightness
    assert (crop[~inside] <= stain.BLACK_LEVEL).all()
