"""Feature files (`features.parquet`, `custom_features.parquet`): one row per image and
augmented copy with a fixed-size `features` vector, streamed in by `FeatureFileWriter` and
read back by `load_features` in a stable row order.

May import: numpy, pandas, pyarrow, `leukray.io.storage`, `leukray.io.tables`.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from leukray.io import storage
from leukray.io.tables import ERROR_COLUMNS, SCHEMA_VERSION

META_COLUMNS = ["path", "label", "subject", "split", "aug_index"]


def feature_schema(dim: int, provenance: dict[str, str]) -> pa.Schema:
    return pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("subject", pa.string()),
            ("split", pa.string()),
            ("aug_index", pa.int32()),
            ("features", pa.list_(pa.float32(), dim)),
        ],
        metadata={b"leukray": json.dumps({"schema_version": SCHEMA_VERSION, **provenance}).encode()},
    )


def error_mask(batch: dict[str, np.ndarray]) -> np.ndarray:
    """True where a row of a stream batch carries an error (its `error` is non-empty)."""
    if "error" not in batch:
        return np.zeros(len(batch["path"]), dtype=bool)
    return np.asarray([bool(e) for e in batch["error"]], dtype=bool)


class FeatureFileWriter:
    """Streams batches with a `features` (N x dim) column into one Parquet file, written
    atomically; rows whose `error` is set go to `errors` instead. The rows written are
    also kept (`meta`, `matrix`), so the stage that wrote them hands them on in memory."""

    def __init__(self, path: str, dim: int, provenance: dict[str, str]):
        self.path, self.dim = path, dim
        self.schema = feature_schema(dim, provenance)
        self.meta_parts: list[pd.DataFrame] = []
        self.matrix_parts: list[np.ndarray] = []
        self.error_parts: list[pd.DataFrame] = []

    def __enter__(self) -> FeatureFileWriter:
        self._atomic = storage.AtomicLocalFile(self.path)
        self._writer = pq.ParquetWriter(self._atomic.__enter__(), self.schema)
        return self

    def write(self, batch: dict[str, np.ndarray]) -> None:
        bad = error_mask(batch)
        if bad.any():
            reasons = {"path": batch["path"][bad], "stage": "preprocess", "reason": batch["error"][bad]}
            self.error_parts.append(pd.DataFrame(reasons))
        good = ~bad
        if not good.any():
            return
        feats = np.asarray(batch["features"][good], dtype=np.float32).reshape(-1, self.dim)
        table = pa.table(
            {
                "path": pa.array(batch["path"][good].astype(str)),
                "label": pa.array(batch["label"][good].astype(str)),
                "subject": pa.array(batch["subject"][good].astype(str)),
                "split": pa.array(batch["split"][good].astype(str)),
                "aug_index": pa.array(batch["aug_index"][good].astype(np.int32)),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), self.dim),
            },
            schema=self.schema,
        )
        self._writer.write_table(table)
        self.meta_parts.append(table.drop_columns(["features"]).to_pandas())
        self.matrix_parts.append(feats)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()
        self._atomic.__exit__(exc_type, exc, tb)

    @property
    def meta(self) -> pd.DataFrame:
        if not self.meta_parts:
            return pd.DataFrame(columns=META_COLUMNS)
        return pd.concat(self.meta_parts, ignore_index=True)

    @property
    def errors(self) -> pd.DataFrame:
        if not self.error_parts:
            return pd.DataFrame(columns=ERROR_COLUMNS)
        return pd.concat(self.error_parts, ignore_index=True)

    def sorted_rows(self) -> tuple[pd.DataFrame, np.ndarray]:
        """What `load_features` would read back from the finished file, without reading it."""
        matrix = np.concatenate(self.matrix_parts) if self.matrix_parts else np.zeros((0, self.dim), np.float32)
        return sort_rows(self.meta, matrix)


def sort_rows(meta: pd.DataFrame, matrix: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows ordered by (path, aug_index): a stream finishes them in an order that changes
    from run to run, and order-sensitive classifiers (bagging, SGD, ...) would change with it."""
    order = np.lexsort((meta["aug_index"].to_numpy(), meta["path"].to_numpy()))
    return meta.iloc[order].reset_index(drop=True), matrix[order]


def load_features(path: str) -> tuple[pd.DataFrame, np.ndarray]:
    """features.parquet -> (metadata frame, N x dim float32 matrix), rows ordered by (path,
    aug_index)."""
    fs, inner = storage.resolve(path)
    table = pq.read_table(inner, filesystem=fs)
    dim = table.schema.field("features").type.list_size
    matrix = table.column("features").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    meta = table.drop_columns(["features"]).to_pandas()
    return sort_rows(meta, matrix)
