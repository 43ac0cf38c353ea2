"""`leukray train` with `train.unfreeze_stages` >= 1: the ResNet50 trained on the cells, in
place of the head on fixed trunk maps. Without ImageNet weights this is the path to a trunk
whose features carry the cells' signal.

The training and validation crops stream through the trunk every epoch with augmentation
drawn anew (`leukray.distributed.trunktraining`, Ray Train); the best epoch's trunk (by
validation balanced accuracy) is saved, and its 2,048 pooled features of every image (the
same rows, preprocessing and seeded augmented copies as features.parquet, through the same
Ray Data extractor) are the `trained` feature family of the sweeps. Writes
trained_trunk/trained_trunk.pt, trained_features.parquet, history.csv and train.json; the
bundle carries the trunk as its trunk.pt when the chosen model reads `trained` features,
so `predict` and `screen` compute them as here.

May import: `leukray.config`, `leukray.errors`, `leukray.io`, `leukray.data`, `leukray.models`,
`leukray.distributed`, `leukray.stages.extract`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import time
from typing import Any, Callable

import pandas as pd

from leukray.config import RunConfig
from leukray.data.splits import TRAIN, VAL
from leukray.distributed.resources import wants_gpu
from leukray.distributed.streaming import extract_features
from leukray.distributed.training import TrainResult
from leukray.distributed.trunktraining import crop_datasets, train_trunk
from leukray.errors import ConfigError, DataError
from leukray.io import journal, runfolder, storage
from leukray.io.features import load_features
from leukray.io.tables import log, read_json, write_csv, write_json
from leukray.models.classifiers import class_order
from leukray.models.trained import trunk_state
from leukray.models.trunk import WeightsInfo
from leukray.stages.extract import Extracted

STAGE_NAMES = {1: "layer4", 2: "layer3-4", 3: "layer2-4", 4: "layer1-4", 5: "all layers, the stem too"}


def train_trunk_stage(
    extracted: Extracted, start_ray: Callable[[], None] | None = None, write_config: bool = True
) -> Extracted:
    """Train the trunk on the cells and extract its features (see the module docstring);
    returns `extracted` with `trained_matrix` and `trunk_record`."""
    cfg, record = extracted.cfg, extracted.record
    classes = class_order(extracted.meta["label"].to_numpy().astype(str), cfg.data.positive_label)
    if not (extracted.meta["split"] == VAL).any():
        raise ConfigError("training the trunk needs a validation split: set split.val_fraction > 0")
    if write_config:
        runfolder.write_config(cfg)
    identity = runfolder.train_identity(cfg, record.get("identity", record["fingerprint"]))
    journal.begin(cfg.out, "train", identity)
    if start_ray is not None:
        start_ray()
    tick = time.perf_counter()
    usable = extracted.manifest[extracted.manifest["split"] != ""]
    result = _train(cfg, usable, classes, journal.identity_of(identity, classes))
    path = storage.join(cfg.out, runfolder.TRAINED_TRUNK_FILE)
    weights = _save_trunk(path, result, cfg, extracted.weights)
    trained_cfg = dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, weights=local_trunk_file(path)))
    log(f"extracting the trained trunk's features of {len(usable)} images (with the augmented copies)")
    provenance = {**record["provenance"], "weights": json.dumps(weights.as_dict())}
    features_path = storage.join(cfg.out, runfolder.TRAINED_FEATURES_FILE)
    streamed = extract_features(usable, trained_cfg, features_path, provenance)
    _check_rows(extracted.meta, streamed.meta, features_path)
    trunk_record = _record(cfg, record, classes, weights, result, time.perf_counter() - tick)
    trunk_record["identity"] = identity
    write_json(storage.join(cfg.out, runfolder.TRAIN_RECORD), trunk_record)
    journal.commit(cfg.out, "train")
    return dataclasses.replace(extracted, trained_matrix=streamed.matrix, trunk_record=trunk_record)


def _train(cfg: RunConfig, usable: pd.DataFrame, classes: list[str], identity: str) -> TrainResult:
    """Ray Train over the crops; history.csv; the best epoch's result. The checkpoints'
    name covers the data, preprocessing, split and every training setting (`identity`),
    so a rerun resumes its own checkpoints and never another run's."""
    use_gpu = wants_gpu(cfg.train.use_gpu)
    storage_path = runfolder.local_or_uri(cfg.train.storage_path or storage.join(cfg.out, "train"))
    name = "trained_trunk-" + identity[:10]
    log(
        f"training the ResNet50 on the cells ({STAGE_NAMES[cfg.train.unfreeze_stages]}, from "
        f"{cfg.extract.weights} weights) with Ray Train: {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
        f"{cfg.train.workers} worker(s){' on GPU' if use_gpu else ''}, augmentation drawn anew every epoch; "
        f"checkpoints in {storage_path}/{name}"
    )
    train_ds, val_ds = crop_datasets(usable, cfg.preprocess, classes, TRAIN, VAL)
    result = train_trunk(
        train_ds,
        val_ds,
        cfg.train,
        cfg.augment,
        num_classes=len(classes),
        weights=cfg.extract.weights,
        weights_seed=cfg.extract.seed,
        storage_path=storage_path,
        name=name,
        use_gpu=use_gpu,
    )
    history = pd.DataFrame(result.history).reindex(columns=runfolder.HISTORY_COLUMNS)
    write_csv(storage.join(cfg.out, "history.csv"), history)
    log(f"best epoch {result.best_epoch}: validation balanced accuracy {result.best_val_balanced_accuracy:.4f}")
    return result


