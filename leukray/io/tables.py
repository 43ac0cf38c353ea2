"""JSON, CSV and Parquet through `leukray.io.storage` (local or URI, written atomically),
the `[leukray]` log line and the errors table every stage appends to.

May import: numpy, pandas, pyarrow, `leukray.io.storage`.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from leukray.io import storage

ERROR_COLUMNS = ["path", "stage", "reason"]
# The version of the output layout described in docs/outputs.md: every JSON file leukray
# writes carries it as `schema_version`, every Parquet file in its `leukray` metadata. It
# goes up when a file, column or key changes meaning or disappears (not when one is added).
SCHEMA_VERSION = 1


def log(message: str) -> None:
    print(f"[leukray] {message}", flush=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def read_json(path: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(path).decode("utf-8"))


def write_json(path: str, payload: dict[str, Any]) -> None:
    """NaN becomes null, numpy scalars plain numbers; `schema_version` first."""
    payload = {"schema_version": SCHEMA_VERSION, **payload}
    storage.write_text(path, json.dumps(_clean(payload), indent=2, default=_json_default) + "\n")


def read_csv(path: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(storage.read_bytes(path)), keep_default_na=False)


def write_csv(path: str, frame: pd.DataFrame) -> None:
    with storage.AtomicLocalFile(path) as tmp:
        frame.to_csv(tmp, index=False)


def read_parquet(path: str, columns: list[str] | None = None) -> pd.DataFrame:
    fs, inner = storage.resolve(path)
    return pq.read_table(inner, filesystem=fs, columns=columns).to_pandas()


def write_parquet(path: str, frame: pd.DataFrame, provenance: dict[str, str]) -> None:
    """`frame` as Parquet with `provenance` (weights, data fingerprint, version) and the
    `schema_version` in the schema metadata under the key `leukray`."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    described = {"schema_version": SCHEMA_VERSION, **provenance}
    metadata = {**(table.schema.metadata or {}), b"leukray": json.dumps(described, default=str).encode()}
    table = table.replace_schema_metadata(metadata)
    with storage.AtomicLocalFile(path) as tmp:
        pq.write_table(table, tmp)


def write_errors(out: str, errors: pd.DataFrame) -> None:
    write_csv(storage.join(out, "errors.csv"), errors.reindex(columns=ERROR_COLUMNS))


def counts_by(frame: pd.DataFrame, *keys: str) -> dict[str, Any]:
    """Row counts nested by `keys`: counts_by(df, "split", "label") -> {"train": {"all": 3}}."""
    if frame.empty:
        return {}
    grouped = frame.groupby(list(keys)).size()
    out: dict[str, Any] = {}
    for index, count in grouped.items():
        index = index if isinstance(index, tuple) else (index,)
        node = out
        for part in index[:-1]:
            node = node.setdefault(str(part), {})
        node[str(index[-1])] = int(count)
    return out
