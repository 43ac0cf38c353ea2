"""The Ray Data passes: hashing the inputs, the streaming stage (CPU decode + Otsu-crop +
augment tasks -> trunk actors, features written as they arrive), the custom model's
embedding pass, and the predict/screen streams through a model bundle. A few hundred files
are hashed in the driver instead (`LOCAL_HASH_MAX`).

May import: Ray, numpy, pandas, `leukray.config`, `leukray.io`, `leukray.data.discovery`,
`leukray.models`, `leukray.distributed.actors`, `leukray.distributed.maps`,
`leukray.distributed.resources`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Generator, Iterator

import numpy as np
import pandas as pd

from leukray.config import AugmentConfig, RunConfig, ScreenConfig
from leukray.data.discovery import hash_files
from leukray.distributed.actors import (
    BundlePredictor,
    CustomEmbedder,
    FeatureExtractor,
    detect_review_batch,
    hash_batch,
    preprocess_batch,
    slide_tiles,
)
from leukray.distributed.maps import (
    SHARDS_PER_TASK,
    MapsShards,
    add_shard_writer,
    existing_maps,
    finish_shards,
    plan_maps,
)
from leukray.distributed.resources import extract_batch_size, plan_actor_pool, torch_actor_env, whole_output_pass
from leukray.io import storage
from leukray.io.features import FeatureFileWriter, error_mask
from leukray.io.tables import ERROR_COLUMNS, log
from leukray.models.bundle import Bundle
from leukray.models.trunk import FEATURE_DIM
from leukray.ops.cellfeatures import feature_dim

ROWS_PER_BLOCK = 32
"""Rows per block of the streams of small tasks (hashing, trunk crops) and the fewest rows
per block of the streaming stage (`stream_block_rows`)."""
MAX_ROWS_PER_BLOCK = 512
TASKS_PER_CPU = 4
STREAM_COLUMNS = ["path", "label", "subject", "split", "n_aug"]


def stream_block_rows(n_rows: int, cpus: float, with_maps: bool = False) -> int:
    """Rows per block (one decode + Otsu-crop task each) of the streaming stage: about
    `TASKS_PER_CPU` tasks per CPU of the cluster, from `ROWS_PER_BLOCK` up to
    `MAX_ROWS_PER_BLOCK` rows, cut into a multiple of the CPU count of blocks.

    Ray Data spends tens of milliseconds of its driver loop on every task; a task of 32
    images does ~40 ms of work, so small blocks made the scheduling, not the CPUs, the limit:
    with preprocessing feeding a nearly free 0-CPU actor on 2 cores (the GPU box's case, in
    miniature) the stage ran at 0.26-0.28 of a plain ``multiprocessing.Pool`` with blocks of
    32 rows and 0.49-0.57 with blocks of 512 (4,000 synthetic cells; issue 9). Several tasks
    per CPU keep the last wave short; the cap bounds a block's crops in flight (512 x 150 KB)
    whatever the data's size.

    A pass that also computes the trunk maps (`with_maps`) keeps blocks of `ROWS_PER_BLOCK`
    rows: every row then carries ~200 KB more to the shard writer, and 250-row blocks took
    the object store from 9 MiB (200 images) to 70 MiB (2,000) where 32-row ones kept it
    at 24 MiB.
    """
    if with_maps:
        return ROWS_PER_BLOCK
    per_task = math.ceil(n_rows / max(1.0, cpus * TASKS_PER_CPU))
    rows = int(min(MAX_ROWS_PER_BLOCK, max(ROWS_PER_BLOCK, per_task)))
    # whole waves: as many blocks as a multiple of the CPUs, so that the last wave is not
    # one short block with the other CPUs idle (6,400 rows on 2 CPUs: 14 blocks of 458
    # rows, not 12 of 512 and one of 256)
    slots = max(1, int(cpus))
    blocks = max(1, math.ceil(math.ceil(n_rows / rows) / slots)) * slots
    return max(ROWS_PER_BLOCK, math.ceil(n_rows / blocks))  # never above `rows`: blocks >= n_rows / rows


def row_blocks(frame: pd.DataFrame, rows: int) -> list[pd.DataFrame]:
    """`frame` cut into blocks of `rows` rows (one Ray Data block each, so the first stage
    runs as many tasks in parallel as there are blocks)."""
    return [frame.iloc[i : i + rows].reset_index(drop=True) for i in range(0, len(frame), rows)] or [frame]


# Up to this many files are hashed in the calling process (8 reads in flight): starting a
# Ray Data pass costs seconds, more than hashing a few hundred files takes.
LOCAL_HASH_MAX = 512


def hash_paths(paths: pd.Series, local_max: int = LOCAL_HASH_MAX) -> pd.DataFrame:
    """sha256 and read_error of every path, indexed by path: read in parallel on the cluster,
    or here when there are at most `local_max` paths."""
    import ray

    if len(paths) <= local_max:
        frame = pd.DataFrame(hash_files({"path": paths.astype(object).to_numpy()}, storage.read_bytes))
        return frame.drop_duplicates("path").set_index("path")
    hashed = whole_output_pass(
        ray.data.from_pandas(row_blocks(pd.DataFrame({"path": paths}), 64)).map_batches(
            hash_batch, batch_format="numpy", batch_size=64
        )
    ).to_pandas()
    return hashed.drop_duplicates("path").set_index("path")


@dataclass
class Streamed:
    """What the streaming stage hands on: the feature rows in (path, aug_index) order, the
    images that failed, where the work ran, and (when asked for) the trunk maps."""

    meta: pd.DataFrame
    matrix: np.ndarray  # N x 2048 float32
    errors: pd.DataFrame
    facts: dict[str, Any]
    maps: MapsShards | None = None  # the trunk maps' shards (`leukray.distributed.maps`)
    cell_matrix: np.ndarray | None = None  # N x D float32, rows as `meta`; None without cell families


def _features_dataset(
    rows: pd.DataFrame, cfg: RunConfig, maps_stage: int, cell_families: tuple[str, ...]
) -> tuple[Any, bool]:
    import ray

    use_gpu, pool, actor_resources, threads = plan_actor_pool(
        cfg.extract.use_gpu, cfg.extract.actors, cfg.extract.accelerator_resource
    )
    block_rows = stream_block_rows(len(rows), ray.cluster_resources().get("CPU", 1), with_maps=maps_stage >= 0)
    ds = ray.data.from_pandas(row_blocks(rows[STREAM_COLUMNS], block_rows))
    ds = ds.map_batches(
        preprocess_batch,
        batch_format="numpy",
        batch_size=cfg.extract.preprocess_batch_size,
        fn_kwargs={
            "cfg": cfg.preprocess,
            "augment": cfg.augment,
            "seed": cfg.split.seed,
            "cell_families": cell_families,
        },
        **torch_actor_env(),  # the extractor's: with equal options Ray Data may fuse the two
    )
    ds = ds.map_batches(
        FeatureExtractor,
        batch_format="numpy",
        batch_size=extract_batch_size(cfg.extract.batch_size, use_gpu),
        fn_constructor_kwargs={
            "weights": cfg.extract.weights,
            "seed": cfg.extract.seed,
            "maps_stage": maps_stage,
            "deterministic": cfg.extract.deterministic,
            "threads": threads,
        },
        compute=pool,
        **actor_resources,
    )
    return ds, use_gpu


def extract_features(
    rows: pd.DataFrame,
    cfg: RunConfig,
    features_path: str | None,
    provenance: dict[str, str],
    keep_maps: bool = False,
    cell_features_path: str | None = None,
) -> Streamed:
    """Stream `rows` through CPU preprocessing and the ResNet50 actor pool, writing
    `features_path` incrementally (None: only the maps are wanted, nothing is written), and
    the hand-crafted cell features `extract.features` asks for to `cell_features_path`
    (same rows).

    With `keep_maps`, the trunk maps for the custom model are computed in the same pass and
    written as shards under the run folder as they arrive (`leukray.distributed.maps`);
    `maps` names them, for the training workers to read every epoch and the embedding
    pass to stream, without running the trunk again or holding them in the object store. When only
    the maps are wanted and complete shards of the same rows and settings exist (an
    interrupted run resumed), they are read back instead of being computed.
    """
    # only the run's own features file wants the cell families (a train job's maps pass does not)
    families = cfg.extract.cell_families if features_path and cell_features_path else ()
    plan = None
    if keep_maps:
        # Ray Train reads the maps in the shards' order and shuffles them with a seed: a
        # seeded row order (classes mixed, not path order) kept through the stream makes
        # the training batches, and so the trained head, the same in every run.
        rows = rows.sample(frac=1.0, random_state=cfg.train.seed)
        plan = plan_maps(rows, cfg, provenance, cfg.train.unfreeze_stages)
        if features_path is None and (ready := existing_maps(plan)) is not None:
            log(f"reading back the trunk maps of the same images and settings from {plan.folder}")
            return _streamed_maps_only(cfg, ready, reused=True)
    ds, use_gpu = _features_dataset(rows, cfg, cfg.train.unfreeze_stages if keep_maps else -1, families)
    if plan is not None:
        ds.context.execution_options.preserve_order = True
        ds = add_shard_writer(ds, plan)
    with contextlib.ExitStack() as stack:
        writer = cell_writer = None
        if features_path:
            writer = stack.enter_context(FeatureFileWriter(features_path, FEATURE_DIM, provenance))
            if families:
                cell_writer = FeatureFileWriter(cell_features_path, feature_dim(families), provenance)
                stack.enter_context(cell_writer)
        drained = _drain(ds, writer, cell_writer, maps=plan is not None)
    facts = {
        "device": "gpu" if use_gpu else "cpu",
        "batch_size": extract_batch_size(cfg.extract.batch_size, use_gpu),
        "node_ids": drained["node_ids"],
        "feature_rows": drained["rows"],
    }
    maps = finish_shards(plan, drained["shards"], drained["all_rows"]) if plan is not None else None
    if writer is None:
        return _streamed_maps_only(cfg, maps, facts=facts)
    meta, matrix = writer.sorted_rows()
    cell_matrix = cell_writer.sorted_rows()[1] if cell_writer is not None else None
    return Streamed(meta, matrix, writer.errors, facts, maps, cell_matrix)


def _drain(ds: Any, writer: Any, cell_writer: Any, maps: bool) -> dict[str, Any]:
    """Pull the stream through the driver: the feature rows to their writers; the nodes the
    work ran on, the usable rows, and (with maps) the shards in stream order."""
    columns = ["path", "label", "subject", "split", "aug_index", "error", "features", "preprocess_node", "node_id"]
    if writer is None:
        columns = ["path", "error", "preprocess_node", "node_id"]
    elif cell_writer is not None:
        columns.append("cell_features")
    if maps:
        columns.append("maps_shard")
    nodes: dict[str, set[str]] = {"preprocess": set(), "extract": set()}
    shards: dict[str, None] = {}  # insertion-ordered: stream order
    rows = all_rows = 0
    for batch in ds.select_columns(columns).iter_batches(batch_format="numpy", batch_size=256):
        nodes["preprocess"].update(map(str, batch["preprocess_node"]))
        nodes["extract"].update(map(str, batch["node_id"]))
        if writer is not None:
            writer.write(batch)
        if cell_writer is not None:
            cell_writer.write({**batch, "features": batch["cell_features"]})
        if maps:
            shards.update(dict.fromkeys(str(s) for s in batch["maps_shard"]))
        rows += int((~error_mask(batch)).sum())
        all_rows += len(batch["path"])
    return {
        "node_ids": {k: sorted(v) for k, v in nodes.items()},
        "rows": rows,
        "all_rows": all_rows,
        "shards": list(shards),
    }


def _streamed_maps_only(
    cfg: RunConfig, maps: MapsShards | None, facts: dict[str, Any] | None = None, reused: bool = False
) -> Streamed:
    """A `Streamed` without features (a train job's maps pass, or its shards read back)."""
    if facts is None:
        facts = {"device": "", "batch_size": 0, "node_ids": {}, "feature_rows": 0}
    facts = {**facts, "maps_reused": reused}
    empty = np.zeros((0, FEATURE_DIM), np.float32)
    return Streamed(pd.DataFrame(), empty, pd.DataFrame(columns=ERROR_COLUMNS), facts, maps)


def embed_maps(
    maps: MapsShards,
    cfg: RunConfig,
    state_path: str,
    head_config: dict[str, Any],
    features_path: str,
    provenance: dict[str, str],
) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """The trained custom model over every map: its penultimate activations written to
    `features_path` (Table IV's features) and its own probabilities of the original images.

    Returns:
        (feature rows, their N x embedding matrix, head probabilities: path, split, label,
        subject, head_prob (C floats)).
    """
    on_gpu, pool, resources, threads = plan_actor_pool(
        cfg.extract.use_gpu, cfg.extract.actors, cfg.extract.accelerator_resource
    )
    # the actors read the shards themselves: only paths go in and embeddings come out
    embedded = maps.paths().map_batches(
        CustomEmbedder,
        batch_format="numpy",
        batch_size=SHARDS_PER_TASK,
        fn_constructor_kwargs={
            "state_path": state_path,
            "head_config": head_config,
            "embedding": cfg.train.embedding,
            "shape": tuple(maps.record["shape"]),
            "node_ip": maps.node_ip,
            "threads": threads,
        },
        compute=pool,
        **resources,
    )
    prob_parts = []
    with FeatureFileWriter(features_path, cfg.train.embedding, provenance) as writer:
        for batch in embedded.iter_batches(batch_format="numpy", batch_size=256):
            writer.write(batch)
            keep = ~error_mask(batch) & (batch["aug_index"] == 0)
            columns = {c: batch[c][keep].astype(str) for c in ("path", "split", "label", "subject")}
            prob_parts.append(pd.DataFrame({**columns, "head_prob": list(batch["head_prob"][keep])}))
    head_probs = pd.concat(prob_parts, ignore_index=True) if prob_parts else pd.DataFrame()
    meta, matrix = writer.sorted_rows()
    return meta, matrix, head_probs


def _bundle_stream(ds: Any, bundle: Bundle, model_dir: str) -> tuple[Any, bool]:
    use_gpu, pool, resources, threads = plan_actor_pool("auto", 0)
    ds = ds.map_batches(
        BundlePredictor,
        batch_format="numpy",
        # 0 (auto) in a bundle: the batch for this device, as extraction chose it
        batch_size=extract_batch_size(int(bundle.manifest.get("extract_batch_size", 32)), use_gpu),
        fn_constructor_kwargs={"model_dir": model_dir, "threads": threads},
        compute=pool,
        **resources,
    )
    return ds, use_gpu


def predict_stream(images: pd.DataFrame, bundle: Bundle, model_dir: str, columns: list[str]) -> pd.DataFrame:
    """Images (path, label, subject) -> one row per image with `columns` (prob_all,
    predicted_label, error, ...), preprocessed as the bundle says."""
    import ray

    images = images.assign(split="", n_aug=0)
    ds = ray.data.from_pandas(row_blocks(images[STREAM_COLUMNS], 32))
    ds = ds.map_batches(
        preprocess_batch,
        batch_format="numpy",
        batch_size=16,
        fn_kwargs={
            "cfg": bundle.preprocess,
            "augment": AugmentConfig(oversample=0.0),
            "seed": 0,
            "cell_families": bundle.cell_families,
        },
        **torch_actor_env(),  # the classifier's: with equal options Ray Data may fuse the two
    )
    ds, _ = _bundle_stream(ds, bundle, model_dir)
    parts = [
        pd.DataFrame({c: batch[c] for c in columns}) for batch in ds.iter_batches(batch_format="numpy", batch_size=256)
    ]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def slide_tiles_dataset(slides: list[str], cfg: ScreenConfig) -> Any:
    """The detection rows of `slides`, created lazily on the cluster: `cfg.batch_size` slides
    per block into `slide_tiles` (a camera field -> one row, a whole slide -> one row per
    tile, read later by the detection tasks), re-blocked to `cfg.batch_size` rows so a
    slide's tiles spread over many tasks instead of running one after another in the task
    that planned them."""
    import ray

    ds = ray.data.from_pandas(row_blocks(pd.DataFrame({"path": slides}), cfg.batch_size))
    ds = ds.flat_map(slide_tiles, fn_kwargs={"cfg": cfg})
    return ds.repartition(target_num_rows_per_block=cfg.batch_size)


def screen_stream(
    slides: list[str], cfg: ScreenConfig, bundle: Bundle, model_dir: str, columns: list[str], thumbnail_px: int
) -> tuple[Generator[pd.DataFrame, None, None], bool]:
    """Smear fields and whole slides -> detected, cropped and classified cells (one row
    each, `columns`), handed over block by block as they arrive (a slide's rows may span
    blocks; each row says which detection unit, a field or a tile, it came from and how many
    rows that unit and how many units its slide has: `unit`, `unit_rows`, `units`), and
    whether the classifier runs on GPUs. Each field's thumbnail and each crop's JPEG come
    along for the review (`leukray.ops.review`)."""
    ds = slide_tiles_dataset(slides, cfg)
    ds = ds.map_batches(
        detect_review_batch,
        batch_format="numpy",
        batch_size=cfg.batch_size,
        fn_kwargs={
            "cfg": cfg,
            "preprocess_cfg": bundle.preprocess,
            "cell_families": bundle.cell_families,
            "thumbnail_px": thumbnail_px,
        },
        **torch_actor_env(),  # the classifier's: with equal options Ray Data may fuse the two
    )
    ds, use_gpu = _bundle_stream(ds, bundle, model_dir)
    # block by block as the classifier finishes them (no re-batching): a slide's rows reach
    # the driver, and its part the disk, as soon as they exist
    batches = ds.select_columns(columns).iter_batches(batch_format="numpy", batch_size=None)
    return _frames(batches, columns), use_gpu


def _frames(batches: Iterator[dict[str, np.ndarray]], columns: list[str]) -> Generator[pd.DataFrame, None, None]:
    """The batches as frames; closing this closes the stream (Ray Data stops its operators,
    so a screen that fails half-way leaves no actors holding the cluster's CPUs)."""
    try:
        for batch in batches:
            yield pd.DataFrame({c: batch[c] for c in columns})
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
