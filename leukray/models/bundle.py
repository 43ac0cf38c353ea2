"""The model bundle (`RUN/model/`): everything needed to classify new images, and nothing
loaded before it is verified.

Files:
  bundle.json          preprocessing parameters, trunk weights reference (name + sha256),
                       head config, chosen classifier and its feature source, label names,
                       versions, and the sha256 of every other file in the bundle;
  custom_resnet50.pt   the custom model's state dict (torch.save; loaded weights_only);
  trunk.pt             the trunk's state dict when it is not torchvision's ImageNet file;
  classifier.skops     the fitted scikit-learn pipeline in skops' format, loaded with an
                       explicit list of trusted types (`TRUSTED_TYPES`): a file naming any
                       other type is refused before anything of it is built, so a bundle
                       cannot run code on load (pickle, which format 1 used, can).

Integrity: every file's sha256 is in bundle.json and checked before anything is read. When
`LEUKRAY_BUNDLE_KEY` is set, bundle.json also carries an HMAC-SHA256 over its own content
(and so over every file's hash) made with that key, and loading requires a valid one: then
neither the files nor bundle.json (preprocessing, classes, ...) can be changed unnoticed.

Preprocessing travels with the model (STYLE 5), so `predict` cannot drift from training.

May import: torch, numpy, `leukray.config`, `leukray.errors`, `leukray.io`, `leukray.models.*`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from leukray import __version__
from leukray.config import CELL_FAMILIES, PreprocessConfig, parse_feature_sets
from leukray.errors import ConfigError, LeukrayError
from leukray.io import storage
from leukray.models.classifiers import positive_index

BUNDLE_FILE = "bundle.json"
FORMAT_VERSION = 2  # 1 stored the classifier as a pickle
KEY_ENV = "LEUKRAY_BUNDLE_KEY"
CLASSIFIER_FILE = "classifier.skops"
# Beyond skops' own defaults (numpy, scipy and scikit-learn estimators), the types the sweep's
# fitted pipelines hold; nothing else is ever built from a bundle.
TRUSTED_TYPES = [
    "collections.OrderedDict",
    "lightgbm.basic.Booster",
    "lightgbm.sklearn.LGBMClassifier",
    "numpy.dtype",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.feature_selection._univariate_selection.f_classif",  # a searched SelectKBest's score
    "sklearn.tree._tree.Tree",
    "sklearn.utils._bunch.Bunch",  # a soft-voting ensemble's named_estimators_
    "xgboost.core.Booster",
    "xgboost.sklearn.XGBClassifier",
]
MODEL_SOURCES = ("custom", "head")  # the custom model's embeddings, or its own sigmoid


class BundleError(LeukrayError):
    """A model bundle is missing, incomplete or fails its integrity check."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_bundle(
    model_dir: str,
    *,
    classes: list[str],
    positive_label: str,
    preprocess: PreprocessConfig,
    weights: dict[str, Any],
    weights_seed: int,
    feature_source: str,
    classifier_name: str,
    classifier: Any = None,
    head_config: dict[str, Any] | None = None,
    trunk_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write the bundle (custom_resnet50.pt must already be in `model_dir` when the feature
    source is custom or head). Returns the path of bundle.json."""
    import torch

    families = source_families(feature_source)  # raises ValueError on an unknown source
    files: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(model_dir, name), data)
        files[name] = sha256_bytes(data)

    if classifier is not None:
        import skops.io

        put(CLASSIFIER_FILE, skops.io.dumps(classifier))
    if weights["kind"] != "imagenet":
        if trunk_state is None:
            raise ValueError("a bundle with non-ImageNet weights must carry trunk_state")
        buffer = io.BytesIO()
        torch.save(trunk_state, buffer)
        put("trunk.pt", buffer.getvalue())
    if feature_source in ("custom", "head"):
        files["custom_resnet50.pt"] = sha256_bytes(storage.read_bytes(storage.join(model_dir, "custom_resnet50.pt")))
    manifest = {
        "format": FORMAT_VERSION,
        "classes": classes,
        "positive_label": positive_label,
        "preprocess": dataclasses.asdict(preprocess),
        "weights": weights,
        "weights_seed": weights_seed,
        "feature_source": feature_source,
        "features": "+".join(families) if families else feature_source,
        "cell_families": [f for f in families if f in CELL_FAMILIES],
        "classifier": classifier_name,
        "head_config": head_config,
        "files": files,
        "versions": _versions(),
        **(extra or {}),
    }
    if os.environ.get(KEY_ENV):
        manifest["signature"] = _signature(manifest, os.environ[KEY_ENV])
    path = storage.join(model_dir, BUNDLE_FILE)
    storage.write_text(path, json.dumps(manifest, indent=2) + "\n")  # written last: a bundle without it is not a bundle
    return path


@dataclass
class Bundle:
    """A verified bundle, ready to classify crops."""

    model_dir: str
    manifest: dict[str, Any]
    preprocess: PreprocessConfig
    classes: list[str]
    positive_label: str
    feature_source: str
    trunk_weights: str  # spec for FeatureExtractor: imagenet:VARIANT or a local file
    maps_stage: int
    custom_model: Any = None
    classifier: Any = None

    @property
    def positive_index(self) -> int:
        return positive_index(self.classes, self.positive_label)

    @property
    def cell_families(self) -> tuple[str, ...]:
        """The hand-crafted families preprocessing must measure for this model."""
        return tuple(self.manifest.get("cell_families", ()))

    @property
    def needs_trunk(self) -> bool:
        return self.feature_source in MODEL_SOURCES or "resnet50" in source_families(self.feature_source)

    def probabilities(
        self, features: np.ndarray | None, maps: np.ndarray | None, cell_features: np.ndarray | None = None
    ) -> np.ndarray:
        """Class probabilities (N x C) from trunk features (N x 2048) and/or cell features
        (N x D), or from trunk maps."""
        import torch

        if self.feature_source not in MODEL_SOURCES:
            inputs = classifier_input(source_families(self.feature_source), features, cell_features)
            return np.asarray(self.classifier.predict_proba(inputs), dtype=np.float64)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(maps)).float()
            if self.feature_source == "head":
                return self.custom_model.head.probabilities(self.custom_model(x)).double().numpy()
            embedded = self.custom_model.embed(x, self.manifest["head_config"]["embedding"]).float().numpy()
        return np.asarray(self.classifier.predict_proba(embedded), dtype=np.float64)


def source_families(source: str) -> tuple[str, ...]:
    """The feature families a classifier source reads: `trunk` is the ResNet50 features
    alone; a feature set names its families (`morphology+colour+texture`); the custom
    model's sources read none of them.

    Raises:
        ValueError: an unknown source.
    """
    if source in MODEL_SOURCES:
        return ()
    if source == "trunk":
        return ("resnet50",)
    try:
        (families,) = parse_feature_sets(source)
    except (ConfigError, ValueError):
        raise ValueError(f"unknown feature source {source!r}") from None
    return families


def classifier_input(
    families: tuple[str, ...], features: np.ndarray | None, cell_features: np.ndarray | None
) -> np.ndarray:
    """The classifier's input for a feature set: the trunk's features and the set's cell
    features (measured for exactly its families), side by side, as in the sweep."""
    parts = ([features] if "resnet50" in families else []) + (
        [cell_features] if any(f in CELL_FAMILIES for f in families) else []
    )
    return np.hstack(parts) if len(parts) > 1 else parts[0]


def load_bundle(model_dir: str) -> Bundle:
    """Read and verify a bundle: every file's sha256 must match bundle.json before anything
    is deserialised.

    Raises:
        BundleError: missing bundle, missing file or hash mismatch (one line).
    """
    manifest = _read_manifest(storage.join(model_dir, BUNDLE_FILE))
    blobs = _verified_files(model_dir, manifest)
    head_config = manifest.get("head_config")
    custom_model = None
    if manifest["feature_source"] in ("custom", "head"):
        import torch

        from leukray.models.custom import build_custom_model

        state = torch.load(io.BytesIO(blobs["custom_resnet50.pt"]), map_location="cpu", weights_only=True)
        custom_model = build_custom_model(head_config, state=state)
    classifier = _load_classifier(model_dir, blobs[CLASSIFIER_FILE]) if CLASSIFIER_FILE in blobs else None
    return Bundle(
        model_dir=model_dir,
        manifest=manifest,
        preprocess=PreprocessConfig(**manifest["preprocess"]),
        classes=list(manifest["classes"]),
        positive_label=manifest["positive_label"],
        feature_source=manifest["feature_source"],
        trunk_weights=_trunk_spec(model_dir, manifest, blobs),
        maps_stage=head_config["unfreeze_stages"]
        if head_config and manifest["feature_source"] in MODEL_SOURCES
        else -1,
        custom_model=custom_model,
        classifier=classifier,
    )


def _read_manifest(path: str) -> dict[str, Any]:
    if not storage.exists(path):
        raise BundleError(f"not a leukray model bundle: {path} not found")
    try:
        manifest = json.loads(storage.read_bytes(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format")
        hint = (
            "; format 1 bundles hold a pickled classifier, which is not loaded: rerun `leukray tune`"
            if found == 1
            else ""
        )
        raise BundleError(f"{path}: unsupported bundle format {found!r} (this leukray reads {FORMAT_VERSION}){hint}")
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path}: malformed bundle.json (no `files` table)")
    _check_signature(path, manifest)
    return manifest


def _versions() -> dict[str, str]:
    import sklearn
    import torch

    return {
        "leukray": __version__,
        "torch": torch.__version__,
        "scikit-learn": sklearn.__version__,
        "python": platform.python_version(),
    }


def _signature(manifest: dict[str, Any], key: str) -> str:
    """HMAC-SHA256 of bundle.json's content without its `signature` (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key.encode(), canonical, hashlib.sha256).hexdigest()


