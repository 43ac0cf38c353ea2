"""Ray Train on the Table II head: it learns, keeps the best epoch, and reproduces itself —
a run whose worker was killed and resumed (a second run, with the same seed) ends with the
same weights and history as an uninterrupted one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from leukray.config import TrainConfig
from leukray.distributed.maps import MapsShards, with_codes, write_maps
from leukray.distributed.training import epoch_seed, split_maps, train_head
from leukray.models.head import CustomResNet50, PaperHead
from leukray.testing import KillWorkerOnce

CFG = TrainConfig(epochs=5, batch_size=16, lr=1e-3, dropout=0.2, max_failures=2, seed=3)


def separable_maps(n, seed):
    """Separable fake trunk maps (float16, as the extractor emits them): class "all" has a
    brighter first channel; one "all" for two "hem"."""
    rng = np.random.default_rng(seed)
    labels = np.where(np.arange(n) % 3 == 0, "all", "hem")
    maps = rng.normal(size=(n, 8, 2, 2)).astype(np.float16)
    maps[:, 0] += ((labels == "all") * 2.0).astype(np.float16)[:, None, None]
    return maps, labels


def maps_shards(folder, n_train=96, n_val=48) -> MapsShards:
    """`n_train` training and `n_val` validation maps written as the extractor writes them
    (16-row shards, the two splits interleaved) under run folder `folder`."""
    train_maps, train_labels = separable_maps(n_train, 0)
    val_maps, val_labels = separable_maps(n_val, 1)
    order = np.random.default_rng(7).permutation(n_train + n_val)
    n = len(order)
    rows = {
        "path": np.asarray([f"cell{i}.bmp" for i in order], dtype=object),
        "label": np.concatenate([train_labels, val_labels])[order].astype(object),
        "subject": np.asarray(["s1"] * n, dtype=object),
        "split": np.asarray(["train"] * n_train + ["val"] * n_val, dtype=object)[order],
        "aug_index": np.zeros(n, np.int64), "error": np.asarray([""] * n, dtype=object),
        "maps": np.concatenate([train_maps, val_maps])[order],
    }  # fmt: skip
    return write_maps(str(folder), "test", rows, rows_per_shard=16)


def train(ray, tmp_path, name, cfg=CFG, on_epoch_end=None):
    train_rows, val_rows = split_maps(maps_shards(tmp_path / f"maps-{name}"), ["hem", "all"])
    return train_head(
        train_rows, val_rows, cfg,
        in_features=32, num_classes=2, weights="random", weights_seed=0,
        storage_path=str(tmp_path), name=name, use_gpu=False, on_epoch_end=on_epoch_end,
    )  # fmt: skip


METRICS = ["train_loss", "train_accuracy", "train_balanced_accuracy", "val_loss", "val_balanced_accuracy"]


def assert_same_training(a, b):
    """Same history (every metric) and the same best model, weight for weight. The workers
    run the same float32 operations on the same batches in the same order with one torch
    thread count, so the tolerance is float32 rounding only (measured: 0)."""
    assert [h["epoch"] for h in a.history] == [h["epoch"] for h in b.history]
    for key in METRICS:
        np.testing.assert_allclose([h[key] for h in a.history], [h[key] for h in b.history], rtol=1e-6, atol=1e-7)
    assert a.best_epoch == b.best_epoch
    assert a.state_dict.keys() == b.state_dict.keys()
    for key, value in a.state_dict.items():
        torch.testing.assert_close(value, b.state_dict[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory):
    return train(ray_local, tmp_path_factory.mktemp("train"), "uninterrupted")


def test_shuffle_seed_depends_on_seed_epoch_and_rank_only():
    seeds = {epoch_seed(s, e, r) for s in (0, 1) for e in range(5) for r in range(2)}
    assert len(seeds) == 20 and epoch_seed(3, 2, 0) == epoch_seed(3, 2, 0)


def test_label_codes_are_vectorised_and_unknown_labels_refused():
    batch = {
        "maps": np.arange(5, dtype=np.float16)[:, None],
        "label": np.array(["hem", "all", "all", "hem", "all"], dtype=object),
        "split": np.array(["train", "train", "val", "train", "train"], dtype=object),
        "error": np.array(["", "", "", "bad", ""], dtype=object),
        "aug_index": np.array([0, 1, 0, 0, 0]),
    }
    out = with_codes(batch, ["hem", "all"], "train", originals_only=False)
    assert out["label_code"].tolist() == [0, 1, 1] and out["maps"][:, 0].tolist() == [0, 1, 4]
    assert with_codes(batch, ["hem", "all"], "train", originals_only=True)["label_code"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="outside"):
        with_codes(batch, ["hem", "other"], "train", originals_only=False)


@pytest.mark.slow
class TestTraining:
    def test_loss_decreases_and_best_checkpoint_is_kept(self, uninterrupted):
        losses = [h["train_loss"] for h in uninterrupted.history]
        assert len(losses) == 5 and losses[-1] < losses[0] * 0.8
        best = max(h["val_balanced_accuracy"] for h in uninterrupted.history)
        assert uninterrupted.best_val_balanced_accuracy == best > 0.8
        assert [h["resumed_from"] for h in uninterrupted.history] == [0] * 5
        model = CustomResNet50(torch.nn.Sequential(), PaperHead(32, 2, 0.2))
        model.load_state_dict(uninterrupted.state_dict)  # the kept state is a full, loadable model

    def test_killed_worker_resumes_and_ends_as_the_uninterrupted_run(self, ray_local, uninterrupted, tmp_path):
        marker, log = tmp_path / "killed", tmp_path / "epochs.log"
        kill = KillWorkerOnce(str(marker), at_epoch=2, log=str(log))  # SIGKILL after epoch 2's checkpoint
        result = train(ray_local, tmp_path, "resume", on_epoch_end=kill)
        assert marker.exists()  # the worker really died once
        ran = [line.split() for line in log.read_text().splitlines()]
        # every epoch ran exactly once: the restarted worker (another process) began at epoch 3
        assert [int(epoch) for epoch, _, _ in ran] == [1, 2, 3, 4, 5]
        pids = [pid for _, _, pid in ran]
        assert pids[0] == pids[1] != pids[2] == pids[3] == pids[4]
        assert [h["resumed_from"] for h in result.history] == [0, 0, 2, 2, 2]  # it loaded epoch 2's checkpoint
        # weights, optimizer, RNG states and the epoch-keyed shuffle were restored: the
        # resumed run is the uninterrupted one
        assert_same_training(result, uninterrupted)
        # and a rerun with the same storage and name resumes the finished run instead of retraining
        again = train(ray_local, tmp_path, "resume", on_epoch_end=kill)
        assert len(log.read_text().splitlines()) == 5  # no epoch ran again
        assert again.history == result.history

    def test_two_workers_train_in_step_on_their_own_shards(self, ray_local, uninterrupted, tmp_path):
        # DistributedDataParallel over 2 CPU workers, each reading half of the shards: the
        # ranks take the same number of steps (a rank with steps the other lacks would hang
        # the gradient all-reduce), and the head learns as the one-worker run does
        cfg = dataclasses.replace(CFG, epochs=3, workers=2)
        result = train(ray_local, tmp_path, "two", cfg=cfg)
        assert [h["epoch"] for h in result.history] == [1, 2, 3]
        assert result.best_val_balanced_accuracy > 0.8
        # validation counts both ranks' rows, each once; training drops only the rows that
        # would put the ranks out of step (under a batch each, plus one rank's surplus)
        assert [h["val_rows"] for h in result.history] == [48] * 3
        assert all(64 <= h["train_rows"] <= 96 and h["train_rows"] % 32 == 0 for h in result.history)
        assert [h["val_rows"] for h in uninterrupted.history] == [48] * 5
        assert [h["train_rows"] for h in uninterrupted.history] == [96] * 5
