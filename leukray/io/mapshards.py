"""The trunk maps of the custom head, as Parquet shards in the run folder (issue 9).

`leukray run` computes the 7 x 7 x 2,048 float16 maps (~200 KB an image) in the extraction
pass; instead of holding them all in Ray's object store they are written, a batch per
shard, to `RUN/maps/<identity>/` as they are computed, and Ray Train and the embedding pass
stream them back from there. The layout:

    RUN/maps/<identity>/<shard>.parquet   path, label, subject, split, aug_index, error and
                                          `maps` (each row's C*H*W float16 as raw bytes)
    RUN/maps/<identity>/shards.json       written last, once every shard is: the identity,
                                          the map shape, the rows and the shards in stream order

`<identity>` hashes everything that decides the maps and their rows (data fingerprint,
weights, preprocessing, augmentation, split, the seeded row order, the maps' stage), so
a folder is only ever read back by the extraction it came from; a folder without
`shards.json` is unfinished and never read. Lifetime (disk matters: 200 GB for a million
images): a new extraction removes every other maps folder before it writes; the shards
stay while the custom head trains (a run interrupted there resumes with `--resume` from
them instead of running the trunk again); `leukray run` and `leukray train` remove them
once the train stage has committed (the custom features are written; nothing reads the
maps after that). Works the same on local folders and `s3://` run folders (`storage`).

May import: numpy, pyarrow, `leukray.io.storage`.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leukray.io import storage

MAPS_DIR = "maps"
SHARDS_FILE = "shards.json"
ROW_COLUMNS = ("path", "label", "subject", "split", "aug_index", "error")


def maps_root(out: str) -> str:
    return storage.join(out, MAPS_DIR)


def maps_folder(out: str, identity: str) -> str:
    return storage.join(out, MAPS_DIR, identity)


def shard_name(batch: dict[str, np.ndarray]) -> str:
    """A shard's file name from its first row and size: each (path, aug_index) row is in
    exactly one batch of the stream, so names never collide, and a rerun of the same
    stream writes the same names."""
    key = f"{batch['path'][0]}|{int(batch['aug_index'][0])}|{len(batch['path'])}"
    return hashlib.sha256(key.encode()).hexdigest()[:20] + ".parquet"


def shard_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """A batch (ROW_COLUMNS + `maps`, N x C x H x W float16) as one Arrow table; each row's
    maps as one binary value (C-order bytes; the shape is in `shards.json`), zero-copy from
    the array. Parquet writes and reads a binary column ~30x faster than a list of float16
    (measured: 32 maps of 2,048 x 7 x 7 in 5 ms against 140-330 ms), which would otherwise
    hold back the trunk and every training epoch."""
    maps = np.ascontiguousarray(batch["maps"], dtype=np.float16)
    row_bytes = int(np.prod(maps.shape[1:])) * maps.itemsize
    offsets = np.arange(len(maps) + 1, dtype=np.int64) * row_bytes
    values = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(maps), [None, pa.py_buffer(offsets), pa.py_buffer(maps)]
    )
    columns = {name: pa.array(np.asarray(batch[name])) for name in ROW_COLUMNS}
    columns["maps"] = values
    return pa.table(columns)


def write_shard(folder: str, batch: dict[str, np.ndarray]) -> str:
    """Write `batch` as one shard under `folder` (atomically); returns the shard's name."""
    name = shard_name(batch)
    buffer = io.BytesIO()
    # no compression: post-ReLU float16 maps shrink little, and the writer must keep up with
    # the trunk (thousands of maps a second on a GPU)
    # (nor dictionaries or statistics for the maps: 200 KB values that never repeat)
    pq.write_table(
        shard_table(batch), buffer, compression="none", use_dictionary=list(ROW_COLUMNS),
        write_statistics=list(ROW_COLUMNS),
    )  # fmt: skip
    storage.write_bytes(storage.join(folder, name), buffer.getvalue())
    return name


def maps_of(table: pa.Table, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A shard's table (or a block of it) -> the batch it was written from: ROW_COLUMNS as
    numpy and `maps` as N x C x H x W float16 (a view of Arrow's buffer).

    Raises:
        ValueError: a row whose bytes are not one map of `shape` (a damaged shard).
    """
    out = {name: table.column(name).to_numpy() for name in ROW_COLUMNS}
    column = table.column("maps").combine_chunks()
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int64)[column.offset : column.offset + len(column) + 1]
    row_bytes = int(np.prod(shape)) * 2
    if len(offsets) > 1 and not np.all(np.diff(offsets) == row_bytes):
        raise ValueError(f"a maps shard holds rows that are not {'x'.join(map(str, shape))} float16 maps")
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    out["maps"] = data.view(np.float16).reshape(len(table), *shape)
    return out


def read_shard(path: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One shard (a path or URI) -> its batch (`maps_of`)."""
    return maps_of(pq.read_table(io.BytesIO(storage.read_bytes(path))), shape)


def write_manifest(folder: str, identity: str, shape: tuple[int, ...], shards: list[str], rows: int) -> None:
    """Mark `folder` complete: written only after every shard is."""
    record = {"identity": identity, "shape": list(shape), "rows": rows, "shards": shards}
    storage.write_text(storage.join(folder, SHARDS_FILE), json.dumps(record, indent=1) + "\n")


def complete_manifest(out: str, identity: str) -> dict[str, Any] | None:
    """`shards.json` of the maps of `identity` in run folder `out` when that folder is
    complete (its manifest written, of this identity, every shard present); else None."""
    folder = maps_folder(out, identity)
    path = storage.join(folder, SHARDS_FILE)
    if not storage.exists(path):
        return None
    try:
        record = json.loads(storage.read_bytes(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    present = set(storage.file_signatures(folder))
    if record.get("identity") != identity or not set(record.get("shards", [])) <= present:
        return None
    return record


def shard_paths(out: str, record: dict[str, Any]) -> list[str]:
    """The shards of a complete manifest, in stream order, as full paths/URIs."""
    folder = maps_folder(out, record["identity"])
    return [storage.join(folder, name) for name in record["shards"]]


def remove_maps(out: str) -> None:
    """Delete every maps folder of run folder `out` (nothing when there is none)."""
    storage.delete_dir(maps_root(out))
