"""`leukray train`, the second stage of `run`: train the Table II head on the trunk maps
(Ray Train), then extract its penultimate activations for every image (Ray Data) for the
second classifier sweep (the paper's Table IV).

Within `leukray run` the maps come from the extraction pass; as a job of its own the stage
streams the run's images through the trunk again (same preprocessing, same seeded
augmentation) to get them. Writes custom_model/custom_resnet50.pt, history.csv,
custom_features.parquet, head_probs.parquet and train.json, and hands the same on in memory.

May import: `leukray.config`, `leukray.errors`, `leukray.io`, `leukray.data`, `leukray.models`,
`leukray.distributed`, `leukray.stages.extract`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from leukray.config import RunConfig
from leukray.data.splits import VAL
from leukray.distributed.headsearch import run_head_search, search_record
from leukray.distributed.maps import MapsShards, ShardSource
from leukray.distributed.resources import wants_gpu
from leukray.distributed.streaming import embed_maps, extract_features
from leukray.distributed.training import TrainResult, run_name, split_maps, train_head
from leukray.errors import ConfigError, DataError
from leukray.io import journal, runfolder, storage
from leukray.io.features import load_features
from leukray.io.tables import log, read_json, read_parquet, write_csv, write_json, write_parquet
from leukray.models.classifiers import class_order
from leukray.models.custom import head_config_of, load_model_state, save_model_state
from leukray.models.head import PaperHead, head_in_features, keras_parameter_count, map_shape
from leukray.stages.extract import Extracted


@dataclass
class Trained:
    """What the train stage hands on: its record (train.json), the custom model's features
    (Table IV's input) and its own probabilities of the original images."""

    record: dict[str, Any]
    meta: pd.DataFrame
    matrix: np.ndarray  # N x embedding float32
    head_probs: pd.DataFrame  # path, split, label, subject, head_prob (C floats)
    state: dict[str, Any] | None = None  # the best epoch's model; None: read from the record's state_path

    def model_state(self) -> dict[str, Any]:
        return self.state if self.state is not None else load_model_state(self.record["state_path"])


def train_stage(
    extracted: Extracted, start_ray: Callable[[], None] | None = None, write_config: bool = True
) -> Trained:
    """Train the custom ResNet50 and embed every image with it (see the module docstring)."""
    cfg, record = extracted.cfg, extracted.record
    classes = class_order(extracted.meta["label"].to_numpy().astype(str), cfg.data.positive_label)
    if not (extracted.meta["split"] == VAL).any():
        raise ConfigError("training the custom model needs a validation split: set split.val_fraction > 0")
    if write_config:
        runfolder.write_config(cfg)
    identity = runfolder.train_identity(cfg, extract_id(record))
    journal.begin(cfg.out, "train", identity)
    if start_ray is not None:
        start_ray()
    maps, node_ids = extracted.maps, {}
    if maps is None:
        usable = extracted.manifest[extracted.manifest["split"] != ""]
        log(f"computing trunk maps of {len(usable)} images for training ({record['weights']['name']} trunk)")
        streamed = extract_features(usable, cfg, None, record["provenance"], keep_maps=True)
        maps, node_ids = streamed.maps, streamed.facts["node_ids"]
    tick = time.perf_counter()
    result = _train(cfg, maps, classes, journal.identity_of(extract_id(record), classes))
    head_config = head_config_of(
        head_in_features(cfg.preprocess.size),
        len(classes),
        result.config["dropout"],  # the search's pick when there was one
        cfg.train.unfreeze_stages,
        cfg.train.embedding,
    )
    if "search" in result.config:  # what the bundle says of how its head was trained
        head_config["search"] = result.config["search"]
    state_path = storage.join(cfg.out, runfolder.STATE_FILE)  # not in model/: the bundle there stays whole
    save_model_state(state_path, result.state_dict)
    features_path = storage.join(cfg.out, runfolder.CUSTOM_FEATURES_FILE)
    meta, matrix, head_probs = embed_maps(maps, cfg, state_path, head_config, features_path, record["provenance"])
    head_probs_table = head_probs.assign(head_prob=head_probs["head_prob"].map(list))
    write_parquet(storage.join(cfg.out, runfolder.HEAD_PROBS), head_probs_table, record["provenance"])
    train_record = _train_record(
        cfg, record, classes, head_config, state_path, result, node_ids, time.perf_counter() - tick
    )
    train_record["identity"] = identity
    write_json(storage.join(cfg.out, runfolder.TRAIN_RECORD), train_record)
    journal.commit(cfg.out, "train")
    return Trained(train_record, meta, matrix, head_probs, result.state_dict)


def extract_id(record: dict[str, Any]) -> str:
    """The extract stage's identity (older records: the data fingerprint alone)."""
    return record.get("identity", record["fingerprint"])


def _train(cfg: RunConfig, maps: MapsShards, classes: list[str], maps_identity: str) -> TrainResult:
    """Ray Train over the maps; history.csv; the best epoch's result. The checkpoints'
    name covers `maps_identity` (data, preprocessing, augmentation, split, weights: what
    changes the maps or labels) and every training setting, so a shared storage_path never
    hands one run another's finished checkpoint."""
    in_features = head_in_features(cfg.preprocess.size)
    train, val = split_maps(maps, classes)
    use_gpu = wants_gpu(cfg.train.use_gpu)
    storage_path = runfolder.local_or_uri(cfg.train.storage_path or storage.join(cfg.out, "train"))
    name = run_name(cfg.train, maps_identity, cfg.extract.weights, in_features, len(classes))
    if cfg.train.search_trials:
        result = _search(cfg, train, val, len(classes), storage_path, name, use_gpu)
    else:
        result = _train_once(cfg, train, val, len(classes), storage_path, name, use_gpu)
    history = pd.DataFrame(result.history).reindex(columns=runfolder.HISTORY_COLUMNS)
    write_csv(storage.join(cfg.out, "history.csv"), history)
    log(f"best epoch {result.best_epoch}: validation balanced accuracy {result.best_val_balanced_accuracy:.4f}")
    return result


def _train_once(
    cfg: RunConfig, train: ShardSource, val: ShardSource, num_classes: int, storage_path: str, name: str, use_gpu: bool
) -> TrainResult:
    """One Ray Train run of the head with the train.* settings."""
    c, h, w = map_shape(cfg.preprocess.size, cfg.train.unfreeze_stages)
    log(
        "training the custom ResNet50 head (Table II) with Ray Train: "
        f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
        f"{cfg.train.workers} worker(s){' on GPU' if use_gpu else ''}; maps {c}x{h}x{w}; "
        f"checkpoints in {storage_path}/{name}"
    )
    return train_head(
        train,
        val,
        cfg.train,
        in_features=head_in_features(cfg.preprocess.size),
        num_classes=num_classes,
        weights=cfg.extract.weights,
        weights_seed=cfg.extract.seed,
        storage_path=storage_path,
        name=name,
        use_gpu=use_gpu,
    )


def _search(
    cfg: RunConfig, train: ShardSource, val: ShardSource, num_classes: int, storage_path: str, name: str, use_gpu: bool
) -> TrainResult:
    """The head search (`leukray.distributed.headsearch`): head_search.csv, one line per
    finished trial; the best trial's head, its search record in `result.config["search"]`."""
    experiment = name.replace("custom_resnet50-", "head_search-", 1)
    log(
        f"searching the head's training settings with Ray Tune: {cfg.train.search_trials} trials of Ray Train, "
        f"up to {cfg.train.epochs} epochs each, ASHA from epoch {cfg.train.search_grace_epochs} "
        f"(reduction {cfg.train.search_reduction_factor}); experiment in {storage_path}/{experiment}"
    )

    def on_trial(row: dict[str, Any]) -> None:
        log(
            f"  head trial {row['trial_id']}: lr {row['lr']:.2e}, dropout {row['dropout']:.2f}, "
            f"weight decay {row['weight_decay']:.1e}: {row['epochs_run']} epochs ({row['stop_reason']}), "
            f"best validation balanced accuracy {row.get('best_val_balanced_accuracy', float('nan')):.4f}"
        )

    search = run_head_search(
        train, val, cfg.train, in_features=head_in_features(cfg.preprocess.size), num_classes=num_classes,
        weights=cfg.extract.weights, weights_seed=cfg.extract.seed, storage_path=storage_path, name=experiment,
        use_gpu=use_gpu, on_trial=on_trial,
    )  # fmt: skip
    write_csv(storage.join(cfg.out, runfolder.HEAD_SEARCH), search.trials)
    record = search_record(search, cfg.train)
    best = record["best"]
    log(
        f"head search: best of {record['trials']} trials ({record['stopped_by_asha']} stopped early by ASHA) is "
        f"trial {best['trial']}: lr {best['lr']:.2e}, dropout {best['dropout']:.2f}, weight decay "
        f"{best['weight_decay']:.1e}; its epoch {best['best_epoch']} is the head ({runfolder.HEAD_SEARCH})"
    )
    search.result.config["search"] = record
    return search.result


def _train_record(
    cfg: RunConfig,
    record: dict[str, Any],
    classes: list[str],
    head_config: dict[str, Any],
    state_path: str,
    result: TrainResult,
    node_ids: dict[str, list[str]],
    seconds: float,
) -> dict[str, Any]:
    head = PaperHead(head_config["in_features"], head_config["num_classes"], head_config["dropout"])
    return {
        "fingerprint": record["fingerprint"],
        "weights": record["weights"]["name"],
        "classes": classes,
        "head_config": head_config,
        "state_path": state_path,
        "custom_model": {
            "epochs": len(result.history),
            "best_epoch": result.best_epoch,
            "best_val_balanced_accuracy": result.best_val_balanced_accuracy,
            "embedding": cfg.train.embedding,
            "unfreeze_stages": cfg.train.unfreeze_stages,
            "head_parameters_keras_count": keras_parameter_count(head),
            **_settings_record(cfg, result),
        },
        "ray": {"maps_node_ids": node_ids},
        "seconds": {"train": round(seconds, 2)},
    }


def _settings_record(cfg: RunConfig, result: TrainResult) -> dict[str, Any]:
    """The head's training settings (the search's pick when there was one) and the search."""
    settings = {key: result.config.get(key, getattr(cfg.train, key)) for key in ("lr", "dropout", "weight_decay")}
    return {"settings": settings, "search": result.config.get("search")}


def load_trained(out: str, fingerprint: str, weights_name: str) -> Trained | None:
    """The train stage's results from a run folder (for a separate `tune` job); None when
    there are none.

    Raises:
        DataError: train.json belongs to other features (the data or weights changed).
    """
    path = storage.join(out, runfolder.TRAIN_RECORD)
    entry = ((journal.read_journal(out) or {"stages": {}})["stages"]).get("train")
    if entry is None and not storage.exists(path):
        return None
    journal.verify(out, "train", "tune")  # begun but unfinished, or changed since: one line
    record = read_json(path)
    record["state_path"] = storage.join(out, runfolder.STATE_FILE)  # where it is now (a copied folder too)
    if record["fingerprint"] != fingerprint or record["weights"] != weights_name:
        raise DataError(
            f"{path} belongs to other features (data or weights changed): run `leukray train --out {out}` again"
        )
    meta, matrix = load_features(storage.join(out, runfolder.CUSTOM_FEATURES_FILE))
    head_probs = read_parquet(storage.join(out, runfolder.HEAD_PROBS))
    head_probs["head_prob"] = head_probs["head_prob"].map(np.asarray)
    return Trained(record, meta, matrix, head_probs)
