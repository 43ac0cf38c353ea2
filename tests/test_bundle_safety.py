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


def listed(model_dir: Path, name: str) -> Path:
    """Where bundle.json says `name` is (its generation folder)."""
    files = json.loads((model_dir / "bundle.json").read_text())["files"]
    (key,) = [k for k in files if k.rsplit("/", 1)[-1] == name]
    return model_dir / key


def rehash(model_dir: Path, name: str) -> None:
    """Make bundle.json list the planted file's real sha256, as an attacker would."""
    manifest = json.loads((model_dir / "bundle.json").read_text())
    key = str(listed(model_dir, name).relative_to(model_dir))
    manifest["files"][key] = hashlib.sha256((model_dir / key).read_bytes()).hexdigest()
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
    listed(bundle, CLASSIFIER_FILE).write_bytes(skops.io.dumps({"model": Payload(str(marker))}))
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
    listed(bundle, CLASSIFIER_FILE).write_bytes(b"not a zip file at all")
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


def _edit(model_dir: Path, change) -> None:
    manifest = json.loads((model_dir / "bundle.json").read_text())
    (model_dir / "bundle.json").write_text(json.dumps(change(manifest)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: {k: v for k, v in m.items() if k != "files"}, "no `files` table"),
        (lambda m: {**m, "files": list(m["files"])}, "no `files` table"),
        (lambda m: {**m, "files": {"../../../etc/passwd": "0" * 64}}, "'../../../etc/passwd'"),
        (lambda m: {**m, "files": {k: "not-a-hash" for k in m["files"]}}, "with a sha256"),
        (lambda m: {k: v for k, v in m.items() if k != "classes"}, "`classes` missing"),
        (lambda m: {**m, "positive_label": "blast"}, "the positive label among them"),
        (lambda m: {**m, "preprocess": {**m["preprocess"], "size": "big"}}, "preprocess"),
        (lambda m: {**m, "feature_source": "magic"}, "unknown feature source 'magic'"),
        (lambda m: {**m, "files": {k: v for k, v in m["files"].items() if "trunk" in k}}, "lacks classifier.skops"),
        (lambda m: [m], "a list, not an object"),
    ],
)
def test_a_malformed_bundle_json_is_one_line(bundle, change, message):
    _edit(bundle, change)
    with pytest.raises(BundleError) as refused:
        load_bundle(str(bundle))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_previous_bundle_stays_loadable_until_the_new_one_is_complete(bundle, monkeypatch):
    from leukray.models import bundle as bundle_module

    x = np.random.default_rng(2).normal(size=(4, 8))
    before = load_bundle(str(bundle)).classifier.predict_proba(x)
    old_json = (bundle / "bundle.json").read_bytes()
    real_write_text = bundle_module.storage.write_text

    def crash_on_bundle_json(path, text):
        if path.endswith("bundle.json"):
            raise OSError("killed before bundle.json was written")
        real_write_text(path, text)

    monkeypatch.setattr(bundle_module.storage, "write_text", crash_on_bundle_json)
    with pytest.raises(OSError):
        write_bundle(bundle)  # all the new files are written, then the job dies
    assert len(list(bundle.glob("v-*"))) == 2  # the new generation sits beside the old one
    assert (bundle / "bundle.json").read_bytes() == old_json
    np.testing.assert_array_equal(load_bundle(str(bundle)).classifier.predict_proba(x), before)

    monkeypatch.setattr(bundle_module.storage, "write_text", real_write_text)
    write_bundle(bundle)  # a complete rewrite switches over and removes both older generations
    generations = list(bundle.glob("v-*"))
    files = json.loads((bundle / "bundle.json").read_text())["files"]
    assert len(generations) == 1 and all(k.startswith(generations[0].name + "/") for k in files)
    np.testing.assert_array_equal(load_bundle(str(bundle)).classifier.predict_proba(x), before)


def test_a_remote_bundles_cached_trunk_is_rehashed_before_reuse(tmp_path):
    from leukray.models.bundle import _local_trunk_copy

    data = b"the trunk's state dict"
    digest = hashlib.sha256(data).hexdigest()
    path = Path(_local_trunk_copy(digest, data))
    assert path.read_bytes() == data and digest in path.name  # the loader checks the file against its name
    path.write_bytes(b"planted by someone else")  # a predictable name must not mean a trusted file
    assert Path(_local_trunk_copy(digest, data)).read_bytes() == data
    assert oct(path.parent.stat().st_mode & 0o777) == oct(0o700)
