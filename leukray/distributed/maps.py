"""The custom head's trunk maps on the cluster: written as shards by the extraction pass
(`MapsShards`; the files and their lifetime: `leukray.io.mapshards`) and read back by
whoever uses them, so that no step holds them all and the object store carries none:

- a Ray Train worker reads its own share of the shards, at most `PREFETCH_SHARDS` ahead
  (`ShardSource`);
- the embedding pass streams the shards' paths to its actors, which read the shards
  (`MapsShards.paths`, `actors.CustomEmbedder`).

Either reads straight from the run folder when it can see it (a URI, or a local folder on
its own node), else through a task on the folder's node (`actors.on_node`). Streaming the
maps themselves through Ray Data let it read ahead as far as the object store allowed: a
Ray Train epoch over 2,000 maps peaked at 620 MiB, and the peak grew with the data
(docs/measurements.md).

May import: Ray, numpy, pandas, `leukray.config`, `leukray.io`, `leukray.models`,
`leukray.distributed.actors`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from leukray.config import RunConfig
from leukray.distributed.actors import on_node, this_node_ip, write_maps_batch
from leukray.io import journal, mapshards, runfolder, storage
from leukray.models.classifiers import label_codes
from leukray.models.head import map_shape

MAPS_ROW_COLUMNS = ["path", "label", "subject", "split", "aug_index"]
# Shards one embedding call reads (four 32-row shards of 7 x 7 x 2,048 maps: ~25 MB, as the
# extraction's batches on a CPU; Ray's per-task cost amortised, the actor's memory small).
SHARDS_PER_TASK = 4
# Shards a training worker reads ahead of the one it trains on (threads of its own): one
# shard is a batch of the extraction (32 rows, ~6 MB, on a CPU; 256, ~50 MB, on a GPU).
PREFETCH_SHARDS = 4


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
    # every Ray node offers one unit of its own `node:<ip>` resource: a sliver pins a task there
    return {"resources": {f"node:{this_node_ip()}": 0.001}}


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


@dataclass(frozen=True)
class MapsShards:
    """One extraction's complete maps: run folder `out` and its `shards.json` record."""

    out: str
    record: dict[str, Any]

    @property
    def rows(self) -> int:
        return int(self.record["rows"])

    @property
    def node_ip(self) -> str | None:
        """The node whose disk holds the shards (None: a URI, readable anywhere)."""
        return None if storage.is_uri(self.out) else this_node_ip()

    def paths(self) -> Any:
        """The shards' paths as a Ray dataset (`shard`), `SHARDS_PER_TASK` to a block: the
        embedding pass's input, whose actors read the shards themselves."""
        import ray

        paths = mapshards.shard_paths(self.out, self.record) if self.record["shards"] else []
        blocks = max(1, -(-len(paths) // SHARDS_PER_TASK))
        return ray.data.from_items([{"shard": p} for p in paths], override_num_blocks=blocks)

    def source(self, classes: list[str], split: str, originals_only: bool) -> "ShardSource":
        """The rows of `split` (originals only if asked) for a training worker to read."""
        paths = tuple(mapshards.shard_paths(self.out, self.record)) if self.record["shards"] else ()
        return ShardSource(paths, tuple(self.record["shape"]), tuple(classes), split, originals_only, self.node_ip)


def finish_shards(plan: MapsPlan, shards: list[str], rows: int) -> MapsShards:
    """Mark the shards complete (`shards.json`, in stream order) and return them."""
    mapshards.write_manifest(plan.folder, plan.identity, plan.shape, shards, rows)
    return MapsShards(plan.out, mapshards.complete_manifest(plan.out, plan.identity))


def existing_maps(plan: MapsPlan) -> MapsShards | None:
    """The complete shards of this identity, or None when there are none."""
    record = mapshards.complete_manifest(plan.out, plan.identity)
    return MapsShards(plan.out, record) if record is not None else None


def write_maps(out: str, identity: str, rows: dict[str, np.ndarray], rows_per_shard: int) -> MapsShards:
    """Maps held in memory (`rows`: `mapshards.ROW_COLUMNS` + `maps`, N x C x H x W) written
    as a complete set of shards of `rows_per_shard` rows under run folder `out`, in the
    order given (the benchmark's and the tests' maps; `leukray run` writes its own as the
    trunk computes them)."""
    folder = mapshards.maps_folder(out, identity)
    storage.makedirs(folder)
    shards = []
    for start in range(0, len(rows["maps"]), rows_per_shard):
        shards.append(mapshards.write_shard(folder, {k: v[start : start + rows_per_shard] for k, v in rows.items()}))
    mapshards.write_manifest(folder, identity, rows["maps"].shape[1:], shards, len(rows["maps"]))
    return MapsShards(out, mapshards.complete_manifest(out, identity))


def with_codes(
    batch: dict[str, np.ndarray], classes: list[str], split: str, originals_only: bool
) -> dict[str, np.ndarray]:
    """The rows of `split` without errors (originals only if asked): maps + label codes
    (index in `classes`), vectorised.

    Raises:
        ValueError: a label outside `classes`.
    """
    keep = (batch["split"].astype(str) == split) & np.asarray([not e for e in batch["error"]], dtype=bool)
    if originals_only:
        keep &= batch["aug_index"] == 0
    maps = batch["maps"] if keep.all() else batch["maps"][keep]
    return {"maps": maps, "label_code": label_codes(batch["label"][keep], classes)}


def read_source_shard(
    path: str, shape: tuple[int, ...], classes: tuple[str, ...], split: str, originals_only: bool
) -> dict[str, np.ndarray]:
    """One shard's rows of a `ShardSource`: `maps` (N x C x H x W float16) + `label_code`."""
    return with_codes(mapshards.read_shard(path, shape), list(classes), split, originals_only)


@dataclass(frozen=True)
class ShardSource:
    """The rows of one split of the maps, as a training worker reads them (picklable: it
    travels in Ray Train's loop config).

    `node_ip`: the node whose disk holds a local run folder (None: a URI, readable
    anywhere). A worker on another node reads through a task placed there; only the shards
    in flight (`PREFETCH_SHARDS`) are ever in the object store.
    """

    paths: tuple[str, ...]
    shape: tuple[int, ...]
    classes: tuple[str, ...]
    split: str
    originals_only: bool
    node_ip: str | None

    def shards_of(self, rank: int, world: int, order_seed: int | None) -> list[str]:
        """The shards worker `rank` of `world` reads: every `world`-th of the shards in
        stream order, or of a permutation seeded by `order_seed` (the same on every rank,
        so the ranks split the shards between them)."""
        paths = list(self.paths)
        if order_seed is not None:
            paths = [paths[i] for i in np.random.default_rng(order_seed).permutation(len(paths))]
        return paths[rank::world]

    def reader(self) -> Callable[[str], dict[str, np.ndarray]]:
        """A function reading one shard's rows from where this process runs (`on_node`)."""
        read = on_node(self.node_ip, read_source_shard)
        args = (self.shape, self.classes, self.split, self.originals_only)
        return lambda path: read(path, *args)

    def stream(self, rank: int = 0, world: int = 1, order_seed: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """This rank's shards' rows, shard by shard (`shards_of`), read up to
        `PREFETCH_SHARDS` ahead in threads; empty shards are skipped."""
        read = self.reader()
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="maps-read") as pool:
            paths = iter(self.shards_of(rank, world, order_seed))
            pending = collections.deque(pool.submit(read, p) for p in itertools.islice(paths, PREFETCH_SHARDS))
            try:
                while pending:
                    part = pending.popleft().result()
                    if (path := next(paths, None)) is not None:
                        pending.append(pool.submit(read, path))
                    if len(part["label_code"]):
                        yield part
            finally:
                for future in pending:
                    future.cancel()
