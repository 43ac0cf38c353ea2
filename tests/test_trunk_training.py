"""The ResNet50 trained on the cells (`--train.unfreeze_stages`): augmentation drawn anew each
epoch, frozen parts that stay frozen, a loss that falls, and a run whose `trained` features
feed the sweep, travel in the bundle and come out of `predict` as they did in training."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from leukray.cli import main
from leukray.config import ALL_STAGES, AugmentConfig, PreprocessConfig, build_config
from leukray.distributed import trunktraining
from leukray.distributed.streaming import stream_block_rows
from leukray.distributed.trunktraining import EpochAugment, crop_datasets, trunk_rows
from leukray.errors import ConfigError
from leukray.io.features import load_features
from leukray.models.trained import build_trunk_classifier, normalised_images, trunk_state
from leukray.models.trunk import build_trunk
from leukray.ops.augment import augment_epoch
from leukray.ops.preprocess import decode_image, preprocess_image


def test_unfreeze_all_parses_and_adds_the_trained_family():
    cfg = build_config(overrides={"train.unfreeze_stages": "all"})
    assert cfg.train.unfreeze_stages == ALL_STAGES and cfg.train.trains_trunk
    assert cfg.extract.feature_sets[-1] == ("trained",)  # what the trained trunk is for
    assert not build_config().train.trains_trunk  # the default run keeps the head on fixed maps
    with pytest.raises(ConfigError, match="needs --train.unfreeze_stages"):
        build_config(overrides={"extract.features": "trained"})
    with pytest.raises(ConfigError, match="two trunks"):
        build_config(overrides={"extract.features": "resnet50+trained", "train.unfreeze_stages": "2"})


def test_augmentation_is_drawn_anew_every_epoch_and_reproducibly():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(3, 24, 24, 3), dtype=np.uint8)
    hashes, draws = np.array(["a", "a", "b"], dtype=object), np.array([0, 1, 0])
    cfg = AugmentConfig()
    epoch0 = augment_epoch(images, hashes, draws, seed=1, epoch=0, cfg=cfg)
    epoch1 = augment_epoch(images, hashes, draws, seed=1, epoch=1, cfg=cfg)
    assert all(not np.array_equal(epoch0[i], epoch1[i]) for i in range(3))  # same image, new draw
    assert not np.array_equal(epoch0[0], augment_epoch(images[[0]], hashes[[1]], draws[[1]], 1, 0, cfg)[0])
    np.testing.assert_array_equal(epoch0, augment_epoch(images, hashes, draws, seed=1, epoch=0, cfg=cfg))
    batch = {"image": images, "sha256": hashes, "draw": draws, "label_code": np.array([0, 1, 1])}
    tensors = EpochAugment(1, 1, cfg)(batch)  # the collate_fn of the workers' epoch 1
    np.testing.assert_array_equal(tensors["image"].numpy(), epoch1)
    np.testing.assert_array_equal(EpochAugment(1, 1, None)(batch)["image"].numpy(), images)  # validation


def test_training_rows_follow_the_oversampling_plan_and_drop_errors():
    batch = {
        "image": np.arange(4, dtype=np.uint8)[:, None, None, None].repeat(3, axis=3),
        "label": np.array(["hem", "all", "all", "hem"], dtype=object),
        "split": np.array(["train", "train", "val", "train"], dtype=object),
        "error": np.array(["", "", "", "unreadable"], dtype=object),
        "sha256": np.array(["h0", "h1", "h2", "h3"], dtype=object),
        "copies": np.array([2, 0, 0, 1]),
    }
    rows = trunk_rows(batch, ["hem", "all"], "train", oversample=True)
    assert rows["sha256"].tolist() == ["h0", "h0", "h0", "h1"] and rows["draw"].tolist() == [0, 1, 2, 0]
    assert rows["label_code"].tolist() == [0, 0, 0, 1] and rows["image"][:, 0, 0, 0].tolist() == [0, 0, 0, 1]
    assert trunk_rows(batch, ["hem", "all"], "val", oversample=False)["sha256"].tolist() == ["h2"]


def test_the_crop_pass_runs_in_stream_sized_tasks_and_keeps_every_row_in_order(ray_local, tiny_cells, monkeypatch):
    """300 manifest rows (the 72 synthetic files, each listed several times) on 2 CPUs: the
    decode/crop pass is cut as the streaming stage's (8 tasks of 38 rows, not 32-row ones),
    the validation crops come back in the seeded order, equal to the loop's, and the
    training rows follow the oversampling plan."""
    files = sorted(str(p) for p in tiny_cells.rglob("*.bmp"))
    n = 300
    paths = [files[i % len(files)] for i in range(n)]
    rows = pd.DataFrame(
        {
            "path": paths,
            "label": ["all" if "/all/" in p else "hem" for p in paths],
            "subject": "s",
            "split": np.where(np.arange(n) % 4 == 0, "val", "train"),
            "sha256": [f"h{i}" for i in range(n)],
            "n_aug": np.arange(n) % 3 == 1,  # one extra draw for every third row
        }
    ).astype({"n_aug": np.int64})
    blocks: list[int] = []
    real_row_blocks = trunktraining.row_blocks

    def spy(frame, rows_per_block):
        out = real_row_blocks(frame, rows_per_block)
        blocks.extend(len(b) for b in out)
        return out

    monkeypatch.setattr(trunktraining, "row_blocks", spy)
    cfg = PreprocessConfig(size=32)
    train_ds, val_ds = crop_datasets(rows, cfg, ["hem", "all"], "train", "val")
    assert stream_block_rows(n, 2) == 38 and blocks == [38] * 7 + [34]
    order = rows.sample(frac=1.0, random_state=0)
    val = order[order["split"] == "val"]
    got = val_ds.take_all()
    assert len(got) == len(val)
    want = [preprocess_image(decode_image(open(p, "rb").read()), cfg) for p in val["path"]]
    for row, crop, label in zip(got, want, val["label"]):
        np.testing.assert_array_equal(row["image"], crop)
        assert row["label_code"] == ["hem", "all"].index(label)
    train = rows[rows["split"] == "train"]
    assert train_ds.count() == len(train) + int(train["n_aug"].sum())


def test_the_trained_layers_learn_and_the_frozen_ones_stay():
    """A learnable constructed task (class 1: a bright top half), the last stage trained:
    the loss falls, layer4 and the classifier move, everything before them (BatchNorm
    statistics too) stays as it was."""
    torch.set_num_threads(2)
    model = build_trunk_classifier(None, weights_seed=0, num_classes=2, stages=1, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 80, size=(8, 32, 32, 3), dtype=np.uint8)
    labels = torch.tensor([0, 1] * 4)
    images[1::2, :16] += 150
    x = normalised_images(torch.from_numpy(images), torch.device("cpu"))
    optimizer = torch.optim.Adam([{"params": model.fc.parameters()}, {"params": model.trunk_parameters()}], lr=1e-3)
    model.train()
    losses = []
    for _ in range(5):
        loss = model.loss(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7, losses
    now = model.state_dict()
    moved = {k for k in now if not torch.equal(now[k], start[k])}
    assert any(k.startswith("trunk.layer4.") for k in moved) and "fc.weight" in moved
    assert not {k for k in moved if k.startswith(("trunk.conv1", "trunk.bn1", "trunk.layer1", "trunk.layer3"))}
    assert set(trunk_state(model)) == set(build_trunk(None).state_dict())  # loads as a plain trunk


FAST = [
    "--weights", "random",
    "--preprocess.size", "32",
    "--extract.batch_size", "16",
    "--classifiers", "LogisticRegression",
    "--sweep.timeout_s", "120",
    "--sweep.tune_trials", "0",
    "--sweep.cv_folds", "0",
    "--sweep.bootstrap", "0",
    "--features", "trained",
    "--train.unfreeze_stages", "all",
    "--train.epochs", "2",
    "--train.batch_size", "16",
    "--train.workers", "2",  # data-parallel: DistributedDataParallel over 2 CPU workers
]  # fmt: skip


@pytest.fixture(scope="module")
def trunk_run(ray_local, tiny_cells, tmp_path_factory):
    out = tmp_path_factory.mktemp("trunk") / "run"
    assert main(["run", "--data", str(tiny_cells), "--out", str(out), *FAST]) == 0
    return out


@pytest.mark.slow
class TestTrunkRun:
    def test_the_whole_trunk_was_trained_and_recorded(self, trunk_run):
        trained = torch.load(trunk_run / "trained_trunk" / "trained_trunk.pt", weights_only=True)
        start = build_trunk(None, seed=0).state_dict()  # --weights random, extract.seed 0
        assert trained.keys() == start.keys()
        for prefix in ("conv1.", "layer1.", "layer4."):  # every part moved, the stem too
            assert any(not torch.equal(v, start[k]) for k, v in trained.items() if k.startswith(prefix)), prefix
        history = pd.read_csv(trunk_run / "history.csv")
        assert history["epoch"].tolist() == [1, 2]
        summary = json.loads((trunk_run / "summary.json").read_text())
        assert summary["trained_trunk"]["trained_layers"] == "all layers, the stem too"
        assert summary["trained_trunk"]["epochs"] == 2 and summary["trained_trunk"]["workers"] == 2
        assert summary["custom_model"] is None
        assert summary["seconds"]["train"] > 0
        assert summary["chosen_model"]["feature_source"] == "trained"
        assert pd.read_csv(trunk_run / "leaderboard.csv")["features"].eq("trained").all()

    def test_the_bundle_carries_the_trunk_and_predict_computes_the_same_features(self, trunk_run, tiny_cells):
        from leukray.models.bundle import load_bundle

        bundle = load_bundle(str(trunk_run / "model"))
        carried = torch.load(bundle.trunk_weights, weights_only=True)
        trained = torch.load(trunk_run / "trained_trunk" / "trained_trunk.pt", weights_only=True)
        assert all(torch.equal(carried[k], trained[k]) for k in trained)
        assert bundle.manifest["weights"]["name"].startswith("ResNet50 trained on the cells")
        # the features the sweep saw, recomputed from the bundle as predict does
        meta, matrix = load_features(str(trunk_run / "trained_features.parquet"))
        test = meta[(meta["split"] == "test") & (meta["aug_index"] == 0)]
        preds_out = trunk_run.parent / "predict.parquet"
        assert main(["predict", "--model", str(trunk_run / "model"), "--data", str(tiny_cells),
                     "--out", str(preds_out)]) == 0  # fmt: skip
        predicted = pd.read_parquet(preds_out).set_index("path").loc[test["path"]]
        expected = pd.read_parquet(trunk_run / "predictions.parquet").set_index("path").loc[test["path"]]
        # same trunk, preprocessing and classifier: predict's probabilities are the run's
        np.testing.assert_allclose(predicted["prob_all"], expected["prob_all"], rtol=1e-4, atol=1e-5)
        inputs = bundle.classifier.predict_proba(matrix[test.index])[:, bundle.positive_index]
        np.testing.assert_allclose(expected["prob_all"], inputs, rtol=1e-6)

    def test_a_train_job_resumes_the_finished_checkpoints_and_tune_reads_the_trunk_back(self, trunk_run):
        """Last in the class: it reruns `train` and `tune` as jobs on the run's folder."""
        checkpoints = sorted(p.name for p in (trunk_run / "train").glob("*/checkpoint_*"))
        trained = torch.load(trunk_run / "trained_trunk" / "trained_trunk.pt", weights_only=True)
        assert checkpoints and main(["train", "--out", str(trunk_run)]) == 0
        # the finished run's checkpoints were resumed: no epoch ran (none reported), same trunk
        assert sorted(p.name for p in (trunk_run / "train").glob("*/checkpoint_*")) == checkpoints
        again = torch.load(trunk_run / "trained_trunk" / "trained_trunk.pt", weights_only=True)
        assert all(torch.equal(again[k], v) for k, v in trained.items())
        assert main(["tune", "--out", str(trunk_run)]) == 0  # reads the trunk and its features back
        summary = json.loads((trunk_run / "summary.json").read_text())
        assert summary["chosen_model"]["feature_source"] == "trained" and summary["trained_trunk"]["epochs"] == 2
