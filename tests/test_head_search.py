"""The head search (`leukray.distributed.headsearch`): Ray Tune trials of real Ray Train runs
of the Table II head, Optuna's TPE drawing the settings and ASHA stopping the weaker trials;
the best trial's best checkpoint is the head; a rerun resumes the experiment."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from leukray.config import TrainConfig
from leukray.distributed.headsearch import HEAD_SPACE, SEARCH_COLUMNS, run_head_search, search_record
from leukray.distributed.maps import write_maps
from leukray.distributed.training import split_maps
from leukray.errors import ConfigError
from leukray.models.custom import build_custom_model, head_config_of
from leukray.testing import KillWorkerOnce

CFG = TrainConfig(epochs=3, batch_size=16, seed=3, search_trials=3, search_grace_epochs=1, search_reduction_factor=2)


def maps_and_labels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fake trunk maps (float16) whose first channel is brighter for class 1, with noise so
    that settings differ in how well they learn."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3 == 0).astype(np.int64)
    maps = rng.normal(size=(n, 8, 2, 2)).astype(np.float16)
    maps[:, 0] += (labels * 1.0).astype(np.float16)[:, None, None]
    return maps, labels


def maps_rows(storage, n_train: int, n_val: int):
    """(train, val) rows for the workers: the maps written as 24-row shards under `storage`."""
    train_maps, train_labels = maps_and_labels(n_train, 0)
    val_maps, val_labels = maps_and_labels(n_val, 1)
    n = n_train + n_val
    rows = {
        "path": np.asarray([f"cell{i}.bmp" for i in range(n)], dtype=object),
        "label": np.asarray(["hem", "all"], dtype=object)[np.concatenate([train_labels, val_labels])],
        "subject": np.asarray(["s1"] * n, dtype=object),
        "split": np.asarray(["train"] * n_train + ["val"] * n_val, dtype=object),
        "aug_index": np.zeros(n, np.int64), "error": np.asarray([""] * n, dtype=object),
        "maps": np.concatenate([train_maps, val_maps]),
    }  # fmt: skip
    return split_maps(write_maps(str(storage / "run"), "test", rows, rows_per_shard=24), ["hem", "all"])


def search(ray, storage, log, printed):
    return run_head_search(
        *maps_rows(storage, 96, 48), CFG,
        in_features=32, num_classes=2, weights="random", weights_seed=0,
        storage_path=str(storage), name="head_search-test", use_gpu=False,
        on_trial=printed.append, on_epoch_end=KillWorkerOnce(str(storage / "never"), at_epoch=-1, log=str(log)),
    )  # fmt: skip


@pytest.fixture(scope="module")
def searched(ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("headsearch")
    log, printed = storage / "epochs.log", []
    return search(ray_local, storage, log, printed), storage, log, printed


def epochs_logged(log) -> int:
    return len(log.read_text().splitlines())


def worker_epochs(log) -> list[list[int]]:
    """The epochs each Ray Train worker process ran, workers in the order they started."""
    by_pid: dict[str, list[int]] = {}
    for line in log.read_text().splitlines():
        epoch, _, pid = line.split()
        by_pid.setdefault(pid, []).append(int(epoch))
    return list(by_pid.values())


@pytest.mark.slow
class TestHeadSearch:
    def test_every_trial_is_recorded_and_asha_stops_some_early(self, searched):
        result, _, log, printed = searched
        trials = result.trials
        assert list(trials.columns) == SEARCH_COLUMNS and len(trials) == CFG.search_trials
        assert trials["trial"].tolist() == list(range(1, CFG.search_trials + 1))
        assert (trials["status"] == "ok").all()
        stopped = trials[trials["stop_reason"] == "stopped by ASHA"]
        assert len(stopped) >= 1 and (stopped["epochs_run"] < CFG.epochs).all()
        completed = trials[trials["stop_reason"] == "completed"]
        assert len(completed) >= 1 and (completed["epochs_run"] == CFG.epochs).all()
        # each trial trained in a Ray Train worker of its own (trials run one at a time on 2
        # CPUs), and a stopped trial's worker really stopped short of train.epochs
        workers = worker_epochs(log)
        assert len(workers) == CFG.search_trials
        for (_, row), epochs in zip(trials.iterrows(), workers):
            assert epochs[: row["epochs_run"]] == list(range(1, row["epochs_run"] + 1))
            assert (epochs[-1] < CFG.epochs) == (row["stop_reason"] == "stopped by ASHA")
        assert len(printed) == CFG.search_trials  # one line per finished trial
        for key, (_, low, high) in HEAD_SPACE.items():
            assert trials[key].between(low, high).all() and trials[key].nunique() == CFG.search_trials

    def test_chosen_head_is_the_best_trials_best_epoch(self, searched):
        result, storage, *_ = searched
        # only the chosen trial's Ray Train run (its checkpoints) is kept
        assert [p.name for p in storage.glob("head_search-test-*")] == [f"head_search-test-{result.best['trial_id']}"]
        trials = result.trials
        top = trials["best_val_balanced_accuracy"].max()
        tied = trials[trials["best_val_balanced_accuracy"] == top]
        assert result.best["trial_id"] == tied.sort_values("val_loss_at_best")["trial_id"].iloc[0]
        assert result.result.best_val_balanced_accuracy == top
        assert result.result.config["lr"] == pytest.approx(result.best["lr"])
        assert [h["epoch"] for h in result.result.history] == list(range(1, result.best["epochs_run"] + 1))
        # the weights handed on are that epoch's: they score its balanced accuracy on validation
        config = head_config_of(32, 2, result.best["dropout"], 0, 256)
        model = build_custom_model(config, state=result.result.state_dict)
        maps, labels = maps_and_labels(48, 1)
        with torch.no_grad():
            predicted = model.head.probabilities(model(torch.from_numpy(maps.astype(np.float32)))).argmax(1).numpy()
        recalls = [(predicted[labels == c] == c).mean() for c in (0, 1)]
        assert np.mean(recalls) == pytest.approx(top, abs=1e-9)

    def test_record_and_report_show_the_search(self, searched, tmp_path):
        from leukray.report.document import _head_search_section, _RunFolder, _to_markdown

        result, *_ = searched
        record = search_record(result, CFG)
        trials = result.trials
        assert record["trials"] == len(trials) and record["best"]["trial_id"] == result.best["trial_id"]
        assert record["stopped_by_asha"] == (trials["stop_reason"] == "stopped by ASHA").sum() >= 1
        assert record["completed"] + record["stopped_by_asha"] + record["failed"] == len(trials)
        trials.to_csv(tmp_path / "head_search.csv", index=False)
        section = _head_search_section({"custom_model": {"search": record}}, _RunFolder(str(tmp_path)))
        markdown = _to_markdown([section])
        assert f"The head is trial {record['best']['trial']}'s epoch {record['best']['best_epoch']}" in markdown
        assert markdown.count("stopped by ASHA") == record["stopped_by_asha"]
        assert markdown.count("| completed |") == record["completed"]

    def test_rerun_resumes_without_running_finished_trials(self, ray_local, searched):
        first, storage, log, _ = searched
        before, printed = epochs_logged(log), []
        again = search(ray_local, storage, log, printed)
        assert epochs_logged(log) == before  # no epoch of any trial ran again
        assert again.trials.drop(columns="detail").equals(first.trials.drop(columns="detail"))
        assert again.best["trial_id"] == first.best["trial_id"]


def test_bad_search_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="search_grace_epochs"):
        TrainConfig(epochs=3, search_trials=4, search_grace_epochs=3)
    with pytest.raises(ConfigError, match="unfreeze_stages"):
        TrainConfig(search_trials=4, unfreeze_stages=2)
    command = [sys.executable, "-m", "leukray", "run", "--train.search_trials", "-2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("leukray: error: ")]
    assert errors == ["leukray: error: train.search_trials must be >= 0, got -2"], result.stderr[-500:]
