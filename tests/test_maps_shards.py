"""The custom head's trunk maps as shards in the run folder (issue 9): written in the
extraction pass, streamed back for Ray Train and the embedding pass, every usable row
exactly once with its label and split, reused only by the same extraction, removed once
the train stage has committed."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from leukray.cli import main
from leukray.config import build_config
from leukray.data.splits import TRAIN, VAL
from leukray.distributed import actors
from leukray.distributed import maps as maps_module
from leukray.distributed.maps import PREFETCH_SHARDS, plan_maps
from leukray.distributed.streaming import extract_features
from leukray.distributed.training import split_maps
from leukray.io import mapshards
from leukray.io.features import load_features
from leukray.io.tables import read_parquet
from leukray.stages.extract import extract_stage

pytestmark = pytest.mark.slow

SETTINGS = {
    "extract.weights": "random",
    "preprocess.size": "64",
    "extract.batch_size": "16",
    "extract.features": "resnet50",
    "sweep.classifiers": "LogisticRegression",
    "augment.oversample": "0.5",
}


def _config(data, out, **more):
    return build_config(None, {"data.path": str(data), "out": str(out), **SETTINGS, **more})


@pytest.fixture(scope="module")
def extracted(ray_local, tiny_cells, tmp_path_factory):
    out = tmp_path_factory.mktemp("maps") / "run"
    return extract_stage(_config(tiny_cells, out), keep_maps=True)


def _rows(maps, columns) -> dict[str, np.ndarray]:
    """Every row of the shards, read in a plain loop."""
    shape = tuple(maps.record["shape"])
    parts = [mapshards.read_shard(path, shape) for path in mapshards.shard_paths(maps.out, maps.record)]
    return {c: np.concatenate([p[c] for p in parts]) for c in columns}


def _source_rows(source, rank=0, world=1, order_seed=None) -> dict[str, np.ndarray]:
    parts = list(source.stream(rank, world, order_seed))
    return {c: np.concatenate([p[c] for p in parts]) for c in ("maps", "label_code")}


def _usable(extracted) -> pd.DataFrame:
    return extracted.meta.assign(row=np.arange(len(extracted.meta)))


def test_maps_are_shards_with_every_row_once_and_the_rows_own_maps(extracted):
    out = extracted.cfg.out
    (folder,) = mapshards.storage.list_dirs(mapshards.maps_root(out))
    record = json.loads(open(f"{folder}/shards.json").read())
    assert folder.endswith(record["identity"]) and record["shape"] == [2048, 2, 2]
    files = sorted(n for n in mapshards.storage.file_signatures(folder) if n.endswith(".parquet"))
    assert files == sorted(record["shards"]) and len(files) > 1
    rows = _rows(extracted.maps, ["path", "aug_index", "error", "maps", "split"])
    meta = extracted.meta
    assert record["rows"] == len(rows["path"]) == len(meta)  # the synthetic cells all decode
    keys = list(zip(rows["path"].astype(str), rows["aug_index"].astype(int)))
    assert len(set(keys)) == len(keys)  # each (image, augmented copy) once
    assert set(keys) == set(zip(meta["path"], meta["aug_index"]))
    assert (meta["aug_index"] > 0).any()  # augmented copies are there too
    # each row's maps are its own: their global average pool is the row's 2,048 features
    order = pd.MultiIndex.from_frame(meta[["path", "aug_index"]]).get_indexer(keys)
    pooled = rows["maps"].astype(np.float32).mean(axis=(2, 3))
    np.testing.assert_allclose(pooled, extracted.matrix[order], rtol=2e-2, atol=2e-3)
    assert list(rows["split"].astype(str)) == list(meta["split"].to_numpy()[order])


def test_the_trainer_sees_each_usable_row_once_with_its_label_and_split(extracted):
    classes = ["hem", "all"]
    train, val = split_maps(extracted.maps, classes)
    meta = extracted.meta
    expected = {
        "train": meta[meta["split"] == TRAIN],
        "val": meta[(meta["split"] == VAL) & (meta["aug_index"] == 0)],
    }
    for name, source in (("train", train), ("val", val)):
        seen = _source_rows(source)
        want = expected[name]
        assert len(seen["label_code"]) == len(want) > 0
        # match every row the trainer sees to the feature row with the same pooled maps:
        # a permutation (each row once), and the codes are of those rows' labels
        pooled = seen["maps"].astype(np.float32).mean(axis=(2, 3))
        features = extracted.matrix[want.index.to_numpy()]
        distances = np.abs(pooled[:, None, :] - features[None, :, :]).max(axis=2)
        nearest = distances.argmin(axis=1)
        assert sorted(nearest) == list(range(len(want)))
        assert distances.min(axis=1).max() < 2e-2
        labels = want["label"].to_numpy()[nearest]
        np.testing.assert_array_equal(seen["label_code"], [classes.index(label) for label in labels])


def test_workers_split_the_shards_between_them_in_a_seeded_order(extracted):
    train, _ = split_maps(extracted.maps, ["hem", "all"])
    whole = _source_rows(train)["maps"]
    for seed in (1, 2):
        halves = [train.shards_of(rank, 2, seed) for rank in (0, 1)]
        assert sorted(halves[0] + halves[1]) == sorted(train.paths) and not set(halves[0]) & set(halves[1])
        assert halves == [train.shards_of(rank, 2, seed) for rank in (0, 1)]  # the same on every call
        read = np.concatenate([_source_rows(train, rank, 2, seed)["maps"] for rank in (0, 1)])
        assert sorted(map(bytes, read)) == sorted(map(bytes, whole))  # every row once between the two
    assert train.shards_of(0, 1, 1) != train.shards_of(0, 1, 2)  # another epoch, another order


def test_a_worker_reads_at_most_its_prefetch_ahead(extracted, monkeypatch):
    # the training worker's memory stays flat: it reads a few shards ahead, not the folder
    train, _ = split_maps(extracted.maps, ["hem", "all"])
    ahead = 1  # the fixture's run has 3 shards: one ahead leaves the bound something to hold
    assert PREFETCH_SHARDS > ahead and len(train.paths) > ahead + 1
    monkeypatch.setattr(maps_module, "PREFETCH_SHARDS", ahead)
    started, real = [], maps_module.read_source_shard
    monkeypatch.setattr(maps_module, "read_source_shard", lambda path, *a: (started.append(path), real(path, *a))[1])
    stream = train.stream()
    for taken, _ in enumerate(stream, start=1):
        time.sleep(0.05)  # a slow consumer: the readers could run ahead if nothing held them
        assert len(started) <= taken + ahead
    assert sorted(started) == sorted(train.paths)


def test_a_worker_on_another_node_reads_through_a_task_there(extracted, monkeypatch):
    # a local run folder is on the driver's disk: a worker elsewhere asks a task on that node
    train, _ = split_maps(extracted.maps, ["hem", "all"])
    local = _source_rows(train)
    monkeypatch.setattr(actors, "this_node_ip", lambda: "10.255.255.1")  # "this worker is elsewhere"
    remote = _source_rows(train)
    np.testing.assert_array_equal(remote["maps"], local["maps"])
    np.testing.assert_array_equal(remote["label_code"], local["label_code"])


def test_a_maps_pass_of_the_same_extraction_reads_the_shards_back(extracted):
    cfg = extracted.cfg
    usable = extracted.manifest[extracted.manifest["split"] != ""]
    provenance = extracted.record["provenance"]
    before = mapshards.storage.file_signatures(mapshards.maps_root(cfg.out))
    streamed = extract_features(usable, cfg, None, provenance, keep_maps=True)
    assert streamed.facts["maps_reused"] is True
    assert mapshards.storage.file_signatures(mapshards.maps_root(cfg.out)) == before  # nothing rewritten
    assert streamed.maps.rows == len(_rows(streamed.maps, ["path"])["path"]) == len(extracted.meta)


def test_other_settings_or_an_unfinished_folder_never_reuse_the_shards(extracted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(extracted.cfg.out, out)
    cfg = dataclasses.replace(extracted.cfg, out=str(out))
    usable = extracted.manifest[extracted.manifest["split"] != ""]
    provenance = extracted.record["provenance"]
    old = plan_maps(usable.sample(frac=1.0, random_state=cfg.train.seed), cfg, provenance, 0)
    assert mapshards.complete_manifest(str(out), old.identity) is not None
    other = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, max_rotation=90.0))
    some = usable.iloc[:12]  # a few images keep the second pass short
    streamed = extract_features(some, other, None, provenance, keep_maps=True)
    assert streamed.facts["maps_reused"] is False
    (folder,) = mapshards.storage.list_dirs(mapshards.maps_root(str(out)))
    assert not folder.endswith(old.identity)  # the other extraction's shards are gone, not mixed
    assert streamed.maps.rows == len(_rows(streamed.maps, ["path"])["path"]) == int((1 + some["n_aug"]).sum())
    # a folder whose shards.json is missing (a pass that died) is unfinished: never read
    new_identity = folder.rsplit("/", 1)[1]
    (out / "maps" / new_identity / "shards.json").unlink()
    assert mapshards.complete_manifest(str(out), new_identity) is None


def test_the_train_job_trains_from_the_shards_and_removes_them(extracted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(extracted.cfg.out, out)
    assert main(["train", "--out", str(out), "--train.epochs", "1", "--quiet"]) == 0
    # the extraction's shards were of the same rows and settings: read back, no trunk pass ran
    assert json.loads((out / "train.json").read_text())["ray"]["maps_node_ids"] == {}
    assert not (out / "maps").exists()  # committed: nothing reads the maps again
    meta, matrix = load_features(str(out / "custom_features.parquet"))
    assert len(meta) == len(extracted.meta) and np.isfinite(matrix).all()
    probs = read_parquet(str(out / "head_probs.parquet"))
    assert sorted(probs["path"]) == sorted(extracted.meta.loc[extracted.meta["aug_index"] == 0, "path"])
    journal = json.loads((out / "run.json").read_text())
    assert not any(name.startswith("maps/") for name in journal["stages"]["train"]["files"])