def _check_signature(path: str, manifest: dict[str, Any]) -> None:
    key = os.environ.get(KEY_ENV, "")
    if not key:
        return
    signature = manifest.get("signature")
    if not isinstance(signature, str):
        raise BundleError(f"{path} is not signed, and {KEY_ENV} is set: refusing to load an unsigned bundle")
    if not hmac.compare_digest(signature, _signature(manifest, key)):
        raise BundleError(f"{path}: signature does not match (modified, or signed with another {KEY_ENV}); refusing it")


def _load_classifier(model_dir: str, blob: bytes) -> Any:
    """The classifier, built only from trusted types (see the module docstring)."""
    import skops.io

    try:
        untrusted = sorted(set(skops.io.get_untrusted_types(data=blob)) - set(TRUSTED_TYPES))
    except Exception as exc:  # noqa: BLE001 - a malformed file of any kind is the bundle's error
        raise BundleError(f"model bundle {model_dir}: {CLASSIFIER_FILE} is not a readable skops file ({exc})") from None
    if untrusted:
        raise BundleError(
            f"model bundle {model_dir}: {CLASSIFIER_FILE} holds types leukray does not trust "
            f"({', '.join(untrusted[:5])}); refusing to load it"
        )
    return skops.io.loads(blob, trusted=TRUSTED_TYPES)


