"""Platt calibration (`leukray.models.calibration`) and a bundle that carries one: fitted
on constructed miscalibrated probabilities, applied by `Bundle.probabilities`, refused when
malformed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leukray.config import CELL_FAMILIES, PreprocessConfig
from leukray.models.bundle import BundleError, load_bundle, save_bundle
from leukray.models.calibration import apply_calibration, fit_platt, log_odds
from leukray.ops.cellfeatures import feature_dim


def overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reported probabilities, truth): the true P(positive) is sigmoid(z), the model reports
    sigmoid(2 z + 1), i.e. twice the log-odds, shifted: Platt's answer is slope 0.5,
    intercept -0.5."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    truth = rng.random(n) < 1 / (1 + np.exp(-z))
    return 1 / (1 + np.exp(-(2 * z + 1))), truth


def test_platt_recovers_a_known_miscalibration_and_improves_the_brier_score():
    prob, truth = overconfident(20_000, seed=0)
    calibration = fit_platt(prob, truth)
    assert calibration["method"] == "platt" and calibration["cells"] == 20_000
    assert calibration["slope"] == pytest.approx(0.5, abs=0.03)
    assert calibration["intercept"] == pytest.approx(-0.5, abs=0.05)
    fixed = apply_calibration(prob, calibration)
    assert np.mean((fixed - truth) ** 2) < np.mean((prob - truth) ** 2)
    assert np.all(np.diff(fixed[np.argsort(prob)]) >= 0)  # monotone: cell rankings are kept
    # Platt's smoothed targets keep a separable set finite (plain logistic regression diverges)
    separable = fit_platt(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True]))
    assert 0 < separable["slope"] < 10 and np.isfinite(separable["intercept"])
    with pytest.raises(ValueError, match="both classes"):
        fit_platt(np.array([0.2, 0.7]), np.array([True, True]))
    assert log_odds(np.array([0.0, 1.0])).tolist() == pytest.approx([-13.8155, 13.8155], abs=1e-3)


def cell_bundle(model_dir, calibration=None) -> np.ndarray:
    """A bundle on the hand-crafted cell features (no trunk) with `calibration` in
    bundle.json; returns seeded features to classify."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, feature_dim(CELL_FAMILIES)))
    classifier = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    save_bundle(
        str(model_dir), classes=["hem", "all"], positive_label="all", preprocess=PreprocessConfig(size=64),
        weights={"kind": "none", "name": "none", "source": "", "sha256": "", "is_pretrained": False},
        weights_seed=0, feature_source="+".join(CELL_FAMILIES), classifier_name="LogisticRegression",
        classifier=classifier, extra={"calibration": calibration} if calibration else None,
    )  # fmt: skip
    return x[:10]


def test_a_bundle_applies_its_calibration_and_refuses_a_malformed_one(tmp_path):
    x = cell_bundle(tmp_path / "plain")
    raw = load_bundle(str(tmp_path / "plain")).probabilities(None, None, x)
    calibration = {"method": "platt", "slope": 0.5, "intercept": -0.25, "cells": 80}
    cell_bundle(tmp_path / "calibrated", calibration)
    bundle = load_bundle(str(tmp_path / "calibrated"))
    assert bundle.calibration == calibration
    probs = bundle.probabilities(None, None, x)
    assert probs[:, 1] == pytest.approx(apply_calibration(raw[:, 1], calibration))
    assert probs.sum(axis=1) == pytest.approx(np.ones(len(x)))
    assert not np.allclose(probs, raw)

    manifest = json.loads((tmp_path / "calibrated" / "bundle.json").read_text())
    manifest["calibration"]["slope"] = "steep"
    (tmp_path / "calibrated" / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"calibration\.slope. must be a finite number") as refused:
        load_bundle(str(tmp_path / "calibrated"))
    assert "\n" not in str(refused.value)
