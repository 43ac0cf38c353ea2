"""`leukray extract`, the first stage of `run`: discover -> hash/deduplicate -> split ->
stream decode + Otsu-crop + augment -> ResNet50 features.

Writes config.yaml, manifest.parquet, features.parquet, errors.csv and extract.json, and
hands the same on in memory (`Extracted`); `load_extracted` rebuilds it from a run folder
for the stages run as separate jobs.

May import: `leukray.config`, `leukray.errors`, `leukray.io`, `leukray.data`, `leukray.models`,
`leukray.ops` (the stain target),
`leukray.distributed`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from leukray import __version__
from leukray.config import RunConfig
from leukray.data.manifest import build_manifest, discover_all
from leukray.distributed.streaming import extract_features, hash_paths
from leukray.errors import ConfigError, DataError
from leukray.io import journal, mapshards, runfolder, storage
from leukray.io.features import META_COLUMNS, load_features
from leukray.io.tables import log, read_csv, read_parquet, write_errors, write_json, write_parquet
from leukray.models.classifiers import select_classifiers
from leukray.models.trunk import WeightsInfo, resolve_weights
from leukray.ops.preprocess import fit_stain_target


@dataclass
class Extracted:
    """What the extract stage hands on."""

    cfg: RunConfig  # with `auto` weights resolved to what was used
    record: dict[str, Any]  # extract.json
    manifest: pd.DataFrame  # every image found: split "" for the unusable ones
    meta: pd.DataFrame  # feature rows (path, label, subject, split, aug_index), (path, aug_index) order
    matrix: np.ndarray  # N x 2048 float32, rows as `meta`
    errors: pd.DataFrame  # errors.csv
    maps: Any = None  # the trunk maps' shards for training (`MapsShards`), within one job
    cell_matrix: np.ndarray | None = None  # N x D hand-crafted cell features, rows as `meta`
    # the trunk trained on the cells (train.unfreeze_stages >= 1; `leukray.stages.trunktrain`):
    trained_matrix: np.ndarray | None = None  # N x 2048 float32, its features, rows as `meta`
    trunk_record: dict[str, Any] | None = None  # its train.json: weights (a WeightsInfo), epochs, ...

    @property
    def weights(self) -> WeightsInfo:
        return WeightsInfo(**self.record["weights"])

    @property
    def trained_weights(self) -> WeightsInfo:
        """The trained trunk's weights (its file), for the `trained` family."""
        return WeightsInfo(**self.trunk_record["weights"])


def _frozen_weights(cfg: RunConfig) -> tuple[RunConfig, WeightsInfo]:
    """`auto` resolved to imagenet or random, so the actors agree with the record."""
    _, weights = resolve_weights(cfg.extract.weights, cfg.extract.seed)
    spec = cfg.extract.weights
    if spec == "auto":
        spec = "random" if weights.kind == "random" else "imagenet"
    return dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, weights=spec)), weights


def extract_stage(
    cfg: RunConfig, start_ray: Callable[[], None] | None = None, keep_maps: bool = False, existing: str = "refuse"
) -> Extracted:
    """Run the stage (see the module docstring); `keep_maps` keeps the trunk maps for the
    train stage of the same job; `existing` says what to do with an earlier run in
    `cfg.out` (`leukray.io.journal.open_run`): with `resume`, a finished extraction of the
    same images and settings is read back instead of being redone."""
    if not cfg.out:
        raise ConfigError("no output folder: pass --out RUN")
    seconds: dict[str, float] = {}
    select_classifiers(cfg.sweep.classifiers)  # a bad list fails now, not after extraction
    tick = time.perf_counter()
    images, skipped = discover_all(cfg)  # paths and layout speak before the weights do
    cfg, weights = _frozen_weights(cfg)
    storage.makedirs(cfg.out)
    journal.open_run(cfg.out, runfolder.result_settings(cfg), existing)
    # the stain target (preprocess.stain) is fitted once on the data's colours, no labels
    cfg = dataclasses.replace(
        cfg, preprocess=fit_stain_target(list(images["path"]), cfg.preprocess, storage.read_bytes)
    )
    runfolder.write_config(cfg)
    if start_ray is not None:
        start_ray()
    where = cfg.data.path + (f" and {cfg.data.test_path}" if cfg.data.test_path else "")
    log(f"found {len(images)} images in {where}")
    manifest, errors, facts = build_manifest(cfg, images, skipped, hash_paths(images["path"]))
    seconds["discover_hash_split"] = time.perf_counter() - tick
    provenance = _provenance(cfg, weights, runfolder.data_fingerprint(manifest))
    identity = runfolder.extract_identity(cfg, provenance["data_fingerprint"], weights.as_dict())
    if existing == "resume" and journal.committed(cfg.out, "extract", identity):
        log(f"resuming: the extraction in {cfg.out} is of the same images and settings; reading it back")
        return load_extracted(cfg, "run", with_features=True)
    if existing == "refuse":
        journal.refuse_other(
            cfg.out, "extract", identity, f"data fingerprint now {provenance['data_fingerprint'][:12]}"
        )
    journal.begin(cfg.out, "extract", identity)
    return _extract_into(cfg, weights, provenance, manifest, errors, facts, seconds, keep_maps, identity)


