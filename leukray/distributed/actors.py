"""Ray Data adapters (STYLE 2): the batch functions and callable classes handed to
`map_batches`. Each wraps a pure function or model from a lower folder and stamps the Ray
node it ran on, which the stages record in summary.json.

May import: numpy, `leukray.distributed.resources`, `leukray.io.storage`, `leukray.ops`,
`leukray.models`, `leukray.data`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leukray.data.discovery import hash_files
from leukray.distributed.resources import ray_node_id
from leukray.io import storage
from leukray.io.features import error_mask
from leukray.models.bundle import load_bundle
from leukray.models.custom import build_custom_model, load_model_state
from leukray.models.trunk import TrunkExtractor
from leukray.ops.preprocess import load_and_preprocess
from leukray.ops.smear import detect_and_crop


def _stamp(batch: dict[str, np.ndarray], column: str, rows: int) -> dict[str, np.ndarray]:
    batch[column] = np.asarray([ray_node_id()] * rows, dtype=object)
    return batch


def hash_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`path` -> sha256 and read_error (`leukray.data.discovery.hash_files`) + node_id."""
    out = hash_files(batch, storage.read_bytes)
    return _stamp(out, "node_id", len(out["path"]))


def preprocess_batch(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    """`leukray.ops.preprocess.load_and_preprocess` reading through storage + preprocess_node."""
    out = load_and_preprocess(batch, read_bytes=storage.read_bytes, **kwargs)
    return _stamp(out, "preprocess_node", len(out["path"]))


def detect_batch(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    """`leukray.ops.smear.detect_and_crop` reading through storage + detect_node."""
    out = detect_and_crop(batch, read_bytes=storage.read_bytes, **kwargs)
    return _stamp(out, "detect_node", len(out["slide"]))


class FeatureExtractor(TrunkExtractor):
    """Ray Data actor: the trunk loaded once per actor; crops -> `features` (and `maps`)
    + node_id. GPU actors run bf16 channels_last (see `TrunkExtractor`)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = super().__call__(batch)
        return _stamp(batch, "node_id", len(batch["features"]))


class CustomEmbedder:
    """Ray Data actor: trunk maps -> the custom model's penultimate activations (`features`)
    and its own class probabilities (`head_prob`)."""

    def __init__(self, state_path: str, head_config: dict[str, Any], embedding: int):
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_custom_model(head_config, state=load_model_state(state_path)).to(self.device)
        self.embedding = embedding

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        maps = batch.pop("maps")
        with torch.inference_mode():
            x = torch.from_numpy(np.array(maps, dtype=np.float32)).to(self.device)
            batch["features"] = self.model.embed(x, self.embedding).float().cpu().numpy()
            batch["head_prob"] = self.model.head.probabilities(self.model(x)).float().cpu().numpy()
        return batch


class BundlePredictor:
    """Ray Data actor: loads (and verifies) the bundle once; crops -> class probabilities
    (`prob_all`, `predicted_label`)."""

    def __init__(self, model_dir: str):
        self.bundle = load_bundle(model_dir)
        seed = int(self.bundle.manifest.get("weights_seed", 0))
        self.extractor = None
        if self.bundle.needs_trunk:  # a model on cell features alone needs no ResNet50
            self.extractor = FeatureExtractor(self.bundle.trunk_weights, seed=seed, maps_stage=self.bundle.maps_stage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.extractor is not None:
            batch = self.extractor(batch)
        else:
            batch.pop("image")
            batch = _stamp(batch, "node_id", len(batch["error"]))
        columns = {name: batch.pop(name, None) for name in ("features", "maps", "cell_features")}
        ok = ~error_mask(batch)
        prob = np.full(len(ok), np.nan)
        predicted = np.full(len(ok), "", dtype=object)
        if ok.any():
            features, maps, cells = (c[ok] if c is not None else None for c in columns.values())
            probs = self.bundle.probabilities(features, maps, cells)
            prob[ok] = probs[:, self.bundle.positive_index]
            predicted[ok] = self.bundle.predicted_labels(probs)  # at the bundle's decision threshold
        batch["prob_all"] = prob
        batch["predicted_label"] = predicted
        return batch
