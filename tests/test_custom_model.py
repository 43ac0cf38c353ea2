"""The custom ResNet50 (Table II): its size, a run that trains it, the bundle (Ray Train's
training, resume and reproducibility: tests/test_training.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from leukray.cli import main
from leukray.io.tables import SCHEMA_VERSION
from leukray.models.bundle import BundleError, load_bundle
from leukray.models.head import (
    TABLE_II_HEAD_PARAMETERS,
    PaperHead,
    head_in_features,
    keras_parameter_count,
    map_shape,
    trunk_prefix,
    trunk_suffix,
)
from leukray.models.trunk import build_trunk
from leukray.stages.predict import PREDICTION_COLUMNS


class TestModel:
    def test_head_size_is_table_ii(self):
        head = PaperHead(head_in_features(224))
        assert head_in_features(224) == 100_352  # Flatten of 7x7x2048
        assert keras_parameter_count(head) == TABLE_II_HEAD_PARAMETERS == 75_503_489 - 23_587_712
        # The paper's trunk count, 23,587,712, is Keras' ResNet50, whose convolutions carry
        # biases; torchvision's do not. Adding one bias per conv output channel recovers it.
        trunk = torch.nn.Sequential(*list(build_trunk(None).children())[:-2])
        conv_biases = sum(m.out_channels for m in trunk.modules() if isinstance(m, torch.nn.Conv2d))
        assert keras_parameter_count(trunk) + conv_biases == 23_587_712

    def test_multiclass_head_has_softmax_output(self):
        head = PaperHead(2048, num_classes=4).eval()
        logits = head(torch.rand(3, 2048, 1, 1))
        assert logits.shape == (3, 4)
        assert torch.allclose(head.probabilities(logits).sum(dim=1), torch.ones(3))
        binary = PaperHead(2048).eval()
        assert binary(torch.rand(3, 2048, 1, 1)).shape == (3,)

    @pytest.mark.parametrize("stages", [0, 1, 2])
    def test_prefix_then_suffix_is_the_trunk(self, stages):
        trunk = build_trunk(None, seed=1).eval()
        x = torch.rand(2, 3, 64, 64)
        maps = trunk_prefix(trunk, stages)(x)
        assert tuple(maps.shape[1:]) == map_shape(64, stages)
        full = torch.flatten(trunk.avgpool(trunk_suffix(trunk, stages)(maps)), 1)
        assert torch.allclose(full, trunk(x), atol=1e-5)


FAST = [
    "--weights", "random", "--preprocess.size", "64", "--extract.batch_size", "16",
    "--classifiers", "LogisticRegression,GaussianNB,KNeighborsClassifier",
    "--sweep.tune_trials", "0",
    "--train.epochs", "2", "--train.batch_size", "16",
    "--features", "resnet50", "--sweep.cv_folds", "0",  # Tables III and IV as the paper has them, chosen on val
]  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(ray_local, tiny_cells, tmp_path_factory):
    out = tmp_path_factory.mktemp("custom") / "run"
    assert main(["run", "--data", str(tiny_cells), "--out", str(out), *FAST]) == 0
    return out


@pytest.mark.slow
class TestRunWithCustomModel:
    def test_both_tables_history_and_predictions(self, trained_run):
        trunk = pd.read_csv(trained_run / "leaderboard.csv")
        custom = pd.read_csv(trained_run / "custom_leaderboard.csv")
        assert list(trunk.columns) == list(custom.columns) and len(custom) == 3
        history = pd.read_csv(trained_run / "history.csv")
        assert history["epoch"].tolist() == [1, 2]
        assert {"train_loss", "val_loss", "train_balanced_accuracy", "val_balanced_accuracy"} <= set(history.columns)
        features = pd.read_parquet(trained_run / "custom_features.parquet")
        assert len(np.stack(features["features"])[0]) == 256
        predictions = pd.read_parquet(trained_run / "predictions.parquet")
        manifest = pd.read_parquet(trained_run / "manifest.parquet")
        assert sorted(predictions["path"]) == sorted(manifest.loc[manifest["split"] == "test", "path"])
        assert predictions["prob_all"].between(0, 1).all()
        summary = json.loads((trained_run / "summary.json").read_text())
        assert summary["chosen_model"]["chosen_by"] == "validation balanced accuracy"
        assert summary["chosen_model"]["feature_source"] in ("trunk", "custom", "head")
        assert set(summary["inference_seconds_per_image"]) >= {"decode_preprocess", "trunk"}

    def test_report_has_both_tables_and_figures(self, trained_run):
        html = (trained_run / "report.html").read_text()
        assert "Table III" in html and "Table IV" in html
        assert html.count("data:image/png;base64,") >= 4
        assert (trained_run / "report.md").is_file() and list((trained_run / "figures").glob("*.png"))

    def test_bundle_round_trip_in_a_fresh_process(self, trained_run, tmp_path):
        out = tmp_path / "preds.parquet"
        test_dir = tmp_path / "test-images"
        predictions = pd.read_parquet(trained_run / "predictions.parquet")
        for path in predictions["path"]:
            target = test_dir / os.path.basename(os.path.dirname(path)) / os.path.basename(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        (test_dir / "notes.txt").write_text("not an image")
        result = subprocess.run(
            [sys.executable, "-m", "leukray.cli", "predict",
             "--model", str(trained_run / "model"), "--data", str(test_dir), "--out", str(out)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        fresh = pd.read_parquet(out)
        assert fresh.loc[fresh["path"].str.endswith("notes.txt"), "error"].str.contains("not an image").all()
        fresh = fresh[fresh["error"] == ""].assign(name=lambda f: f["path"].map(os.path.basename))
        merged = predictions.assign(name=predictions["path"].map(os.path.basename)).merge(
            fresh, on="name", suffixes=("", "_new")
        )
        assert len(merged) == len(predictions)
        # the same probabilities, up to float32 rounding of batched CPU convolutions (the images
        # are batched differently here than in the run)
        np.testing.assert_allclose(merged["prob_all"], merged["prob_all_new"], atol=2e-3)
        clear = (merged["prob_all"] - 0.5).abs() > 2e-3  # within the tolerance of 0.5 a label may flip
        assert clear.sum() >= len(merged) // 2
        assert (merged.loc[clear, "predicted_label"] == merged.loc[clear, "predicted_label_new"]).all()
        assert (merged["label"] == merged["label_new"]).all()  # labels read from the folder names
        # one column set and one provenance for `run`'s and `predict`'s predictions
        assert list(pd.read_parquet(out).columns) == list(predictions.columns) == PREDICTION_COLUMNS
        run_meta, new_meta = (
            json.loads(pq.read_schema(p).metadata[b"leukray"]) for p in (trained_run / "predictions.parquet", out)
        )
        assert run_meta["schema_version"] == new_meta["schema_version"] == SCHEMA_VERSION
        assert run_meta["positive_label"] == new_meta["positive_label"] == "all"
        assert run_meta["classes"] == new_meta["classes"] == ["hem", "all"]

    def test_tampered_bundle_is_refused(self, trained_run, tmp_path):
        bundle = tmp_path / "model"
        shutil.copytree(trained_run / "model", bundle)
        load_bundle(str(bundle))  # intact: loads
        manifest = json.loads((bundle / "bundle.json").read_text())
        victim = bundle / sorted(manifest["files"])[0]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        with pytest.raises(BundleError, match="was modified"):
            load_bundle(str(bundle))
        result = subprocess.run(
            [sys.executable, "-m", "leukray.cli", "predict",
             "--model", str(bundle), "--data", str(tmp_path), "--out", str(tmp_path / "p.parquet")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().startswith("leukray: error: model bundle") and "refusing" in result.stderr