def _save_trunk(path: str, result: TrainResult, cfg: RunConfig, start: WeightsInfo) -> WeightsInfo:
    """The best epoch's trunk as a state dict file (what `leukray.models.trunk` loads)."""
    import torch

    buffer = io.BytesIO()
    torch.save(trunk_state(result.state_dict), buffer)
    data = buffer.getvalue()
    storage.write_bytes(path, data)
    return WeightsInfo(
        kind="file",
        name=f"ResNet50 trained on the cells ({STAGE_NAMES[cfg.train.unfreeze_stages]}, from {start.name})",
        source=path,
        sha256=storage.sha256_of(path),
        is_pretrained=True,
    )


def local_trunk_file(path: str) -> str:
    """A local file of the trunk for the extractor actors (a copy when the run folder is a
    URI; a multi-node cluster needs the run folder on a shared file system or a URI)."""
    if not storage.is_uri(path):
        return os.path.abspath(path)
    local = os.path.join(tempfile.mkdtemp(prefix="leukray-trunk-"), os.path.basename(path))
    storage.write_bytes(local, storage.read_bytes(path))
    return local


def _check_rows(expected: pd.DataFrame, got: pd.DataFrame, path: str) -> None:
    """The trained features must be of the rows of features.parquet, in its order."""
    keys = ["path", "aug_index"]
    if not got[keys].reset_index(drop=True).equals(expected[keys].reset_index(drop=True)):
        raise DataError(f"{path} holds other rows than features.parquet (files changed during the run?)")


def _record(
    cfg: RunConfig,
    record: dict[str, Any],
    classes: list[str],
    weights: WeightsInfo,
    result: TrainResult,
    seconds: float,
) -> dict[str, Any]:
    return {
        "fingerprint": record["fingerprint"],
        "classes": classes,
        "trained_trunk": {
            "unfreeze_stages": cfg.train.unfreeze_stages,
            "trained_layers": STAGE_NAMES[cfg.train.unfreeze_stages],
            "start_weights": record["weights"]["name"],
            "epochs": len(result.history),
            "best_epoch": result.best_epoch,
            "best_val_balanced_accuracy": result.best_val_balanced_accuracy,
            "workers": cfg.train.workers,
        },
        "weights": weights.as_dict(),
        "seconds": {"train": round(seconds, 2)},
    }


def load_trained_trunk(extracted: Extracted) -> Extracted:
    """The trunk trained by an earlier train job (or an interrupted run): `extracted` with
    its features and record, read from the run folder after checking the stage finished."""
    out = extracted.cfg.out
    journal.verify(out, "train", "tune")
    trunk_record = read_json(storage.join(out, runfolder.TRAIN_RECORD))
    if "trained_trunk" not in trunk_record or trunk_record["fingerprint"] != extracted.record["fingerprint"]:
        raise DataError(f"{out}: train.json is not of a trunk trained on these images; run `leukray train` again")
    path = storage.join(out, runfolder.TRAINED_FEATURES_FILE)
    meta, matrix = load_features(path)
    _check_rows(extracted.meta, meta, path)
    trunk_record["weights"]["source"] = storage.join(out, runfolder.TRAINED_TRUNK_FILE)  # where it is now
    return dataclasses.replace(extracted, trained_matrix=matrix, trunk_record=trunk_record)
