"""Probability calibration of a two-class model: Platt scaling (Platt 1999, "Probabilistic
outputs for support vector machines"), a logistic regression on the model's log-odds,
fitted on out-of-fold predictions and stored in bundle.json as two numbers.

Platt's two parameters suit the few annotated cells a smear classifier has (isotonic
regression needs far more); his smoothed targets, (N+ + 1) / (N+ + 2) for positives and
1 / (N- + 2) for negatives, keep a small, separable set from pushing the slope to infinity.

May import: numpy, scikit-learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METHOD = "platt"
EPSILON = 1e-6  # probabilities are clipped to [EPSILON, 1 - EPSILON] before the log-odds


def log_odds(prob: np.ndarray) -> np.ndarray:
    prob = np.clip(np.asarray(prob, np.float64), EPSILON, 1 - EPSILON)
    return np.log(prob / (1 - prob))


def fit_platt(prob: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Platt's calibration of `prob` (N,) P(positive) against `truth` (N,) bool.

    Returns:
        {"method": "platt", "slope": a, "intercept": b, "cells": N}: calibrated
        P = 1 / (1 + exp(-(a * logit(prob) + b))).

    Raises:
        ValueError: `truth` holds one class only.
    """
    from sklearn.linear_model import LogisticRegression

    truth = np.asarray(truth, bool)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if not positives or not negatives:
        raise ValueError(f"calibration needs both classes, got {positives} positive and {negatives} negative")
    target = np.where(truth, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    x = log_odds(prob).reshape(-1, 1)
    # each cell twice, as a positive weighted by its target and as a negative by the rest:
    # the cross-entropy against the smoothed targets
    model = LogisticRegression(C=np.inf, max_iter=1000).fit(
        np.vstack([x, x]), np.r_[np.ones(len(x)), np.zeros(len(x))], sample_weight=np.r_[target, 1 - target]
    )
    return {
        "method": METHOD,
        "slope": float(model.coef_[0, 0]),
        "intercept": float(model.intercept_[0]),
        "cells": len(x),
    }


def apply_calibration(prob: np.ndarray, calibration: dict[str, Any]) -> np.ndarray:
    """`prob` (N,) P(positive) mapped through a calibration `fit_platt` returned."""
    z = calibration["slope"] * log_odds(prob) + calibration["intercept"]
    return 1.0 / (1.0 + np.exp(-z))


def malformed(calibration: Any) -> str:
    """What is wrong with a stored calibration ("" when nothing)."""
    if not isinstance(calibration, dict) or calibration.get("method") != METHOD:
        return f"`calibration` must be an object with method {METHOD!r}"
    for key in ("slope", "intercept"):
        value = calibration.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            return f"`calibration.{key}` must be a finite number"
    return ""
