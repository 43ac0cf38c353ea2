"""`leukray predict`: apply a model bundle to new images with the same Ray Data pipeline as
training (CPU preprocessing -> GPU/CPU model actors), one output row per image.

May import: `leukray.io`, `leukray.data`, `leukray.models`, `leukray.distributed`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd

from leukray.data.discovery import list_images
from leukray.distributed.streaming import predict_stream
from leukray.io import storage
from leukray.io.tables import log, write_parquet
from leukray.models.bundle import load_bundle

# One column set for `run`'s predictions.parquet and `predict`'s output (docs/outputs.md):
# prob_all is the probability of the bundle's positive label (ALL unless data.positive_label
# said otherwise; the Parquet metadata records which), error is "" for a predicted image.
PREDICTION_COLUMNS = ["path", "label", "subject", "predicted_label", "prob_all", "error"]
STREAM_COLUMNS = ["path", "label", "predicted_label", "prob_all", "error"]


def predict(model_dir: str, data: str, out: str, start_ray: Callable[[], None] | None = None) -> dict[str, Any]:
    """Classify every image under `data`; write `out` (Parquet). Returns counts."""
    bundle = load_bundle(model_dir)  # verify before anything else runs
    images, skipped = list_images(data, bundle.classes)
    if start_ray is not None:
        start_ray()
    log(
        f"predicting {len(images)} images with {bundle.feature_source} features -> {bundle.manifest['classifier']} "
        f"(trunk {bundle.manifest['weights']['name']})"
    )
    preds = predict_stream(images, bundle, model_dir, STREAM_COLUMNS)
    preds["subject"] = preds["path"].map(dict(zip(images["path"], images["subject"]))).fillna("")
    if not skipped.empty:
        preds = pd.concat(
            [
                preds,
                pd.DataFrame(
                    {
                        "path": skipped["path"],
                        "label": "",
                        "subject": "",
                        "predicted_label": "",
                        "prob_all": np.nan,
                        "error": skipped["reason"],
                    }
                ),
            ],
            ignore_index=True,
        )
    preds = preds.sort_values("path", kind="stable").reset_index(drop=True)[PREDICTION_COLUMNS]
    preds["error"] = preds["error"].astype(str)
    provenance = {
        "model": model_dir,
        "bundle": storage.join(model_dir, "bundle.json"),
        "data": data,
        "weights": bundle.manifest["weights"]["name"],
        "positive_label": bundle.manifest.get("positive_label", ""),
        "classes": list(bundle.classes),
    }
    write_parquet(out, preds, provenance)
    counts = {
        "images": int(len(preds)),
        "predicted": int((preds["error"] == "").sum()),
        "errors": int((preds["error"] != "").sum()),
        "by_label": preds.loc[preds["error"] == "", "predicted_label"].value_counts().to_dict(),
    }
    log(f"wrote {out}: {counts}")
    return counts
