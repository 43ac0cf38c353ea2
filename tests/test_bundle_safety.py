"""A model bundle cannot run code on load, and with a key it cannot be edited unnoticed.

Each attack plants a payload whose only effect would be to create a marker file, with a
bundle.json whose sha256 list matches the planted file (what an attacker who can write the
bucket would do); the test checks that loading is refused with one line and the marker
never appears.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from leukray.config import PreprocessConfig
from leukray.models.bundle import CLASSIFIER_FILE, KEY_ENV, BundleError, load_bundle, save_bundle


class Payload:
    """Pickling this object makes unpickling create `marker` (stands in for os.system)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_bundle(model_dir: Path) -> Path:
    """A small real bundle: a fitted logistic regression on 8-d features, a tiny 'trunk' state."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    classifier = Pipeline([("scaler", StandardScaler()), ("classifier", LogisticRegression())])
    classifier.fit(x, (x[:, 0] > 0).astype(int))
    save_bundle(
        str(model_dir),
        classes=["hem", "all"],
        positive_label="all",
        preprocess=PreprocessConfig(size=64),
        weights={
            "kind": "random",
            "name": "random-init",
            "source": "torch.manual_seed(0)",
            "sha256": "",
            "is_pretrained": False,
        },
        weights_seed=0,
        feature_source="trunk",
        classifier_name="LogisticRegression",
        classifier=classifier,
        trunk_state={"conv1.weight": np.zeros(3)},
    )
    return model_dir


def rehash(model_dir: Path, name: str) -> None:
    """Make bundle.json list the planted file's real sha256, as an attacker would."""
    manifest = json.loads((model_dir / "bundle.json").read_text())
    manifest["files"][name] = hashlib.sha256((model_dir / name).read_bytes()).hexdigest()
    (model_dir / "bundle.json").write_text(json.dumps(manifest))


@pytest.fixture()
def bundle(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    return write_bundle(tmp_path / "model")


def test_an_intact_bundle_loads_and_predicts_like_the_fitted_model(bundle):
    loaded = load_bundle(str(bundle))
    x = np.random.default_rng(1).normal(size=(5, 8))
    probs = loaded.classifier.predict_proba(x)
    assert probs.shape == (5, 2) and np.allclose(probs.sum(axis=1), 1.0)
    assert not (bundle / "classifier.pkl").exists()  # no pickle is written at all


def test_a_skops_file_naming_an_untrusted_type_is_refused_before_it_is_built(bundle, tmp_path):
    import skops.io

    marker = tmp_path / "ran"
    (bundle / CLASSIFIER_FILE).write_bytes(skops.io.dumps({"model": Payload(str(marker))}))
    rehash(bundle, CLASSIFIER_FILE)
    with pytest.raises(BundleError, match="does not trust") as refused:
        load_bundle(str(bundle))
    assert "test_bundle_safety.Payload" in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists()


def test_a_format_1_pickle_bundle_is_refused_without_unpickling(bundle, tmp_path):
    marker = tmp_path / "ran"
    (bundle / "classifier.pkl").write_bytes(pickle.dumps(Payload(str(marker))))
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["format"] = 1
    manifest["files"] = {"classifier.pkl": hashlib.sha256((bundle / "classifier.pkl").read_bytes()).hexdigest()}
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format 1 bundles hold a pickled classifier"):
        load_bundle(str(bundle))
    assert not marker.exists()


def test_a_garbage_classifier_file_is_one_line(bundle):
    (bundle / CLASSIFIER_FILE).write_bytes(b"not a zip file at all")
    rehash(bundle, CLASSIFIER_FILE)
    with pytest.raises(BundleError, match="not a readable skops file"):
        load_bundle(str(bundle))


def test_with_a_key_an_edited_bundle_json_or_an_unsigned_bundle_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "s3cret")
    model_dir = write_bundle(tmp_path / "signed")
    assert json.loads((model_dir / "bundle.json").read_text())["signature"]
    load_bundle(str(model_dir))  # signed and intact

    edited = tmp_path / "edited"
    shutil.copytree(model_dir, edited)
    manifest = json.loads((edited / "bundle.json").read_text())
    manifest["positive_label"] = "hem"  # no file changes: only the sha256 list would not notice
    (edited / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="signature does not match"):
        load_bundle(str(edited))

    monkeypatch.setenv(KEY_ENV, "another key")
    with pytest.raises(BundleError, match="signature does not match"):
        load_bundle(str(model_dir))

    monkeypatch.delenv(KEY_ENV)
    unsigned = write_bundle(tmp_path / "unsigned")
    monkeypatch.setenv(KEY_ENV, "s3cret")
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(str(unsigned))
