"""The run folder: the names of the records the stages leave for each other (when they run
as separate jobs), the data fingerprint, and the configuration of a later stage (the
folder's config.yaml + the user's changes, refusing changes to what extraction fixed).

May import: `leukray.config`, `leukray.errors`, `leukray.io.*`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import pandas as pd

from leukray.config import RunConfig, build_config, load_yaml_text
from leukray.errors import ConfigError, DataError
from leukray.io import journal, storage
from leukray.io.tables import read_json

CONFIG_FILE = "config.yaml"
EXTRACT_RECORD = "extract.json"
TRAIN_RECORD = "train.json"
HEAD_PROBS = "head_probs.parquet"
HEAD_SEARCH = "head_search.csv"  # every trial of the head search (train.search_trials)
FEATURES_FILE = "features.parquet"
CUSTOM_FEATURES_FILE = "custom_features.parquet"
CELL_FEATURES_FILE = "cell_features.parquet"
TRAINED_FEATURES_FILE = "trained_features.parquet"  # the `trained` family
TRAINED_TRUNK_FILE = "trained_trunk/trained_trunk.pt"  # the trunk trained on the cells (a state dict)
MANIFEST_FILE = "manifest.parquet"
MANIFEST_COLUMNS = ["path", "label", "subject", "split", "sha256", "duplicate_of", "dataset", "n_aug"]
HISTORY_COLUMNS = [
    "epoch",
    "train_loss",
    "train_accuracy",
    "train_balanced_accuracy",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
]
# What the extract job fixed: a later stage that changed these would mix runs.
FIXED_BY_EXTRACT = ("data", "preprocess", "augment", "split", "extract.weights", "extract.seed", "extract.features")


def read_record(out: str, name: str, needed_by: str, made_by: str) -> dict[str, Any]:
    """A stage record (extract.json, train.json) or a one-line error naming the stage to run."""
    path = storage.join(out, name)
    if not storage.exists(path):
        raise DataError(f"{path} not found: `leukray {needed_by}` needs a run folder that `leukray {made_by}` wrote")
    return read_json(path)


def write_config(cfg: RunConfig) -> None:
    storage.write_text(storage.join(cfg.out, CONFIG_FILE), cfg.to_yaml())


def data_fingerprint(manifest: pd.DataFrame) -> str:
    """sha256 over the (content hash, label, split) of every image used: the same images
    split the same way give the same fingerprint, wherever they are stored."""
    used = manifest.loc[manifest["split"] != "", ["sha256", "label", "split"]]
    used = used.sort_values(["sha256", "label", "split"])
    return hashlib.sha256(used.to_csv(index=False).encode()).hexdigest()


def local_or_uri(path: str) -> str:
    """Ray Train/Tune storage paths must be absolute when local."""
    return path if storage.is_uri(path) else os.path.abspath(path)


def tune_store(out: str) -> str:
    return local_or_uri(storage.join(out, "tune"))


def stage_config(out: str, stage: str, yaml_values: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    """The config of a later stage: the run folder's config.yaml, then the user's YAML and
    options. Changing what the extract job fixed is refused (it would describe other data
    than the features hold); `tune` also keeps the settings the custom model was trained with."""
    path = storage.join(out, CONFIG_FILE)
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


# Settings that change how fast a run goes or where it keeps Ray's state, not what it computes.
RESOURCE_KEYS = (
    "extract.batch_size",
    "extract.actors",
    "extract.use_gpu",
    "extract.accelerator_resource",
    "extract.preprocess_batch_size",
    "sweep.cpus_per_trial",
    "train.use_gpu",
    "train.max_failures",
    "train.storage_path",
)
STATE_FILE = "custom_model/custom_resnet50.pt"  # the train stage's model; the bundle keeps its own copy


def result_settings(cfg: RunConfig) -> dict[str, Any]:
    """Every setting that can change a result, flat (`preprocess.size` -> 64): what a run
    folder's journal records, and what a rerun into the folder is compared with."""
    flat: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
    return {k: v for k, v in flat.items() if k not in RESOURCE_KEYS}


def _section_settings(cfg: RunConfig, prefixes: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in result_settings(cfg).items() if k.startswith(prefixes)}


def extract_identity(cfg: RunConfig, fingerprint: str, weights: dict[str, Any]) -> str:
    """What the extract stage's outputs depend on: the images (content, label, split),
    where they are, preprocessing, augmentation, the split, and the trunk's weights."""
    fixed = tuple(k if "." in k else f"{k}." for k in FIXED_BY_EXTRACT)
    return journal.identity_of(
        "extract", _section_settings(cfg, fixed), fingerprint, weights.get("sha256", ""), weights.get("name", "")
    )


def train_identity(cfg: RunConfig, extract_id: str) -> str:
    """The custom model's identity: the maps it was trained on (the extract identity) and
    every training and head setting."""
    settings = {k: v for k, v in _section_settings(cfg, ("train.",)).items() if k != "train.enabled"}
    return journal.identity_of("train", extract_id, settings, cfg.data.positive_label)


def tune_identity(cfg: RunConfig, upstream_id: str) -> str:
    """The sweep's identity: its inputs (the extract or train identity) and sweep settings."""
    return journal.identity_of("tune", upstream_id, _section_settings(cfg, ("sweep.", "data.positive_label")))
