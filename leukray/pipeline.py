"""`leukray run`: discover -> hash/deduplicate -> split -> (Ray Data, streaming) decode +
Otsu-crop + augment on CPU workers -> ResNet50 features in an actor pool -> Ray Tune
classifier sweep -> outputs.

The run folder (other tools read these names):
  config.yaml, manifest.parquet, features.parquet, leaderboard.csv, leaderboard.md,
  errors.csv, summary.json
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
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
from leukray.features import FEATURE_DIM, FeatureExtractor, WeightsInfo, resolve_weights
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


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _hash_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = hash_files(batch, storage.read_bytes)
    out["node_id"] = np.asarray([_node_id()] * len(out["path"]), dtype=object)
    return out


def _preprocess_batch(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    out = load_and_preprocess(batch, read_bytes=storage.read_bytes, **kwargs)
    out["preprocess_node"] = np.asarray([_node_id()] * len(out["path"]), dtype=object)
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


def extract_features(
    rows: pd.DataFrame, cfg: RunConfig, features_path: str, provenance: dict[str, str]
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Stream `rows` through CPU preprocessing and the ResNet50 actor pool, writing
    `features_path` incrementally. Returns (features table without the vectors' column
    expanded, errors, facts about where the work ran)."""
    import ray

    use_gpu = cfg.extract.use_gpu == "true" or (cfg.extract.use_gpu == "auto" and cluster_gpus() > 0)
    if use_gpu and cluster_gpus() == 0:
        raise ConfigError("extract.use_gpu is true but the Ray cluster has no GPUs")
    if use_gpu:
        actors = cfg.extract.actors or max(1, int(cluster_gpus()))
        actor_resources = {"num_gpus": 1, "num_cpus": 1}
        pool = ray.data.ActorPoolStrategy(size=actors)
    else:
        # CPU-only: actors scale from one up to one per CPU left beside a preprocessing
        # worker; each takes one CPU and one torch thread, so the pool uses every core.
        top = cfg.extract.actors or max(1, int(cluster_cpus()))
        actor_resources = {"num_cpus": 1}
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=top)

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
        fn_constructor_kwargs={"weights": cfg.extract.weights, "seed": cfg.extract.seed},
        compute=pool,
        **actor_resources,
    )

    schema = pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("subject", pa.string()),
            ("split", pa.string()),
            ("aug_index", pa.int32()),
            ("features", pa.list_(pa.float32(), FEATURE_DIM)),
        ],
        metadata={b"leukray": json.dumps(provenance).encode()},
    )
    meta_parts, error_parts = [], []
    nodes: dict[str, set[str]] = {"preprocess": set(), "extract": set()}
    done = 0
    with storage.AtomicLocalFile(features_path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in ds.iter_batches(batch_format="numpy", batch_size=256):
                bad = np.asarray([bool(e) for e in batch["error"]])
                nodes["preprocess"].update(map(str, batch["preprocess_node"]))
                nodes["extract"].update(map(str, batch["node_id"]))
                if bad.any():
                    error_parts.append(
                        pd.DataFrame({"path": batch["path"][bad], "stage": "preprocess", "reason": batch["error"][bad]})
                    )
                good = ~bad
                if not good.any():
                    continue
                feats = np.asarray(batch["features"][good], dtype=np.float32)
                table = pa.table(
                    {
                        "path": pa.array(batch["path"][good].astype(str)),
                        "label": pa.array(batch["label"][good].astype(str)),
                        "subject": pa.array(batch["subject"][good].astype(str)),
                        "split": pa.array(batch["split"][good].astype(str)),
                        "aug_index": pa.array(batch["aug_index"][good].astype(np.int32)),
                        "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), FEATURE_DIM),
                    },
                    schema=schema,
                )
                writer.write_table(table)
                meta_parts.append(table.drop_columns(["features"]).to_pandas())
                done += int(good.sum())
    meta = pd.concat(meta_parts, ignore_index=True) if meta_parts else pd.DataFrame(columns=schema.names[:-1])
    errors = pd.concat(error_parts, ignore_index=True) if error_parts else pd.DataFrame(columns=ERROR_COLUMNS)
    facts = {
        "device": "gpu" if use_gpu else "cpu",
        "node_ids": {k: sorted(v) for k, v in nodes.items()},
        "feature_rows": done,
    }
    return meta, errors, facts


def load_features(path: str) -> tuple[pd.DataFrame, np.ndarray]:
    """features.parquet -> (metadata frame, N x 2048 float32 matrix)."""
    fs, inner = storage.resolve(path)
    table = pq.read_table(inner, filesystem=fs)
    matrix = table.column("features").combine_chunks().flatten().to_numpy().reshape(-1, FEATURE_DIM)
    return table.drop_columns(["features"]).to_pandas(), matrix


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


def leaderboard_markdown(board: pd.DataFrame, weights: WeightsInfo, data_desc: str, split_desc: str) -> str:
    lines = [
        "# Classifier sweep on ResNet50 trunk features (the paper's Table III)",
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


def run_pipeline(cfg: RunConfig, start_ray: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run everything and write the run folder; returns summary.json's content.

    Args:
        cfg: the resolved configuration.
        start_ray: called once the inputs are checked (so a user mistake is reported
            before Ray starts); without it Ray must already be initialised.
    """
    if not cfg.out:
        raise ConfigError("no output folder: pass --out RUN")
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    out = cfg.out

    # Fail fast on a bad classifier list or weights before the expensive stages.
    names = select_classifiers(cfg.sweep.classifiers)
    _, weights = resolve_weights(cfg.extract.weights, cfg.extract.seed)
    weights_spec = cfg.extract.weights
    if cfg.extract.weights == "auto":  # freeze the choice so the actors agree with the record
        weights_spec = "random" if weights.kind == "random" else "imagenet"
    cfg_frozen = _replace_weights(cfg, weights_spec)

    tick = time.perf_counter()
    images, skipped = discover_all(cfg)
    storage.makedirs(out)
    storage.write_text(storage.join(out, "config.yaml"), cfg_frozen.to_yaml())
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
    meta, stream_errors, stream_facts = extract_features(usable, cfg_frozen, storage.join(out, "features.parquet"), provenance)
    seconds["preprocess_augment_extract"] = time.perf_counter() - tick
    errors = pd.concat([errors, stream_errors], ignore_index=True)
    _write_errors(out, errors)

    _, matrix = load_features(storage.join(out, "features.parquet"))
    data = sweep_data(meta, matrix, cfg.data.positive_label)
    for split_name, y in ((TRAIN, data.y_train), (TEST, data.y_test)):
        if len(np.unique(y)) < 2:
            raise DataError(f"after preprocessing, the {split_name} split holds a single class ({[data.classes[c] for c in set(y)]}); see errors.csv")

    tick = time.perf_counter()
    log(f"sweeping {len(names)} classifiers (one Ray Tune trial each; limit {cfg.sweep.timeout_s:g}s per classifier)")
    board = run_sweep_tune(
        data,
        names,
        seed=cfg.sweep.seed,
        timeout_s=cfg.sweep.timeout_s,
        cpus_per_trial=cfg.sweep.cpus_per_trial,
        storage_path=os.path.abspath(storage.join(out, "tune")) if not storage.is_uri(out) else storage.join(out, "tune"),
        on_result=lambda row: print(format_row(row), flush=True),
    )
    seconds["sweep"] = time.perf_counter() - tick
    board["weights"] = weights.name
    with storage.AtomicLocalFile(storage.join(out, "leaderboard.csv")) as tmp:
        board.to_csv(tmp, index=False)
    split_desc = describe_split(cfg, facts)
    data_desc = f"{cfg.data.path}" + (f" + test {cfg.data.test_path}" if cfg.data.test_path else "") + f" (fingerprint {fingerprint[:12]})"
    storage.write_text(storage.join(out, "leaderboard.md"), leaderboard_markdown(board.drop(columns="weights"), weights, data_desc, split_desc))

    best = best_row(board, has_val=len(data.y_val) > 0)
    seconds["total"] = time.perf_counter() - t0
    summary = {
        "leukray_version": __version__,
        "weights": weights.as_dict(),
        "data": {"path": cfg.data.path, "test_path": cfg.data.test_path, "fingerprint": fingerprint},
        "split": {"mode": cfg.split.mode, "description": split_desc, "leaking_subjects": facts["leaking_subjects"], "groups": facts["group_source"]},
        "counts": {
            "found": int(len(manifest)),
            "usable": int(len(meta[meta["aug_index"] == 0])),
            "duplicates_removed": facts["duplicates"],
            "errors": int(len(errors)),
            "by_split_and_class": counts_by(meta[meta["aug_index"] == 0], "split", "label"),
            "augmented_copies_by_class": counts_by(meta[meta["aug_index"] > 0], "label"),
            "subjects_by_split": {k: int(v) for k, v in usable.groupby("split")["subject_group"].nunique().items()},
        },
        "duplicates": facts["duplicate_pairs"],
        "best_model": None if best is None else {
            "name": best["Model"],
            "chosen_by": "validation balanced accuracy" if len(data.y_val) else "test balanced accuracy (no validation split)",
            "test": {k: best[k] for k in ["Accuracy", "Balanced Accuracy", "ROC AUC", "F1 Score"]},
            "val_balanced_accuracy": best["Val Balanced Accuracy"],
        },
        "sweep": {
            "classifiers": len(names),
            "ok": int((board["status"] == "ok").sum()),
            "failed": int((board["status"] == "failed").sum()),
            "timeout": int((board["status"] == "timeout").sum()),
        },
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "ray": {
            "extract_device": stream_facts["device"],
            "node_ids": stream_facts["node_ids"],
            "cluster_cpus": cluster_cpus(),
            "cluster_gpus": cluster_gpus(),
        },
        "environment": {"python": platform.python_version(), "platform": sys.platform},
    }
    write_json(storage.join(out, "summary.json"), summary)
    return summary


def _write_errors(out: str, errors: pd.DataFrame) -> None:
    with storage.AtomicLocalFile(storage.join(out, "errors.csv")) as tmp:
        errors.reindex(columns=ERROR_COLUMNS).to_csv(tmp, index=False)


def _fingerprint(manifest: pd.DataFrame) -> str:
    import hashlib

    used = manifest.loc[manifest["split"] != "", ["sha256", "label", "split"]].sort_values(["sha256", "label", "split"])
    return hashlib.sha256(used.to_csv(index=False).encode()).hexdigest()


def _replace_weights(cfg: RunConfig, spec: str) -> RunConfig:
    import dataclasses

    return dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, weights=spec))
