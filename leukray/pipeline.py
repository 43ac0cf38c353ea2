"""`leukray run`: discover -> hash/deduplicate -> split -> (Ray Data, streaming) decode +
Otsu-crop + augment on CPU workers -> ResNet50 features in an actor pool -> Ray Tune
classifier sweep -> outputs.

The run folder (other tools read these names):
  config.yaml, manifest.parquet, features.parquet, leaderboard.csv, leaderboard.md,
  errors.csv, summary.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from leukray import __version__, storage
from leukray.augment import plan_copies
from leukray.config import RunConfig
from leukray.dataset import assign_groups, discover, hash_files, mark_duplicates
from leukray.errors import ConfigError, DataError
from leukray.features import FEATURE_DIM, FeatureExtractor, WeightsInfo, ray_node_id, resolve_weights
from leukray.preprocess import load_and_preprocess
from leukray.splits import TEST, TRAIN, VAL, leaking_groups, split_by_group, split_by_image
from leukray.sweep import (
    SweepData,
    best_row,
    format_row,
    run_sweep_tune,
    select_classifiers,
)

ERROR_COLUMNS = ["path", "stage", "reason"]
ROWS_PER_BLOCK = 32


def log(message: str) -> None:
    print(f"[leukray] {message}", flush=True)


def _chunks(frame: pd.DataFrame, rows: int) -> list[pd.DataFrame]:
    return [frame.iloc[i : i + rows].reset_index(drop=True) for i in range(0, len(frame), rows)] or [frame]


def _hash_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = hash_files(batch, storage.read_bytes)
    out["node_id"] = np.asarray([ray_node_id()] * len(out["path"]), dtype=object)
    return out


def _preprocess_batch(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    out = load_and_preprocess(batch, read_bytes=storage.read_bytes, **kwargs)
    out["preprocess_node"] = np.asarray([ray_node_id()] * len(out["path"]), dtype=object)
    return out


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))


# -- planning: which images, which split, how many augmented copies ----------------------


def discover_all(cfg: RunConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The images of --data (and --test-data), with a `dataset` column; no Ray needed."""
    images, skipped = discover(cfg.data.path, cfg.data.layout)
    images["dataset"] = "data"
    if cfg.data.test_path:
        test_images, test_skipped = discover(cfg.data.test_path, cfg.data.layout)
        test_images["dataset"] = "test-data"
        images = pd.concat([images, test_images], ignore_index=True)
        skipped = pd.concat([skipped, test_skipped], ignore_index=True)
    return images, skipped


