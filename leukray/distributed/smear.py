"""The Ray Data pass of `leukray smear-train`: smear fields -> detected, cut-out cells with
their hand-crafted features, through the very batch function `leukray screen` streams
(`leukray.distributed.actors.detect_batch` -> `leukray.ops.smear.detect_and_crop`), so the
classifier is trained on the crops it will screen.

May import: Ray, numpy, pandas, `leukray.config`, `leukray.ops`, `leukray.distributed.actors`,
`leukray.distributed.streaming`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from leukray.config import PreprocessConfig, ScreenConfig
from leukray.distributed.actors import detect_batch
from leukray.distributed.streaming import row_blocks
from leukray.ops.smear import BOX_COLUMNS

CELL_ROW_COLUMNS = ["slide", "cell_index", *BOX_COLUMNS, "error", "detect_node"]


def detect_cells(
    fields: list[str],
    cfg: ScreenConfig,
    preprocess_cfg: PreprocessConfig,
    cell_families: tuple[str, ...],
    keep_images: bool = False,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Detect and cut the cells of every field on the cluster (one Ray task per
    `cfg.batch_size` fields).

    Returns:
        rows: one per `detect_and_crop` row (CELL_ROW_COLUMNS: a cell, or a field/cell
            that failed with its reason in `error`), in field then cell order;
        features: len(rows) x D float32 cell features (`cell_families`; zeros on errors);
        images: len(rows) x S x S x 3 uint8 preprocessed crops with `keep_images`, else
            an empty array (the crops of thousands of cells are not kept for nothing).
    """
    import ray

    ds = ray.data.from_pandas(row_blocks(pd.DataFrame({"path": fields}), cfg.batch_size))
    ds = ds.map_batches(
        detect_batch,
        batch_format="numpy",
        batch_size=cfg.batch_size,
        fn_kwargs={"cfg": cfg, "preprocess_cfg": preprocess_cfg, "cell_families": cell_families},
    )
    columns = CELL_ROW_COLUMNS + (["cell_features"] if cell_families else []) + (["image"] if keep_images else [])
    parts, features, images = [], [], []
    for batch in ds.select_columns(columns).iter_batches(batch_format="numpy", batch_size=256):
        parts.append(pd.DataFrame({c: batch[c] for c in CELL_ROW_COLUMNS}))
        rows = len(batch["slide"])
        features.append(np.asarray(batch["cell_features"], np.float32) if cell_families else np.zeros((rows, 0)))
        if keep_images:
            images.append(batch["image"])
    if not parts:
        return pd.DataFrame(columns=CELL_ROW_COLUMNS), np.zeros((0, 0), np.float32), np.zeros((0,), np.uint8)
    rows = pd.concat(parts, ignore_index=True)
    order = np.lexsort((rows["cell_index"].to_numpy(), rows["slide"].astype(str).to_numpy()))
    matrix = np.concatenate(features)[order]
    kept = np.concatenate(images)[order] if keep_images else np.zeros((0,), np.uint8)
    return rows.iloc[order].reset_index(drop=True), matrix, kept
