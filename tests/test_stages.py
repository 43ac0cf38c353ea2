"""`leukray extract`, `train` and `tune` as separate jobs on one run folder (what a cluster
runs as three `ray job submit`s), and the mistakes each refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from leukray.cli import main
from leukray.io.features import load_features

FAST = [
    "--weights", "random",
    "--preprocess.size", "64",
    "--extract.batch_size", "16",
    "--classifiers", "LogisticRegression,GaussianNB,RidgeClassifier",
    "--sweep.timeout_s", "120",
    "--sweep.tune_trials", "0",
    "--features", "resnet50",
]  # fmt: skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def extracted(ray_local, tiny_cells, tmp_path_factory):
    out = tmp_path_factory.mktemp("stages") / "run"
    assert main(["extract", "--data", str(tiny_cells), "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def trained_and_tuned(extracted, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(extracted, out)
    assert main(["train", "--out", str(out), "--train.epochs", "2"]) == 0
    assert main(["tune", "--out", str(out)]) == 0
    return out


def test_extract_writes_features_and_its_record_only(extracted):
    for name in ["config.yaml", "manifest.parquet", "features.parquet", "errors.csv", "extract.json"]:
        assert (extracted / name).is_file(), name
    for name in ["leaderboard.csv", "summary.json", "train.json", "model"]:
        assert not (extracted / name).exists(), name
    record = json.loads((extracted / "extract.json").read_text())
    meta, matrix = load_features(str(extracted / "features.parquet"))
    assert record["counts"]["feature_rows"] == len(meta) == matrix.shape[0]
    assert record["weights"]["name"] == "random-init" and len(record["fingerprint"]) == 64
    assert all(len(node) == 56 for node in record["ray"]["node_ids"]["extract"])
    assert record["ray"]["extract_batch_size"] == 16  # as given (0 would be the device's auto size)


def test_tune_without_train_sweeps_trunk_features_only(extracted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(extracted, out)
    assert main(["tune", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["custom_model"] is None and not (out / "custom_leaderboard.csv").exists()
    board = pd.read_csv(out / "leaderboard.csv")
    assert sorted(board["Model"]) == ["GaussianNB", "LogisticRegression", "RidgeClassifier"]
    assert board["node_id"].str.len().eq(56).all()  # each trial says where it ran
    assert summary["chosen_model"]["feature_source"] == "trunk"
    assert (out / "model" / "bundle.json").is_file() and (out / "predictions.parquet").is_file()
    # the summary carries what the extract job recorded
    record = json.loads((out / "extract.json").read_text())
    assert summary["data"]["fingerprint"] == record["fingerprint"]
    assert summary["ray"]["node_ids"] == record["ray"]["node_ids"]


def test_tune_searches_by_grouped_cv_and_weighs_an_ensemble(extracted, tmp_path):
    from leukray.distributed.tuning import search_space
    from leukray.models.bundle import load_bundle

    out = tmp_path / "run"
    shutil.copytree(extracted, out)
    assert main(["tune", "--out", str(out), "--sweep.tune_trials", "4", "--sweep.bootstrap", "200"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    trials = pd.read_csv(out / "tuning.csv")
    tuned = summary["tuned_model"]
    # the search covers the classifiers with a search space and probabilities (not RidgeClassifier)
    assert sorted(tuned["searched"]) == ["GaussianNB on trunk", "LogisticRegression on trunk"]
    assert len(trials) == tuned["trials"] == 4 and (trials["status"] == "ok").all()
    params = [json.loads(p) for p in trials["params"]]
    for model, setting in zip(trials["Model"], params):  # the trunk block may be reduced before the classifier
        assert set(setting) <= set(search_space(model, 2048)) and "prep_scaler" in setting
    assert tuned["params"] == params[0] and tuned["cv_balanced_accuracy"] == trials["CV Balanced Accuracy"].max()
    # the choice: the candidates and the ensemble by grouped CV; the ensemble only if it beats them all
    choice = pd.read_csv(out / "model_choice.csv")
    ok = choice[choice["status"] == "ok"]
    singles = ok[~ok["Model"].str.startswith("Soft voting")]
    ensemble = ok[ok["Model"].str.startswith("Soft voting")]
    assert f"{tuned['name']} (tuned)" in set(singles["Model"]) and len(ensemble) == 1
    chosen = summary["chosen_model"]
    best = singles.sort_values("CV Balanced Accuracy", ascending=False).iloc[0]
    wins = ensemble.iloc[0]["CV Balanced Accuracy"] > best["CV Balanced Accuracy"]
    assert chosen["name"] == (ensemble.iloc[0]["Model"] if wins else best["Model"])
    assert summary["model_choice"]["ensemble"]["name"] == ensemble.iloc[0]["Model"]
    classifier = load_bundle(str(out / "model")).classifier
    if wins:  # the bundle holds the fitted soft-voting ensemble of the members the CV scored
        assert type(classifier).__name__ == "VotingClassifier" and len(chosen["members"]) >= 2
        assert len(classifier.estimators_) == len(chosen["members"])
    elif chosen["name"].endswith("(tuned)"):  # the bundle has the tuned settings
        fitted = classifier.named_steps["classifier"].get_params()
        assert all(fitted[k] == v for k, v in tuned["params"].items() if not k.startswith("prep_"))
    ci = chosen["test_ci95"]
    assert ci["subjects"] == pd.read_parquet(out / "predictions.parquet")["subject"].nunique()
    for metric in ("Balanced Accuracy", "ROC AUC"):
        assert 0 <= ci[metric][0] <= ci[metric][1] <= 1, metric
    assert 0 < ci["resamples"] <= 200 and ci["level"] == 0.95


def test_train_recomputes_maps_for_every_row_and_tune_adds_table_iv(trained_and_tuned):
    out = trained_and_tuned
    meta, _ = load_features(str(out / "features.parquet"))
    custom_meta, custom = load_features(str(out / "custom_features.parquet"))
    key = ["path", "aug_index", "split"]
    # every image and every augmented copy went through the trunk again, once
    pd.testing.assert_frame_equal(
        meta[key].sort_values(key).reset_index(drop=True), custom_meta[key].sort_values(key).reset_index(drop=True)
    )
    assert custom.shape[1] == 256 and np.isfinite(custom).all()
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["custom_model"]["epochs"] == 2
    assert (out / "custom_leaderboard.csv").is_file()
    assert "Table IV" in (out / "report.md").read_text()
    config = (out / "config.yaml").read_text()
    assert "epochs: 2" in config  # the folder's config says what the model was trained with


def test_tune_refuses_features_that_changed_under_the_custom_model(trained_and_tuned, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_and_tuned, out)
    record = json.loads((out / "extract.json").read_text())
    record["fingerprint"] = "0" * 64  # as if extract.json had been swapped for another run's
    (out / "extract.json").write_text(json.dumps(record))
    assert main(["tune", "--out", str(out)]) == 3  # the folder's records disagree: bad data
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "extract.json changed after the extract stage finished" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--train.epochs", "1", "--weights", "imagenet"], "extract.weights was fixed by an earlier stage"),
        (["train", "--preprocess.size", "96"], "preprocess.size"),
        (["tune", "--train.epochs", "5"], "train.epochs was fixed by an earlier stage"),
    ],
)
def test_later_stages_refuse_to_change_what_extract_fixed(extracted, argv, message, capsys):
    assert main([*argv, "--out", str(extracted)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize("stage", ["train", "tune"])
def test_a_stage_on_a_folder_extract_never_wrote_is_one_line(stage, tmp_path, capsys):
    assert main([stage, "--out", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "leukray extract" in err


def test_the_streaming_stage_cuts_a_few_tasks_per_cpu_of_bounded_size():
    from leukray.distributed.streaming import row_blocks, stream_block_rows

    assert stream_block_rows(100, 2) == 32  # small data: never below 32 rows a task
    assert stream_block_rows(4000, 2) == 500  # 4 tasks per CPU
    assert stream_block_rows(16000, 16) == 250
    assert stream_block_rows(10_000_000, 16) == 512  # a block's crops in flight stay bounded
    assert stream_block_rows(4000, 2, with_maps=True) == 32  # ~200 KB of maps more per row
    blocks = row_blocks(pd.DataFrame({"path": [f"{i}.bmp" for i in range(4000)]}), stream_block_rows(4000, 2))
    assert [len(b) for b in blocks] == [500] * 8
    # past the cap, whole waves: 6,400 rows on 2 CPUs are 14 blocks of <= 458 rows, not
    # 12 of 512 and a last one of 256 that runs alone
    blocks = row_blocks(pd.DataFrame({"path": [f"{i}.bmp" for i in range(6400)]}), stream_block_rows(6400, 2))
    assert len(blocks) == 14 and max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 12
    for rows, cpus in ((100_000, 16), (13_000, 2), (5_000, 3)):
        assert -(-rows // stream_block_rows(rows, cpus)) % cpus == 0
    assert stream_block_rows(0, 2) == 32  # nothing to cut: no division by zero