def build_manifest(cfg: RunConfig, images: pd.DataFrame, skipped: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Hash (on Ray), deduplicate and split. Returns (manifest, errors, facts)."""
    import ray

    log(f"found {len(images)} images in {cfg.data.path}" + (f" and {cfg.data.test_path}" if cfg.data.test_path else ""))

    hashed = (
        ray.data.from_pandas(_chunks(images[["path"]], 64))
        .map_batches(_hash_batch, batch_format="numpy", batch_size=64)
        .to_pandas()
    )
    hashed = hashed.drop_duplicates("path").set_index("path")
    images["sha256"] = images["path"].map(hashed["sha256"]).fillna("")
    read_error = images["path"].map(hashed["read_error"]).fillna("not hashed")
    images["duplicate_of"] = mark_duplicates(images)
    errors = [skipped]
    unreadable = read_error != ""
    errors.append(pd.DataFrame({"path": images.loc[unreadable, "path"], "stage": "read", "reason": read_error[unreadable]}))

    images["split"] = ""
    usable = (~unreadable) & (images["duplicate_of"] == "")
    primary = usable & (images["dataset"] == "data")
    test_data = usable & (images["dataset"] == "test-data")
    groups, group_source = assign_groups(images)
    test_fraction = 0.0 if cfg.data.test_path else cfg.split.test_fraction
    if images.loc[primary, "label"].nunique() < 2:
        raise DataError(f"need at least two classes of usable images in {cfg.data.path}; found {sorted(images.loc[primary, 'label'].unique())}")
    if cfg.split.mode == "subject":
        images.loc[primary, "split"] = split_by_group(
            images.loc[primary, "label"], groups[primary], test_fraction, cfg.split.val_fraction, cfg.split.seed
        )
    else:
        images.loc[primary, "split"] = split_by_image(
            images.loc[primary, "label"], test_fraction, cfg.split.val_fraction, cfg.split.seed
        )
    images.loc[test_data, "split"] = TEST
    if not (images["split"] == TEST).any():
        raise DataError("the test split is empty: check --test-data or split.test_fraction")

    images["n_aug"] = 0
    train = images[images["split"] == TRAIN]
    if cfg.augment.enabled:
        images.loc[train.index, "n_aug"] = plan_copies(train, cfg.augment, cfg.split.seed)
    images["subject_group"] = groups
    facts = {
        "group_source": group_source,
        "leaking_subjects": leaking_groups(images.loc[usable, "split"], groups[usable]),
        "duplicates": int((images["duplicate_of"] != "").sum()),
        "duplicate_pairs": images.loc[images["duplicate_of"] != "", ["path", "duplicate_of"]].to_dict("records")[:1000],
    }
    return images, pd.concat(errors, ignore_index=True).reindex(columns=ERROR_COLUMNS), facts


# -- the streaming stage: preprocess + augment -> features --------------------------------


def extractor_compute(cfg_use_gpu: str, actors: int, accelerator_resource: str = "") -> tuple[bool, Any, dict[str, Any]]:
    """(use_gpu, compute strategy, resources) for a model actor pool, asked of the cluster."""
    import ray

    if accelerator_resource and ray.cluster_resources().get(accelerator_resource, 0) > 0:
        count = int(ray.cluster_resources()[accelerator_resource])
        pool = ray.data.ActorPoolStrategy(size=actors or max(1, count))
        return False, pool, {"num_cpus": 1, "resources": {accelerator_resource: 1}}
    use_gpu = cfg_use_gpu == "true" or (cfg_use_gpu == "auto" and cluster_gpus() > 0)
    if use_gpu and cluster_gpus() == 0:
        raise ConfigError("use_gpu is true but the Ray cluster has no GPUs")
    if use_gpu:
        return True, ray.data.ActorPoolStrategy(size=actors or max(1, int(cluster_gpus()))), {"num_gpus": 1, "num_cpus": 1}
    if actors:  # asked for: exactly that many
        return False, ray.data.ActorPoolStrategy(size=actors), {"num_cpus": 1}
    # CPU-only: 1-CPU actors scale from one up to one per CPU, so the pool uses every core.
    return False, ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(cluster_cpus()))), {"num_cpus": 1}


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
        metadata={b"leukray": json.dumps(provenance).encode()},
    )


class FeatureFileWriter:
    """Streams batches with a `features` (N x dim) column into one Parquet file, written
    atomically; rows whose `error` is set go to `errors` instead."""

    def __init__(self, path: str, dim: int, provenance: dict[str, str]):
        self.path, self.dim = path, dim
        self.schema = feature_schema(dim, provenance)
        self.meta_parts: list[pd.DataFrame] = []
        self.error_parts: list[pd.DataFrame] = []

    def __enter__(self) -> "FeatureFileWriter":
        self._atomic = storage.AtomicLocalFile(self.path)
        self._writer = pq.ParquetWriter(self._atomic.__enter__(), self.schema)
        return self

    def write(self, batch: dict[str, np.ndarray]) -> None:
        bad = np.asarray([bool(e) for e in batch["error"]]) if "error" in batch else np.zeros(len(batch["path"]), bool)
        if bad.any():
            self.error_parts.append(
                pd.DataFrame({"path": batch["path"][bad], "stage": "preprocess", "reason": batch["error"][bad]})
            )
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

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()
        self._atomic.__exit__(exc_type, exc, tb)

    @property
    def meta(self) -> pd.DataFrame:
        return pd.concat(self.meta_parts, ignore_index=True) if self.meta_parts else pd.DataFrame(columns=self.schema.names[:-1])

    @property
    def errors(self) -> pd.DataFrame:
        return pd.concat(self.error_parts, ignore_index=True) if self.error_parts else pd.DataFrame(columns=ERROR_COLUMNS)


def extract_features(
    rows: pd.DataFrame, cfg: RunConfig, features_path: str | None, provenance: dict[str, str], keep_maps: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], Any]:
    """Stream `rows` through CPU preprocessing and the ResNet50 actor pool, writing
    `features_path` incrementally.

    With `keep_maps`, the trunk maps for the custom model are computed in the same pass and
    the dataset is materialised (in Ray's object store, spilling to disk) so training reads
    them every epoch without running the trunk again.

    Returns:
        (features metadata, errors, facts about where the work ran, maps dataset or None).
    """
    import ray

    use_gpu, pool, actor_resources = extractor_compute(cfg.extract.use_gpu, cfg.extract.actors, cfg.extract.accelerator_resource)
    maps_stage = cfg.train.unfreeze_stages if keep_maps else -1
    ds = ray.data.from_pandas(_chunks(rows[["path", "label", "subject", "split", "n_aug"]], ROWS_PER_BLOCK))
    ds = ds.map_batches(
        _preprocess_batch,
        batch_format="numpy",
        batch_size=cfg.extract.preprocess_batch_size,
        fn_kwargs={"cfg": cfg.preprocess, "augment": cfg.augment, "seed": cfg.split.seed},
    )
    ds = ds.map_batches(
        FeatureExtractor,
        batch_format="numpy",
        batch_size=cfg.extract.batch_size,
        fn_constructor_kwargs={"weights": cfg.extract.weights, "seed": cfg.extract.seed, "maps_stage": maps_stage},
        compute=pool,
        **actor_resources,
    )
    if keep_maps:
        ds = ds.materialize()
    nodes: dict[str, set[str]] = {"preprocess": set(), "extract": set()}
    columns = ["path", "label", "subject", "split", "aug_index", "error", "features", "preprocess_node", "node_id"]
    if features_path is None:  # only the maps are wanted (a separate training job)
        columns = ["path", "error", "preprocess_node", "node_id"]
    rows_written = 0
    with FeatureFileWriter(features_path, FEATURE_DIM, provenance) if features_path else contextlib.nullcontext() as writer:
        for batch in ds.select_columns(columns).iter_batches(batch_format="numpy", batch_size=256):
            nodes["preprocess"].update(map(str, batch["preprocess_node"]))
            nodes["extract"].update(map(str, batch["node_id"]))
            if writer is not None:
                writer.write(batch)
            rows_written += int(sum(1 for e in batch["error"] if not e))
    facts = {
        "device": "gpu" if use_gpu else "cpu",
        "node_ids": {k: sorted(v) for k, v in nodes.items()},
        "feature_rows": rows_written,
    }
    maps_ds = ds.select_columns(["path", "label", "subject", "split", "aug_index", "error", "maps"]) if keep_maps else None
    if writer is None:
        return pd.DataFrame(), pd.DataFrame(columns=ERROR_COLUMNS), facts, maps_ds
    return writer.meta, writer.errors, facts, maps_ds


def load_features(path: str) -> tuple[pd.DataFrame, np.ndarray]:
    """features.parquet -> (metadata frame, N x 2048 float32 matrix), rows ordered by (path,
    aug_index): the file holds them in the order the stream finished them, which changes from
    run to run, and order-sensitive classifiers (bagging, SGD, ...) would change with it."""
    fs, inner = storage.resolve(path)
    table = pq.read_table(inner, filesystem=fs)
    dim = table.schema.field("features").type.list_size
    matrix = table.column("features").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    meta = table.drop_columns(["features"]).to_pandas()
    order = np.lexsort((meta["aug_index"].to_numpy(), meta["path"].to_numpy()))
    return meta.iloc[order].reset_index(drop=True), matrix[order]


def class_order(labels: np.ndarray, positive: str) -> list[str]:
    """Label names in code order: the positive class (ALL) last, so it is code 1 when binary."""
    names = sorted(set(map(str, labels)))
    if positive in names:
        names = [n for n in names if n != positive] + [positive]
    return names


def sweep_data(meta: pd.DataFrame, matrix: np.ndarray, positive: str = "all") -> SweepData:
    """Train on the training split including its augmented copies; validate and test on
    original images only. Labels are encoded as integers (XGBoost needs 0..C-1)."""
    original = meta["aug_index"].to_numpy() == 0
    pick = {
        TRAIN: (meta["split"] == TRAIN).to_numpy(),
        VAL: (meta["split"] == VAL).to_numpy() & original,
        TEST: (meta["split"] == TEST).to_numpy() & original,
    }
    labels = meta["label"].to_numpy().astype(str)
    classes = class_order(labels, positive)
    code = {name: i for i, name in enumerate(classes)}
    codes = np.fromiter((code[v] for v in labels), dtype=np.int64, count=len(labels))
    return SweepData(
        matrix[pick[TRAIN]], codes[pick[TRAIN]],
        matrix[pick[VAL]], codes[pick[VAL]],
        matrix[pick[TEST]], codes[pick[TEST]],
        classes=classes,
    )


# -- outputs --------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if math.isnan(value) else float(value)
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


def write_json(path: str, payload: dict[str, Any]) -> None:
    storage.write_text(path, json.dumps(_clean(payload), indent=2, default=_json_default) + "\n")


def write_parquet(path: str, frame: pd.DataFrame, provenance: dict[str, str]) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"leukray": json.dumps(provenance).encode()})
    with storage.AtomicLocalFile(path) as tmp:
        pq.write_table(table, tmp)


def leaderboard_markdown(board: pd.DataFrame, weights: WeightsInfo, data_desc: str, split_desc: str,
                         title: str = "ResNet50 trunk features (the paper's Table III)") -> str:
    lines = [
        f"# Classifier sweep on {title}",
        "",
        f"- Trunk weights: **{weights.describe()}**",
        f"- Data: {data_desc}",
        f"- Split: {split_desc}",
        "- Metrics on the test split; ROC AUC from predicted scores; the best model is chosen on validation.",
        "",
    ]
    if not weights.is_pretrained:
        lines.insert(2, "> **Random-init trunk: these are NOT ImageNet-feature results.**\n")
    shown = board.copy()
    for col in ["Accuracy", "Balanced Accuracy", "ROC AUC", "F1 Score", "Val Balanced Accuracy"]:
        shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    shown["Time Taken"] = shown["Time Taken"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    shown["detail"] = shown["detail"].fillna("").map(lambda s: str(s).replace("|", "/")[:120])
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines + [header, rule, *body]) + "\n"


def describe_split(cfg: RunConfig, facts: dict[str, Any]) -> str:
    if cfg.split.mode == "image":
        return (
            f"image-level (the paper's protocol): {facts['leaking_subjects']} subject(s) have images on more than "
            "one side, so scores are optimistic for new patients"
        )
    base = f"subject-level, stratified (no subject on two sides); groups: {facts['group_source']}"
    if cfg.data.test_path:
        base += f"; test = the separate dataset {cfg.data.test_path}"
    return base


def counts_by(frame: pd.DataFrame, *keys: str) -> dict[str, Any]:
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


# -- the stages: `run` = extract -> train -> finish in one job; `extract`, `train`, `tune` --
# -- run them as separate jobs on the same run folder, each leaving a record the next reads --

EXTRACT_RECORD = "extract.json"
TRAIN_RECORD = "train.json"
HEAD_PROBS = "head_probs.parquet"
# What the extract job fixed: a later stage that changed these would mix runs.
FIXED_BY_EXTRACT = ("data", "preprocess", "augment", "split", "extract.weights", "extract.seed")


@dataclass
class Extracted:
    """What the extract stage hands on: its record (extract.json) and, within one job, the
    trunk maps for training."""

    cfg: RunConfig
    record: dict[str, Any]
    maps_ds: Any = None


def read_json(path: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(path).decode("utf-8"))


def read_record(out: str, name: str, needed_by: str, made_by: str) -> dict[str, Any]:
    path = storage.join(out, name)
    if not storage.exists(path):
        raise DataError(f"{path} not found: `leukray {needed_by}` needs a run folder that `leukray {made_by}` wrote")
    return read_json(path)


def stage_config(out: str, stage: str, yaml_values: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    """The config of a later stage: the run folder's config.yaml, then the user's YAML and
    options. Changing what the extract job fixed is refused (it would describe other data
    than the features hold); `tune` also keeps the settings the custom model was trained with."""
    from leukray.config import build_config, load_yaml_text

    path = storage.join(out, "config.yaml")
    if not storage.exists(path):
        raise DataError(f"{path} not found: run `leukray extract --out {out}` first")
    recorded = build_config(load_yaml_text(storage.read_bytes(path).decode("utf-8"), path))
    merged = build_config(_deep_merge(recorded.to_dict(), yaml_values), overrides)
    fixed = []
    for key in FIXED_BY_EXTRACT:  # a whole section is checked field by field, to name the field
        value = _get(recorded, key)
        fixed += [f"{key}.{f}" for f in value.__dataclass_fields__] if dataclasses.is_dataclass(value) else [key]
    if stage == "tune":
        fixed += [f"train.{k}" for k in recorded.train.__dataclass_fields__ if k != "enabled"]
    for key in fixed:
        if _get(merged, key) != _get(recorded, key):
            raise ConfigError(
                f"{key} was fixed by an earlier stage of {out} ({_get(recorded, key)!r}); "
                f"`leukray {stage}` cannot change it (start a new run folder instead)"
            )
    return dataclasses.replace(merged, out=out)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def _get(cfg: RunConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def extract_stage(cfg: RunConfig, start_ray: Callable[[], None] | None = None, keep_maps: bool = False) -> Extracted:
    """discover -> hash/deduplicate -> split -> stream preprocess/augment/extract.

    Writes config.yaml, manifest.parquet, features.parquet, errors.csv and extract.json.
    """
    if not cfg.out:
        raise ConfigError("no output folder: pass --out RUN")
    out = cfg.out
    seconds: dict[str, float] = {}
    select_classifiers(cfg.sweep.classifiers)  # a bad list fails now, not after extraction
    _, weights = resolve_weights(cfg.extract.weights, cfg.extract.seed)
    weights_spec = cfg.extract.weights
    if cfg.extract.weights == "auto":  # freeze the choice so the actors agree with the record
        weights_spec = "random" if weights.kind == "random" else "imagenet"
    cfg = _replace_weights(cfg, weights_spec)

    tick = time.perf_counter()
    images, skipped = discover_all(cfg)
    storage.makedirs(out)
    storage.write_text(storage.join(out, "config.yaml"), cfg.to_yaml())
    if start_ray is not None:
        start_ray()
    manifest, errors, facts = build_manifest(cfg, images, skipped)
    seconds["discover_hash_split"] = time.perf_counter() - tick
    fingerprint = _fingerprint(manifest)
    provenance = {
        "weights": json.dumps(weights.as_dict()),
        "data": cfg.data.path,
        "test_data": cfg.data.test_path,
        "data_fingerprint": fingerprint,
        "leukray_version": __version__,
    }
    write_parquet(
        storage.join(out, "manifest.parquet"),
        manifest[["path", "label", "subject", "split", "sha256", "duplicate_of", "dataset", "n_aug"]],
        provenance,
    )
    usable = manifest[manifest["split"] != ""]
    log(
        f"{len(usable)} usable images ({facts['duplicates']} duplicates kept once, {len(errors)} unreadable or skipped); "
        f"split: " + ", ".join(f"{k} {v}" for k, v in usable["split"].value_counts().items())
    )

    tick = time.perf_counter()
    log(f"preprocessing and extracting features with {weights.describe()}")
    meta, stream_errors, stream_facts, maps_ds = extract_features(
        usable, cfg, storage.join(out, "features.parquet"), provenance, keep_maps=keep_maps
    )
    seconds["preprocess_augment_extract"] = time.perf_counter() - tick
    errors = pd.concat([errors, stream_errors], ignore_index=True)
    _write_errors(out, errors)
    record = {
        "leukray_version": __version__,
        "weights": weights.as_dict(),
        "provenance": provenance,
        "fingerprint": fingerprint,
        "facts": facts,
        "counts": {
            "found": int(len(manifest)),
            "errors": int(len(errors)),
            "feature_rows": stream_facts["feature_rows"],
            "subjects_by_split": {k: int(v) for k, v in usable.groupby("split")["subject_group"].nunique().items()},
        },
        "ray": {"extract_device": stream_facts["device"], "node_ids": stream_facts["node_ids"]},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    write_json(storage.join(out, EXTRACT_RECORD), record)
    log(f"wrote {storage.join(out, 'features.parquet')}: {stream_facts['feature_rows']} rows ({len(errors)} errors in errors.csv)")
    return Extracted(cfg, record, maps_ds)


def train_stage(cfg: RunConfig, start_ray: Callable[[], None] | None = None, maps_ds: Any = None) -> dict[str, Any]:
    """Train the custom ResNet50 (Table II head) and write its embeddings.

    Within `leukray run` the trunk maps come from the extraction pass (`maps_ds`); as a job
    of its own it streams the run's images through the trunk again (same preprocessing,
    same seeded augmentation) to get them. Writes model/custom_resnet50.pt, history.csv,
    custom_features.parquet, head_probs.parquet and train.json.
    """
    from leukray.custom import train_and_embed

    out = cfg.out
    record = read_record(out, EXTRACT_RECORD, "train", "extract")
    meta = read_parquet(storage.join(out, "features.parquet"), columns=["label", "split"])  # not the 2,048-d vectors
    classes = class_order(meta["label"].to_numpy().astype(str), cfg.data.positive_label)
    if not (meta["split"] == VAL).any():
        raise ConfigError("training the custom model needs a validation split: set split.val_fraction > 0")
    storage.write_text(storage.join(out, "config.yaml"), cfg.to_yaml())
    if start_ray is not None:
        start_ray()
    node_ids: dict[str, list[str]] = {}
    if maps_ds is None:
        manifest = read_parquet(storage.join(out, "manifest.parquet"))
        usable = manifest[manifest["split"] != ""]
        log(f"computing trunk maps of {len(usable)} images for training ({record['weights']['name']} trunk)")
        _, _, facts, maps_ds = extract_features(usable, cfg, None, record["provenance"], keep_maps=True)
        node_ids = facts["node_ids"]
    tick = time.perf_counter()
    stage = train_and_embed(cfg, maps_ds, classes, record["fingerprint"], out, record["provenance"])
    write_parquet(storage.join(out, HEAD_PROBS), stage.head_probs.assign(head_prob=stage.head_probs["head_prob"].map(list)), record["provenance"])
    train_record = {
        "fingerprint": record["fingerprint"],
        "weights": record["weights"]["name"],
        "classes": classes,
        "head_config": stage.head_config,
        "state_path": stage.state_path,
        "custom_model": {
            "epochs": len(stage.result.history),
            "best_epoch": stage.result.best_epoch,
            "best_val_balanced_accuracy": stage.result.best_val_balanced_accuracy,
            "embedding": cfg.train.embedding,
            "unfreeze_stages": cfg.train.unfreeze_stages,
            "head_parameters_keras_count": _head_parameters(stage.head_config),
        },
        "ray": {"maps_node_ids": node_ids},
        "seconds": {"train": round(time.perf_counter() - tick, 2)},
    }
    write_json(storage.join(out, TRAIN_RECORD), train_record)
    return train_record


def run_pipeline(cfg: RunConfig, start_ray: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run everything in one job and write the run folder; returns summary.json's content.

    Args:
        cfg: the resolved configuration.
        start_ray: called once the inputs are checked (so a user mistake is reported
            before Ray starts); without it Ray must already be initialised.
    """
    t0 = time.perf_counter()
    extracted = extract_stage(cfg, start_ray, keep_maps=cfg.train.enabled)
    if cfg.train.enabled:
        # the maps were computed in the extraction pass; an empty train.json check happens there
        train_stage(extracted.cfg, None, maps_ds=extracted.maps_ds)
    elif storage.exists(storage.join(cfg.out, TRAIN_RECORD)):
        storage.delete(storage.join(cfg.out, TRAIN_RECORD))  # a stale custom model from an earlier run
    return finish_stage(extracted.cfg, total_start=t0)


def finish_stage(cfg: RunConfig, start_ray: Callable[[], None] | None = None, total_start: float | None = None) -> dict[str, Any]:
    """Sweep classifiers on the trunk features (Table III) and, when the custom model was
    trained, on its embeddings (Table IV); choose the model on validation; write
    predictions.parquet, the model bundle, summary.json and the report."""
    t0 = time.perf_counter() if total_start is None else total_start
    out = cfg.out
    record = read_record(out, EXTRACT_RECORD, "tune", "extract")
    seconds: dict[str, float] = dict(record["seconds"])
    names = select_classifiers(cfg.sweep.classifiers)
    weights = WeightsInfo(**record["weights"])
    provenance, fingerprint, facts = record["provenance"], record["fingerprint"], record["facts"]
    train_record = None
    if cfg.train.enabled and storage.exists(storage.join(out, TRAIN_RECORD)):
        train_record = read_json(storage.join(out, TRAIN_RECORD))
        if train_record["fingerprint"] != fingerprint or train_record["weights"] != weights.name:
            raise DataError(
                f"{storage.join(out, TRAIN_RECORD)} belongs to other features (data or weights changed): run `leukray train --out {out}` again"
            )
        seconds.update(train_record["seconds"])
    storage.write_text(storage.join(out, "config.yaml"), cfg.to_yaml())
    if start_ray is not None:
        start_ray()

    meta, matrix = load_features(storage.join(out, "features.parquet"))
    errors = read_csv(storage.join(out, "errors.csv"))
    data = sweep_data(meta, matrix, cfg.data.positive_label)
    for split_name, y in ((TRAIN, data.y_train), (TEST, data.y_test)):
        if len(np.unique(y)) < 2:
            raise DataError(f"after preprocessing, the {split_name} split holds a single class ({[data.classes[c] for c in set(y)]}); see errors.csv")

    split_desc = describe_split(cfg, facts)
    data_desc = f"{cfg.data.path}" + (f" + test {cfg.data.test_path}" if cfg.data.test_path else "") + f" (fingerprint {fingerprint[:12]})"
    sweep_args = dict(cfg=cfg, names=names, out=out, weights=weights, data_desc=data_desc, split_desc=split_desc)

    tick = time.perf_counter()
    board = sweep_and_write(data, stem="leaderboard", title="ResNet50 trunk features (the paper's Table III)", **sweep_args)
    seconds["sweep"] = time.perf_counter() - tick
    has_val = len(data.y_val) > 0
    candidates = [("trunk", best_row(board, has_val, seed=cfg.sweep.seed))]

    custom_board = custom_data = head_probs = None
    if train_record is not None:
        custom_meta, custom_matrix = load_features(storage.join(out, "custom_features.parquet"))
        custom_data = sweep_data(custom_meta, custom_matrix, cfg.data.positive_label)
        tick = time.perf_counter()
        custom_board = sweep_and_write(
            custom_data, stem="custom_leaderboard",
            title=f"custom-model features, {train_record['custom_model']['embedding']}-d (the paper's Table IV)", **sweep_args,
        )  # fmt: skip
        seconds["sweep_custom"] = time.perf_counter() - tick
        candidates.append(("custom", best_row(custom_board, has_val, seed=cfg.sweep.seed)))
        head_probs = read_parquet(storage.join(out, HEAD_PROBS))
        head_probs["head_prob"] = head_probs["head_prob"].map(np.asarray)
        head_val = head_probs[head_probs["split"] == VAL]
        head_row = pd.Series({"Model": "CustomResNet50 head (sigmoid)", **_metrics_from_probs(head_val, data.classes), "status": "ok"})
        head_row["Val Balanced Accuracy"] = head_row["Balanced Accuracy"]
        candidates.append(("head", head_row))

    tuned = None
    if cfg.sweep.tune_trials > 0 and has_val:
        tick = time.perf_counter()
        tuned = tune_best(cfg, out, {"trunk": (data, board), "custom": (custom_data, custom_board)}, has_val)
        seconds["tuning"] = time.perf_counter() - tick
        if tuned is not None and tuned["row"] is not None:
            candidates.append((tuned["feature_source"], tuned["row"]))

    chosen = choose_model(candidates)
    if chosen is None:
        raise DataError("no classifier produced probabilities on this data; see leaderboard.csv")
    source, row = chosen
    chosen_data = {"trunk": data, "custom": custom_data}.get(source)
    chosen_params = json.loads(row["params"]) if isinstance(row.get("params"), str) else None
    test_meta = meta[(meta["split"] == TEST) & (meta["aug_index"] == 0)].reset_index(drop=True)
    classifier = None
    if source == "head":
        probs_by_path = head_probs.set_index("path")["head_prob"]
        test_probs = np.stack(test_meta["path"].map(probs_by_path).to_numpy())
    else:
        from leukray.sweep import make_pipeline

        name = row.get("base_model", row["Model"])
        classifier = make_pipeline(name, cfg.sweep.seed, params=chosen_params).fit(chosen_data.X_train, chosen_data.y_train)
        test_probs = classifier.predict_proba(chosen_data.X_test)
    positive = data.classes.index(cfg.data.positive_label) if cfg.data.positive_label in data.classes else len(data.classes) - 1
    predictions = pd.DataFrame(
        {
            "path": test_meta["path"],
            "label": test_meta["label"],
            "subject": test_meta["subject"],
            "predicted_label": np.asarray(data.classes, dtype=object)[test_probs.argmax(axis=1)],
            "prob_all": test_probs[:, positive],
        }
    )
    write_parquet(storage.join(out, "predictions.parquet"), predictions, provenance)
    chosen_test = _metrics_from_probs(predictions.assign(head_prob=list(test_probs)), data.classes)
    chosen_name = row["Model"] if source != "head" else "CustomResNet50 head (sigmoid)"
    log(f"chosen model (by validation balanced accuracy): {chosen_name} on {source} features")

    from leukray.bundle import save_bundle

    model_dir = storage.join(out, "model")
    save_bundle(
        model_dir,
        classes=data.classes,
        positive_label=cfg.data.positive_label,
        preprocess=cfg.preprocess,
        weights=weights.as_dict(),
        weights_seed=cfg.extract.seed,
        feature_source=source,
        classifier_name=chosen_name,
        classifier=classifier,
        head_config=train_record["head_config"] if train_record is not None else None,
        trunk_state=None if weights.kind == "imagenet" else _trunk_state(cfg.extract.weights, cfg.extract.seed),
        extra={
            "data_fingerprint": fingerprint,
            "chosen_by": "validation balanced accuracy",
            "extract_batch_size": cfg.extract.batch_size,  # predict batches the trunk the same way
            "classifier_params": chosen_params,
        },
    )
    timing = measure_inference(test_meta["path"].tolist()[:32], model_dir)

    seconds["total" if total_start is not None else "tune_total"] = time.perf_counter() - t0
    usable_meta = meta[meta["aug_index"] == 0]
    node_ids = dict(record["ray"]["node_ids"])
    if train_record is not None and train_record["ray"]["maps_node_ids"]:  # a separate train job made its own maps
        node_ids["train_maps"] = train_record["ray"]["maps_node_ids"].get("extract", [])
    summary = {
        "leukray_version": __version__,
        "weights": weights.as_dict(),
        "positive_label": cfg.data.positive_label,
        "classes": data.classes,
        "data": {"path": cfg.data.path, "test_path": cfg.data.test_path, "fingerprint": fingerprint},
        "split": {"mode": cfg.split.mode, "description": split_desc, "leaking_subjects": facts["leaking_subjects"], "groups": facts["group_source"]},
        "counts": {
            "found": record["counts"]["found"],
            "usable": int(len(usable_meta)),
            "duplicates_removed": facts["duplicates"],
            "errors": int(len(errors)),
            "by_split_and_class": counts_by(usable_meta, "split", "label"),
            "augmented_copies_by_class": counts_by(meta[meta["aug_index"] > 0], "label"),
            "subjects_by_split": record["counts"]["subjects_by_split"],
        },
        "duplicates": facts["duplicate_pairs"],
        "best_model": _best_summary(candidates[0][1], has_val),
        "best_custom_model": _best_summary(candidates[1][1], has_val) if len(candidates) > 1 else None,
        "chosen_model": {
            "name": chosen_name,
            "feature_source": source,
            "chosen_by": "validation balanced accuracy",
            "val_balanced_accuracy": row["Val Balanced Accuracy"],
            "test": chosen_test,
        },
        "custom_model": train_record["custom_model"] if train_record is not None else None,
        "tuned_model": {k: v for k, v in tuned.items() if k != "row"} if tuned is not None else None,
        "sweep": _sweep_counts(board, len(names)),
        "sweep_custom": _sweep_counts(custom_board, len(names)) if custom_board is not None else None,
        "inference_seconds_per_image": timing,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "ray": {
            "extract_device": record["ray"]["extract_device"],
            "node_ids": node_ids,
            "sweep_node_ids": sorted(set(board.get("node_id", pd.Series(dtype=str)).dropna().astype(str)) - {""}),
            "cluster_cpus": cluster_cpus(),
            "cluster_gpus": cluster_gpus(),
        },
        "environment": {"python": platform.python_version(), "platform": sys.platform},
    }
    write_json(storage.join(out, "summary.json"), summary)
    _write_report(out)
    return summary


def sweep_and_write(data: SweepData, *, stem: str, title: str, cfg: RunConfig, names: list[str], out: str,
                    weights: WeightsInfo, data_desc: str, split_desc: str) -> pd.DataFrame:
    """Run one Tune sweep and write RUN/<stem>.csv and .md."""
    log(f"sweeping {len(names)} classifiers on {title} (one Ray Tune trial each; limit {cfg.sweep.timeout_s:g}s per classifier)")
    board = run_sweep_tune(
        data,
        names,
        seed=cfg.sweep.seed,
        timeout_s=cfg.sweep.timeout_s,
        cpus_per_trial=cfg.sweep.cpus_per_trial,
        storage_path=tune_store(out),
        name=stem,
        on_result=lambda row: print(format_row(row), flush=True),
    )
    board["weights"] = weights.name
    write_csv(storage.join(out, f"{stem}.csv"), board)
    storage.write_text(
        storage.join(out, f"{stem}.md"),
        leaderboard_markdown(board.drop(columns=["weights", "node_id"]), weights, data_desc, split_desc, title),
    )
    return board


def tune_store(out: str) -> str:
    return os.path.abspath(storage.join(out, "tune")) if not storage.is_uri(out) else storage.join(out, "tune")


def tune_best(cfg: RunConfig, out: str, boards: dict[str, tuple[SweepData | None, pd.DataFrame | None]], has_val: bool) -> dict[str, Any] | None:
    """Fine-tune the best classifier (the paper's step 6): of the sweeps' classifiers with a
    search space, the best on validation gets `sweep.tune_trials` Ray Tune trials on its own
    features. Writes RUN/tuning.csv; returns what summary.json records (`row` is the best
    trial as a model candidate, or None when every trial failed)."""
    from leukray.sweep import best_tunable_row, run_search_tune

    picks = [(src, best_tunable_row(b, has_val, cfg.sweep.seed)) for src, (d, b) in boards.items() if b is not None]
    picks = [(src, r) for src, r in picks if r is not None]
    if not picks:
        log("fine-tuning skipped: no classifier with a search space succeeded in the sweeps")
        return None
    source, base = max(picks, key=lambda item: item[1]["Val Balanced Accuracy"])
    log(f"fine-tuning {base['Model']} on {source} features: {cfg.sweep.tune_trials} Ray Tune trials (seeded random search, chosen on validation)")
    trials = run_search_tune(
        boards[source][0], base["Model"], cfg.sweep.tune_trials, seed=cfg.sweep.seed, timeout_s=cfg.sweep.timeout_s,
        cpus_per_trial=cfg.sweep.cpus_per_trial, storage_path=tune_store(out), run_name="tuning",
        on_result=lambda r: print(format_row(r) + f"  {r.get('params')}", flush=True),
    )  # fmt: skip
    write_csv(storage.join(out, "tuning.csv"), trials.assign(feature_source=source))
    best = trials.iloc[0]
    ok = best["status"] == "ok"
    row = None
    if ok:
        row = best.copy()
        row["base_model"] = base["Model"]
        row["Model"] = f"{base['Model']} (tuned)"
    return {
        "name": base["Model"],
        "feature_source": source,
        "trials": int(len(trials)),
        "ok_trials": int((trials["status"] == "ok").sum()),
        "params": json.loads(best["params"]) if ok else None,
        "val_balanced_accuracy": best["Val Balanced Accuracy"] if ok else None,
        "untuned_val_balanced_accuracy": base["Val Balanced Accuracy"],
        "test": {k: best[k] for k in ["Accuracy", "Balanced Accuracy", "ROC AUC", "F1 Score"]} if ok else None,
        "row": row,
    }


def choose_model(candidates: list[tuple[str, pd.Series | None]]) -> tuple[str, pd.Series] | None:
    """The candidate with the best validation balanced accuracy (the test split is not used)."""
    scored = [(src, row) for src, row in candidates if row is not None and pd.notna(row["Val Balanced Accuracy"])]
    if not scored:
        return None
    return max(scored, key=lambda item: item[1]["Val Balanced Accuracy"])


def _metrics_from_probs(frame: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC AUC (from the probabilities) and weighted F1 of rows
    with `label` and `head_prob` (N x C, columns in `classes` order)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from leukray.sweep import roc_auc_from_scores

    if frame.empty:
        return {"Accuracy": math.nan, "Balanced Accuracy": math.nan, "ROC AUC": math.nan, "F1 Score": math.nan}
    code = {name: i for i, name in enumerate(classes)}
    y = frame["label"].map(code).to_numpy()
    probs = np.stack(frame["head_prob"].to_numpy())
    pred = probs.argmax(axis=1)
    scores = probs[:, 1] if probs.shape[1] == 2 else probs
    return {
        "Accuracy": float(accuracy_score(y, pred)),
        "Balanced Accuracy": float(balanced_accuracy_score(y, pred)),
        "ROC AUC": roc_auc_from_scores(y, scores, np.arange(len(classes))),
        "F1 Score": float(f1_score(y, pred, average="weighted")),
    }


def _best_summary(row: pd.Series | None, has_val: bool) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "name": row["Model"],
        "chosen_by": "validation balanced accuracy" if has_val else "test balanced accuracy (no validation split)",
        "test": {k: row[k] for k in ["Accuracy", "Balanced Accuracy", "ROC AUC", "F1 Score"]},
        "val_balanced_accuracy": row["Val Balanced Accuracy"],
    }


def _sweep_counts(board: pd.DataFrame, n: int) -> dict[str, int]:
    return {
        "classifiers": n,
        "ok": int((board["status"] == "ok").sum()),
        "failed": int((board["status"] == "failed").sum()),
        "timeout": int((board["status"] == "timeout").sum()),
    }


def _head_parameters(head_config: dict[str, Any]) -> int:
    from leukray.model import PaperHead, keras_parameter_count

    return keras_parameter_count(PaperHead(head_config["in_features"], head_config["num_classes"], head_config["dropout"]))


def _trunk_state(weights_spec: str, seed: int) -> dict[str, Any]:
    from leukray.features import build_trunk

    return build_trunk(resolve_weights(weights_spec, seed)[0], seed).state_dict()


def measure_inference(paths: list[str], model_dir: str) -> dict[str, float]:
    """Seconds per image of each stage, measured in this process on up to 32 test images
    (after one warm-up batch): decode + preprocess, trunk, head, classifier."""
    from leukray.bundle import load_bundle
    from leukray.config import AugmentConfig
    from leukray.features import FeatureExtractor
    from leukray.preprocess import load_and_preprocess

    if not paths:
        return {}
    bundle = load_bundle(model_dir)
    batch = {"path": np.asarray(paths, dtype=object), "n_aug": np.zeros(len(paths), np.int64)}
    tick = time.perf_counter()
    pre = load_and_preprocess(batch, bundle.preprocess, AugmentConfig(oversample=0.0), 0, storage.read_bytes)
    timing = {"decode_preprocess": (time.perf_counter() - tick) / len(paths)}
    ok = np.asarray([not e for e in pre["error"]], dtype=bool)
    images = pre["image"][ok]
    if not len(images):
        return timing
    extractor = FeatureExtractor(bundle.trunk_weights, seed=int(bundle.manifest.get("weights_seed", 0)), maps_stage=bundle.maps_stage)
    extractor.extract(images[:2])  # warm-up
    tick = time.perf_counter()
    features, maps = extractor.extract(images)
    timing["trunk"] = (time.perf_counter() - tick) / len(images)
    if bundle.custom_model is not None:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(maps)).float()
            tick = time.perf_counter()
            embedded = bundle.custom_model.embed(x, bundle.manifest["head_config"]["embedding"]).numpy()
            bundle.custom_model(x)
            timing["head"] = (time.perf_counter() - tick) / len(images)
    if bundle.classifier is not None:
        inputs = features if bundle.feature_source == "trunk" else embedded
        tick = time.perf_counter()
        bundle.classifier.predict_proba(inputs)
        timing["classifier"] = (time.perf_counter() - tick) / len(images)
    return timing


