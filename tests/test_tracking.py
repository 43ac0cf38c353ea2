"""`leukray.io.tracking` without Ray: URI resolution, config checks and flattening (the run
logged end to end is in test_run_e2e.py, on the shared tiny run)."""

from __future__ import annotations

import os

import pytest

from leukray.config import build_config
from leukray.errors import ConfigError
from leukray.io import tracking


def test_a_folder_becomes_a_file_uri_and_empty_is_off(tmp_path):
    assert tracking.resolve_uri("") == ""
    assert tracking.resolve_uri(str(tmp_path / "mlruns")) == "file:" + str(tmp_path / "mlruns")
    assert tracking.resolve_uri("relative/store") == "file:" + os.path.abspath("relative/store")
    assert tracking.resolve_uri("http://mlflow:5000") == "http://mlflow:5000"
    assert tracking.resolve_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_env_takes_the_environment_and_says_when_it_is_unset(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert tracking.resolve_uri("env") == "http://tracker:5000"
    assert build_config(overrides={"tracking.mlflow": "env"}).tracking.mlflow == "env"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI is not set"):
        build_config(overrides={"tracking.mlflow": "env"})


def test_an_empty_experiment_name_is_refused():
    with pytest.raises(ConfigError, match="tracking.experiment"):
        build_config(overrides={"tracking.mlflow": "/tmp/x", "tracking.experiment": " "})


def test_config_flattens_to_dotted_params():
    flat = tracking.flatten(build_config().to_dict())
    assert flat["train.epochs"] == "50" and flat["tracking.experiment"] == "leukray"
    assert all(isinstance(v, str) and len(v) <= tracking.MAX_PARAM_CHARS for v in flat.values())


def test_metrics_keep_finite_numbers_only():
    summary = {
        "chosen_model": {"test": {"roc_auc": 0.7, "f1": float("nan")}, "cv_balanced_accuracy": None},
        "seconds": {"total": 12.5},
    }
    assert tracking.run_metrics(summary) == {"test_roc_auc": 0.7, "seconds_total": 12.5}
