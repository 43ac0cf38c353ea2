"""The model bundle (`RUN/model/`): everything needed to classify new images, and nothing
loaded before it is verified.

Files:
  bundle.json          preprocessing parameters, trunk weights reference (name + sha256),
                       head config, chosen classifier and its feature source, label names,
                       the decision threshold (`decision_threshold.value`, chosen on
                       out-of-fold predictions), the probability calibration when
                       there is one (`calibration`, Platt scaling), versions, and the sha256 of every other
                       file in the bundle;
  v-<id>/              the files of the current generation (see `save_bundle`):
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
import re
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from leukray import __version__
from leukray.config import CELL_FAMILIES, PreprocessConfig, build_section, parse_feature_sets
from leukray.errors import ConfigError, LeukrayError
from leukray.io import storage
from leukray.models.calibration import apply_calibration
from leukray.models.calibration import malformed as calibration_malformed
from leukray.models.classifiers import positive_index, threshold_labels

BUNDLE_FILE = "bundle.json"
FORMAT_VERSION = 2  # 1 stored the classifier as a pickle
KEY_ENV = "LEUKRAY_BUNDLE_KEY"
CLASSIFIER_FILE = "classifier.skops"
CUSTOM_FILE = "custom_resnet50.pt"
TRUNK_FILE = "trunk.pt"
BUNDLE_FILES = (CLASSIFIER_FILE, CUSTOM_FILE, TRUNK_FILE)
# A listed file: one of BUNDLE_FILES, in the bundle's generation folder (or flat, as older
# bundles wrote them); nothing else, so bundle.json cannot point outside its folder.
FILE_KEY = re.compile(r"^(?:v-[0-9a-f]{12}/)?(?:" + "|".join(re.escape(n) for n in BUNDLE_FILES) + r")$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
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
    "sklearn.utils._bunch.Bunch",  # a soft-voting or stacked ensemble's named_estimators_
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
    custom_state_path: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write the bundle; `custom_state_path` is the custom model's state dict (the train
    stage's file), needed when the feature source is custom or head. Returns the path of
    bundle.json.

    The files go into a new generation folder (`v-<random>/`) and bundle.json, one atomic
    write, switches to them last; only then are the previous generation's files deleted. So
    the previous bundle stays loadable until the new one is complete, on local folders and
    object stores alike."""
    import torch

    families = source_families(feature_source)  # raises ValueError on an unknown source
    files: dict[str, str] = {}
    generation = f"v-{uuid.uuid4().hex[:12]}"

    def put(name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(model_dir, generation, name), data)
        files[f"{generation}/{name}"] = sha256_bytes(data)

    if classifier is not None:
        import skops.io

        put(CLASSIFIER_FILE, skops.io.dumps(classifier))
    if weights["kind"] not in ("imagenet", "none"):  # none: a classifier on cell features alone
        if trunk_state is None:
            raise ValueError("a bundle with non-ImageNet weights must carry trunk_state")
        buffer = io.BytesIO()
        torch.save(trunk_state, buffer)
        put(TRUNK_FILE, buffer.getvalue())
    if feature_source in MODEL_SOURCES:
        if custom_state_path is None:
            raise ValueError(f"a bundle with feature source {feature_source!r} needs custom_state_path")
        put(CUSTOM_FILE, storage.read_bytes(custom_state_path))
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
    _delete_other_generations(model_dir, generation)
    return path