def _write_report(out: str) -> None:
    """report.html / report.md / figures; the run's results are already written, so a report
    problem is a warning, not a lost run."""
    try:
        from leukray.report import write_report
    except ImportError:  # pragma: no cover - report module always ships
        return
    if storage.is_uri(out):
        log("report: skipped for a URI run folder (render it locally with the report module)")
        return
    try:
        write_report(out)
    except Exception as exc:  # noqa: BLE001 - report problems must not lose the run
        log(f"WARNING: the report could not be written: {type(exc).__name__}: {exc}")


def read_parquet(path: str, columns: list[str] | None = None) -> pd.DataFrame:
    fs, inner = storage.resolve(path)
    return pq.read_table(inner, filesystem=fs, columns=columns).to_pandas()


def read_csv(path: str) -> pd.DataFrame:
    import io

    return pd.read_csv(io.BytesIO(storage.read_bytes(path)), keep_default_na=False)


def write_csv(path: str, frame: pd.DataFrame) -> None:
    with storage.AtomicLocalFile(path) as tmp:
        frame.to_csv(tmp, index=False)


def _write_errors(out: str, errors: pd.DataFrame) -> None:
    write_csv(storage.join(out, "errors.csv"), errors.reindex(columns=ERROR_COLUMNS))


def _fingerprint(manifest: pd.DataFrame) -> str:
    import hashlib

    used = manifest.loc[manifest["split"] != "", ["sha256", "label", "split"]].sort_values(["sha256", "label", "split"])
    return hashlib.sha256(used.to_csv(index=False).encode()).hexdigest()


def _replace_weights(cfg: RunConfig, spec: str) -> RunConfig:
    import dataclasses

    return dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, weights=spec))
