"""The custom head's trunk maps on the cluster: written as shards by the extraction pass and
streamed back as a Ray dataset for Ray Train and the embedding pass (the files and their
lifetime: `leukray.io.mapshards`). No step materialises the maps; how far Ray Data reads
ahead of a reader is capped (`MAPS_STORE_BYTES`), though Ray Train's ingest still reads
further ahead (docs/measurements.md).

May import: Ray, numpy, pandas, `leukray.config`, `leukray.io`, `leukray.models`,
`leukray.distributed.actors`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import pandas as pd

from leukray.config import RunConfig
from leukray.distributed.actors import read_maps_batch, write_maps_batch
from leukray.io import journal, mapshards, runfolder, storage
from leukray.models.head import map_shape

MAPS_ROW_COLUMNS = ["path", "label", "subject", "split", "aug_index"]
# Shards read by one task: Ray's per-task cost amortised over ~25 MB (four 32-row shards of
# 7 x 7 x 2,048 maps), blocks still small beside the object store.
SHARDS_PER_TASK = 4
# The object store a maps stream may fill ahead of its consumer (Ray Data's soft limit for
# the stream, `capped_store`). Without it Ray Data reads ahead as far as its share of the
# object store allows (~0.5 x the store): a training epoch over 2,000 maps (400 MB) held
# 620 MiB at its peak and a slow reader 334 MiB, growing with the data. Two or three 25 MB
# blocks ahead of a consumer that spends seconds on each are enough to keep it fed.
MAPS_STORE_BYTES = 64 * 2**20


def capped_store(options: Any) -> Any:
    """`options` (Ray Data ExecutionOptions) with the object store capped at MAPS_STORE_BYTES."""
    options.resource_limits = options.resource_limits.copy(object_store_memory=MAPS_STORE_BYTES)
    return options


@dataclass(frozen=True)
class MapsPlan:
    """Where one extraction's maps go: run folder, identity (see `maps_identity`), shape."""

    out: str
    identity: str
    shape: tuple[int, int, int]

    @property
    def folder(self) -> str:
        return mapshards.maps_folder(self.out, self.identity)


def maps_identity(rows: pd.DataFrame, cfg: RunConfig, provenance: dict[str, str], maps_stage: int) -> str:
    """A hash of what decides the maps and their rows: the rows in stream order (the seeded
    order Ray Train reads), the data fingerprint, the weights, preprocessing, augmentation,
    split seed and the maps' stage."""
    listed = rows[MAPS_ROW_COLUMNS[:4] + ["n_aug"]].to_csv(index=False).encode()
    return journal.identity_of(
        hashlib.sha256(listed).hexdigest(),
        provenance.get("data_fingerprint", ""),
        provenance.get("weights", ""),
        cfg.extract.weights,
        cfg.extract.seed,
        cfg.extract.deterministic,
        dataclasses.asdict(cfg.preprocess),
        dataclasses.asdict(cfg.augment),
        cfg.split.seed,
        maps_stage,
    )


def plan_maps(rows: pd.DataFrame, cfg: RunConfig, provenance: dict[str, str], maps_stage: int) -> MapsPlan:
    if not cfg.out:
        raise ValueError("the trunk maps are written under the run folder: cfg.out is empty")
    shape = map_shape(cfg.preprocess.size, maps_stage)
    # absolute: the writing and reading tasks do not run in the driver's working directory
    return MapsPlan(runfolder.local_or_uri(cfg.out), maps_identity(rows, cfg, provenance, maps_stage), shape)


def _placement(out: str) -> dict[str, Any]:
    """Where the tasks that write and read the shards run: anywhere for a URI; for a local
    run folder, the driver's node (the folder is on its disk, not on the other nodes')."""
    if storage.is_uri(out):
        return {}
    import ray.util

    # every Ray node offers one unit of its own `node:<ip>` resource: a sliver pins a task there
    return {"resources": {f"node:{ray.util.get_node_ip_address()}": 0.001}}


def add_shard_writer(ds: Any, plan: MapsPlan) -> Any:
    """`ds` (rows with `maps`) with each block's maps written as a shard and dropped, so only
    the small columns travel on; every other maps folder of the run is removed first (a
    rerun never mixes shards of another extraction)."""
    mapshards.remove_maps(plan.out)
    storage.makedirs(plan.folder)
    return ds.map_batches(
        write_maps_batch,
        batch_format="numpy",
        batch_size=None,
        fn_kwargs={"folder": plan.folder},
        **_placement(plan.out),
    )


def finish_shards(plan: MapsPlan, shards: list[str], rows: int) -> Any:
    """Mark the shards complete (`shards.json`, in stream order) and return them as a dataset."""
    mapshards.write_manifest(plan.folder, plan.identity, plan.shape, shards, rows)
    return read_maps(plan.out, mapshards.complete_manifest(plan.out, plan.identity))


def existing_maps(plan: MapsPlan) -> Any:
    """The dataset of the complete shards of this identity, or None when there are none."""
    record = mapshards.complete_manifest(plan.out, plan.identity)
    return read_maps(plan.out, record) if record is not None else None


def read_maps(out: str, record: dict[str, Any]) -> Any:
    """The shards of `record` as a lazy Ray dataset (read again by every consumer and every
    epoch): ROW_COLUMNS + `maps` (N x C x H x W float16), in stream order. The shards are
    read `SHARDS_PER_TASK` to a task (`actors.read_maps_batch`), not by
    `read_parquet`, whose per-file planning cost ~0.2 s a shard (measured: 48 shards of 32
    maps iterated in 9 s that way, 2.4 s this way, 0.3 s read in a plain loop)."""
    import ray

    paths = mapshards.shard_paths(out, record) if record["shards"] else []
    if not paths:
        return ray.data.from_items([])
    blocks = max(1, -(-len(paths) // SHARDS_PER_TASK))
    ds = ray.data.from_items([{"shard": p} for p in paths], override_num_blocks=blocks).map_batches(
        read_maps_batch, batch_format="numpy", batch_size=None, fn_kwargs={"shape": tuple(record["shape"])},
        **_placement(out),
    )  # fmt: skip
    capped_store(ds.context.execution_options)  # Ray Train sets its own options: see training._trainer
    return ds