def _extract_into(cfg, weights, provenance, manifest, errors, facts, seconds, keep_maps, identity) -> Extracted:
    """The stage's work once the run folder is claimed: manifest, features, record, commit."""
    write_parquet(storage.join(cfg.out, runfolder.MANIFEST_FILE), manifest[runfolder.MANIFEST_COLUMNS], provenance)
    usable = manifest[manifest["split"] != ""]
    log(
        f"{len(usable)} usable images ({facts['duplicates']} duplicates kept once, "
        f"{len(errors)} unreadable or skipped); "
        f"split: " + ", ".join(f"{k} {v}" for k, v in usable["split"].value_counts().items())
    )
    tick = time.perf_counter()
    log(f"preprocessing and extracting features with {weights.describe()}")
    features_path = storage.join(cfg.out, runfolder.FEATURES_FILE)
    if not keep_maps:
        mapshards.remove_maps(cfg.out)  # an earlier extraction's maps are not this one's
    cell_path = storage.join(cfg.out, runfolder.CELL_FEATURES_FILE)
    streamed = extract_features(
        usable, cfg, features_path, provenance, keep_maps=keep_maps, cell_features_path=cell_path
    )
    seconds["preprocess_augment_extract"] = time.perf_counter() - tick
    errors = pd.concat([errors, streamed.errors], ignore_index=True)
    write_errors(cfg.out, errors)
    record = _extract_record(weights, provenance, facts, manifest, usable, errors, streamed.facts, seconds)
    record["identity"] = identity
    write_json(storage.join(cfg.out, runfolder.EXTRACT_RECORD), record)
    journal.commit(cfg.out, "extract")
    log(f"wrote {features_path}: {streamed.facts['feature_rows']} rows ({len(errors)} errors in errors.csv)")
    return Extracted(cfg, record, manifest, streamed.meta, streamed.matrix, errors, streamed.maps, streamed.cell_matrix)


def _provenance(cfg: RunConfig, weights: WeightsInfo, fingerprint: str) -> dict[str, str]:
    """What every Parquet file of the run carries in its schema metadata."""
    return {
        "weights": json.dumps(weights.as_dict()),
        "data": cfg.data.path,
        "test_data": cfg.data.test_path,
        "data_fingerprint": fingerprint,
        "leukray_version": __version__,
    }


def _extract_record(
    weights: WeightsInfo,
    provenance: dict[str, str],
    facts: dict[str, Any],
    manifest: pd.DataFrame,
    usable: pd.DataFrame,
    errors: pd.DataFrame,
    stream_facts: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, Any]:
    subjects = usable.groupby("split")["subject_group"].nunique()
    return {
        "leukray_version": __version__,
        "weights": weights.as_dict(),
        "provenance": provenance,
        "fingerprint": provenance["data_fingerprint"],
        "facts": facts,
        "counts": {
            "found": int(len(manifest)),
            "errors": int(len(errors)),
            "feature_rows": stream_facts["feature_rows"],
            "subjects_by_split": {k: int(v) for k, v in subjects.items()},
        },
        "ray": {
            "extract_device": stream_facts["device"],
            "extract_batch_size": stream_facts["batch_size"],
            "node_ids": stream_facts["node_ids"],
        },
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def load_extracted(cfg: RunConfig, needed_by: str, with_features: bool = True) -> Extracted:
    """The extract stage's results from the run folder `cfg.out` (for a separate train or
    tune job): the one reader of what `extract_stage` wrote. Without `with_features` the
    2,048-d vectors are not read (`matrix` is empty)."""
    out = cfg.out
    journal.verify(out, "extract", needed_by)  # finished, and nothing changed since: before any file is read
    record = runfolder.read_record(out, runfolder.EXTRACT_RECORD, needed_by, "extract")
    manifest = read_parquet(storage.join(out, runfolder.MANIFEST_FILE))
    features_path = storage.join(out, runfolder.FEATURES_FILE)
    cell_matrix = None
    if with_features:
        meta, matrix = load_features(features_path)
        if cfg.extract.cell_families:
            cell_path = storage.join(out, runfolder.CELL_FEATURES_FILE)
            if not storage.exists(cell_path):
                raise DataError(
                    f"{cell_path} not found: {out} was extracted without the cell features that "
                    f"extract.features={cfg.extract.features!r} needs; run `leukray extract` into a new folder"
                )
            cell_meta, cell_matrix = load_features(cell_path)
            if not cell_meta[["path", "aug_index"]].equals(meta[["path", "aug_index"]]):
                raise DataError(
                    f"{out}: cell_features.parquet and features.parquet hold other rows; rerun `leukray extract`"
                )
    else:
        meta, matrix = read_parquet(features_path, columns=META_COLUMNS), np.zeros((0, 0), np.float32)
    errors = read_csv(storage.join(out, "errors.csv"))
    return Extracted(cfg, record, manifest, meta, matrix, errors, cell_matrix=cell_matrix)