def _delete_other_generations(model_dir: str, keep: str) -> None:
    """The previous bundle's files (a generation folder, or the flat files of older bundles)."""
    stale_dirs = set()
    for name in storage.file_signatures(model_dir):
        top = name.split("/", 1)[0]
        if name in BUNDLE_FILES or (top.startswith("v-") and top != keep):
            storage.delete(storage.join(model_dir, name))
            stale_dirs |= {top} if "/" in name else set()
    if not storage.is_uri(model_dir):  # object stores have no empty folders to remove
        for top in stale_dirs:
            storage.delete_dir(storage.join(model_dir, top))


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
    def decision_threshold(self) -> float | None:
        """The P(positive) at or above which a cell is called positive (bundle.json's
        `decision_threshold.value`, chosen on out-of-fold predictions); None for bundles
        without one and for more than two classes (the most probable class is called)."""
        record = self.manifest.get("decision_threshold")
        if not isinstance(record, dict) or len(self.classes) != 2:
            return None
        return float(record["value"])

    def predicted_labels(self, probs: np.ndarray) -> np.ndarray:
        """Label names (N,) of class probabilities (N x C), at the decision threshold."""
        return threshold_labels(probs, self.classes, self.positive_index, self.decision_threshold)

    @property
    def cell_families(self) -> tuple[str, ...]:
        """The hand-crafted families preprocessing must measure for this model."""
        return tuple(self.manifest.get("cell_families", ()))

    @property
    def needs_trunk(self) -> bool:
        families = source_families(self.feature_source)
        return self.feature_source in MODEL_SOURCES or "resnet50" in families or "trained" in families

    @property
    def calibration(self) -> dict[str, Any] | None:
        """bundle.json's `calibration` (`leukray.models.calibration`: Platt scaling fitted on
        out-of-fold predictions), applied by `probabilities`; None when the bundle has none."""
        record = self.manifest.get("calibration")
        return record if isinstance(record, dict) and len(self.classes) == 2 else None

    def probabilities(
        self, features: np.ndarray | None, maps: np.ndarray | None, cell_features: np.ndarray | None = None
    ) -> np.ndarray:
        """Class probabilities (N x C) from trunk features (N x 2048) and/or cell features
        (N x D), or from trunk maps; calibrated when the bundle carries a calibration."""
        probs = self._model_probabilities(features, maps, cell_features)
        if self.calibration is not None and len(probs):
            positive = apply_calibration(probs[:, self.positive_index], self.calibration)
            probs = np.column_stack([1 - positive, positive] if self.positive_index else [positive, 1 - positive])
        return probs

    def _model_probabilities(
        self, features: np.ndarray | None, maps: np.ndarray | None, cell_features: np.ndarray | None
    ) -> np.ndarray:
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
    # `trained`: the bundle's trunk is the one trained on the cells; its features come as the trunk's do
    parts = ([features] if "resnet50" in families or "trained" in families else []) + (
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

        state = torch.load(io.BytesIO(blobs[CUSTOM_FILE]), map_location="cpu", weights_only=True)
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
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: malformed bundle.json (a {type(manifest).__name__}, not an object)")
    if manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format")
        hint = (
            "; format 1 bundles hold a pickled classifier, which is not loaded: rerun `leukray tune`"
            if found == 1
            else ""
        )
        raise BundleError(f"{path}: unsupported bundle format {found!r} (this leukray reads {FORMAT_VERSION}){hint}")
    problem = _malformed(manifest)
    if problem:
        raise BundleError(f"{path}: malformed bundle.json ({problem})")
    _check_signature(path, manifest)
    return manifest


def _malformed(manifest: dict[str, Any]) -> str:
    """What is wrong with bundle.json's shape ("" when nothing), checked before any of it is used."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "no `files` table"
    for name, digest in files.items():
        if not FILE_KEY.match(str(name)) or not isinstance(digest, str) or not SHA256_HEX.match(digest):
            return f"`files` lists {str(name)[:80]!r}: expected one of {', '.join(BUNDLE_FILES)} with a sha256"
    if len({str(n).rsplit("/", 1)[-1] for n in files}) != len(files):
        return "`files` lists one file twice"
    expected = {"classes": list, "positive_label": str, "preprocess": dict, "weights": dict, "feature_source": str}
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind):
            return f"`{key}` missing or not a {kind.__name__}"
    classes = manifest["classes"]
    if len(classes) < 2 or not all(isinstance(c, str) for c in classes) or manifest["positive_label"] not in classes:
        return "`classes` must name at least two classes, the positive label among them"
    try:
        build_section("preprocess", PreprocessConfig, manifest["preprocess"])
        source_families(manifest["feature_source"])
    except (TypeError, ValueError, ConfigError) as exc:
        return str(exc).splitlines()[0][:200]
    threshold = manifest.get("decision_threshold")
    if threshold is not None and not (
        isinstance(threshold, dict)
        and isinstance(threshold.get("value"), (int, float))
        and not isinstance(threshold.get("value"), bool)
        and 0.0 <= threshold["value"] <= 1.0
    ):
        return "`decision_threshold` must be an object whose `value` is a number in [0, 1]"
    if "calibration" in manifest and calibration_malformed(manifest["calibration"]):
        return calibration_malformed(manifest["calibration"])
    if manifest["weights"].get("kind") not in ("imagenet", "file", "random", "none"):
        return "`weights.kind` must be imagenet, file, random or none (cell features only)"
    needs = {CLASSIFIER_FILE} if manifest["feature_source"] != "head" else set()
    needs |= {CUSTOM_FILE} if manifest["feature_source"] in MODEL_SOURCES else set()
    if manifest["feature_source"] in MODEL_SOURCES and not isinstance(manifest.get("head_config"), dict):
        return "`head_config` missing for a custom-model bundle"
    missing = needs - {str(n).rsplit("/", 1)[-1] for n in files}
    return f"`files` lacks {', '.join(sorted(missing))}" if missing else ""


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
        blobs[name.rsplit("/", 1)[-1]] = data
    return blobs


def _trunk_spec(model_dir: str, manifest: dict[str, Any], blobs: dict[str, bytes]) -> str:
    """The `weights` spec the trunk extractor loads: imagenet:VARIANT (checked against the
    cached file's sha256) or a verified local copy of trunk.pt."""
    weights = manifest["weights"]
    if weights["kind"] == "none":  # no trunk: the classifier reads cell features only
        return ""
    if weights["kind"] == "imagenet":
        from leukray.models.trunk import imagenet_cache_file, sha256_file

        spec = "imagenet:" + weights["name"].split(".")[-1]
        cached = imagenet_cache_file(spec)
        if os.path.exists(cached) and sha256_file(cached) != weights["sha256"]:
            raise BundleError(
                f"the ImageNet weights at {cached} differ from the ones this model was trained with (sha256)"
            )
        return spec
    key = next((k for k in manifest["files"] if k.rsplit("/", 1)[-1] == TRUNK_FILE), None)
    if key is None:
        raise BundleError(f"model bundle {model_dir} is incomplete: {weights['kind']} weights but no {TRUNK_FILE}")
    if storage.is_uri(model_dir):
        return _local_trunk_copy(manifest["files"][key], blobs[TRUNK_FILE])
    return os.path.join(model_dir, key)


def _local_trunk_copy(digest: str, data: bytes) -> str:
    """The extractor loads weights from a local file: a private copy named by its full
    sha256, re-hashed before it is reused here (a file left by anyone else is rewritten)
    and checked against its name again whenever the trunk loads it (`trunk._load_file`)."""
    from leukray.models.trunk import sha256_file

    cache = os.path.join(tempfile.gettempdir(), f"leukray-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    os.makedirs(cache, mode=0o700, exist_ok=True)
    spec = os.path.join(cache, f"trunk-{digest}.pt")
    if not os.path.isfile(spec) or sha256_file(spec) != digest:
        storage.write_bytes(spec, data)
    return spec
