"""`leukray predict`: apply a model bundle to new images with the same Ray Data pipeline as
training (CPU preprocessing -> GPU/CPU model actors), one output row per image."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd

from leukray import storage
from leukray.bundle import load_bundle
from leukray.config import AugmentConfig
from leukray.dataset import list_images
from leukray.features import FeatureExtractor

PREDICTION_COLUMNS = ["path", "label", "predicted_label", "prob_all", "error"]


class BundlePredictor:
    """Ray Data actor: loads (and verifies) the bundle once; crops -> class probabilities."""

    def __init__(self, model_dir: str):
        self.bundle = load_bundle(model_dir)
        seed = int(self.bundle.manifest.get("weights_seed", 0))
        self.extractor = FeatureExtractor(self.bundle.trunk_weights, seed=seed, maps_stage=self.bundle.maps_stage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = self.extractor(batch)
        features = batch.pop("features")
        maps = batch.pop("maps", None)
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        prob = np.full(len(ok), np.nan)
        predicted = np.full(len(ok), "", dtype=object)
        if ok.any():
            probs = self.bundle.probabilities(features[ok], maps[ok] if maps is not None else None)
            prob[ok] = probs[:, self.bundle.positive_index]
            predicted[ok] = np.asarray(self.bundle.classes, dtype=object)[probs.argmax(axis=1)]
        batch["prob_all"] = prob
        batch["predicted_label"] = predicted
        return batch


def predict(model_dir: str, data: str, out: str, start_ray: Callable[[], None] | None = None) -> dict[str, Any]:
    """Classify every image under `data`; write `out` (Parquet). Returns counts."""
    import ray

    from leukray.pipeline import _chunks, _preprocess_batch, extractor_compute, log, write_parquet

    bundle = load_bundle(model_dir)  # verify before anything else runs
    images, skipped = list_images(data, bundle.classes)
    if start_ray is not None:
        start_ray()
    log(
        f"predicting {len(images)} images with {bundle.feature_source} features -> {bundle.manifest['classifier']} "
        f"(trunk {bundle.manifest['weights']['name']})"
    )
    images = images.assign(split="", n_aug=0)
    _, pool, resources = extractor_compute("auto", 0)
    ds = ray.data.from_pandas(_chunks(images[["path", "label", "subject", "split", "n_aug"]], 32))
    ds = ds.map_batches(
        _preprocess_batch,
        batch_format="numpy",
        batch_size=16,
        fn_kwargs={"cfg": bundle.preprocess, "augment": AugmentConfig(oversample=0.0), "seed": 0},
    )
    ds = ds.map_batches(
        BundlePredictor,
        batch_format="numpy",
        batch_size=int(bundle.manifest.get("extract_batch_size", 32)),
        fn_constructor_kwargs={"model_dir": model_dir}, compute=pool, **resources
    )
    parts = [
        pd.DataFrame({c: batch[c] for c in ["path", "label", "predicted_label", "prob_all", "error"]})
        for batch in ds.iter_batches(batch_format="numpy", batch_size=256)
    ]
    preds = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=PREDICTION_COLUMNS)
    if not skipped.empty:
        preds = pd.concat(
            [preds, pd.DataFrame({"path": skipped["path"], "label": "", "predicted_label": "", "prob_all": np.nan, "error": skipped["reason"]})],
            ignore_index=True,
        )
    preds = preds.sort_values("path", kind="stable").reset_index(drop=True)[PREDICTION_COLUMNS]
    preds["error"] = preds["error"].astype(str)
    write_parquet(out, preds, {"model": model_dir, "bundle": storage.join(model_dir, "bundle.json"), "data": data})
    counts = {
        "images": int(len(preds)),
        "predicted": int((preds["error"] == "").sum()),
        "errors": int((preds["error"] != "").sum()),
        "by_label": preds.loc[preds["error"] == "", "predicted_label"].value_counts().to_dict(),
    }
    log(f"wrote {out}: {counts}")
    return counts