def _verified_files(model_dir: str, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Every file bundle.json lists, read once and checked against its sha256."""
    blobs: dict[str, bytes] = {}
    for name, digest in manifest["files"].items():
        file_path = storage.join(model_dir, name)
        if not storage.exists(file_path):
            raise BundleError(f"model bundle {model_dir} is incomplete: {name} is missing")
        data = storage.read_bytes(file_path)
        if sha256_bytes(data) != digest:
            raise BundleError(
                f"model bundle {model_dir} was modified: {name} does not match its sha256 in {BUNDLE_FILE}; "
                "refusing to load it"
            )
        blobs[name] = data
    return blobs


def _trunk_spec(model_dir: str, manifest: dict[str, Any], blobs: dict[str, bytes]) -> str:
    """The `weights` spec the trunk extractor loads: imagenet:VARIANT (checked against the
    cached file's sha256) or a verified local copy of trunk.pt."""
    weights = manifest["weights"]
    if weights["kind"] == "imagenet":
        from leukray.models.trunk import imagenet_cache_file, sha256_file

        spec = "imagenet:" + weights["name"].split(".")[-1]
        cached = imagenet_cache_file(spec)
        if os.path.exists(cached) and sha256_file(cached) != weights["sha256"]:
            raise BundleError(
                f"the ImageNet weights at {cached} differ from the ones this model was trained with (sha256)"
            )
        return spec
    if storage.is_uri(model_dir):
        # The extractor loads weights from a local file: keep a verified local copy.
        spec = os.path.join(tempfile.gettempdir(), f"leukray-trunk-{manifest['files']['trunk.pt'][:16]}.pt")
        if not os.path.exists(spec):
            storage.write_bytes(spec, blobs["trunk.pt"])
        return spec
    return os.path.join(model_dir, "trunk.pt")
