"""`leukray run` end to end through a real local Ray runtime, bad input, and user mistakes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from leukray.cli import main
from leukray.io.features import load_features

FAST = [
    "--weights", "random",
    "--preprocess.size", "64",
    "--extract.batch_size", "16",
    "--classifiers", "LogisticRegression,GaussianNB,KNeighborsClassifier,RidgeClassifier,StackingClassifier",
    "--sweep.timeout_s", "120",
    "--sweep.tune_trials", "4",
    "--train.epochs", "2",
]  # fmt: skip
OUTPUTS = [
    "config.yaml",
    "manifest.parquet",
    "features.parquet",
    "leaderboard.csv",
    "leaderboard.md",
    "errors.csv",
    "summary.json",
]


@pytest.fixture(scope="module")
def tiny_run(ray_local, tiny_cells, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    store = out.parent / "mlruns"  # the run also logs itself to a local MLflow file store
    assert main(["run", "--data", str(tiny_cells), "--out", str(out), *FAST, "--tracking.mlflow", str(store)]) == 0
    return out


@pytest.mark.slow
class TestRun:
    def test_every_output_holds_this_runs_results(self, tiny_run):
        import yaml
        from sklearn.metrics import accuracy_score, balanced_accuracy_score

        config = yaml.safe_load((tiny_run / "config.yaml").read_text())
        assert config["preprocess"]["size"] == 64 and config["extract"]["weights"] == "random"
        assert config["sweep"]["tune_trials"] == 4 and config["out"] == str(tiny_run)
        summary = json.loads((tiny_run / "summary.json").read_text())
        manifest = pd.read_parquet(tiny_run / "manifest.parquet")
        errors = pd.read_csv(tiny_run / "errors.csv")
        assert list(errors.columns) == ["path", "stage", "reason"] and len(errors) == summary["counts"]["errors"] == 0
        assert len(manifest) == summary["counts"]["found"] == len(list(Path(config["data"]["path"]).rglob("*.bmp")))
        board_md = (tiny_run / "leaderboard.md").read_text()
        assert all(f"| {m} " in board_md for m in pd.read_csv(tiny_run / "leaderboard.csv")["Model"])
        # the predictions are the chosen model's on exactly the test images, and its test scores come from them
        predictions = pd.read_parquet(tiny_run / "predictions.parquet")
        assert list(predictions.columns) == ["path", "label", "subject", "predicted_label", "prob_all", "error"]
        assert (predictions["error"] == "").all()  # `leukray predict`'s column set; every test image predicted
        assert sorted(predictions["path"]) == sorted(manifest.loc[manifest["split"] == "test", "path"])
        assert predictions["prob_all"].between(0, 1).all() and set(predictions["predicted_label"]) <= {"all", "hem"}
        test = summary["chosen_model"]["test"]
        assert test["Accuracy"] == pytest.approx(accuracy_score(predictions["label"], predictions["predicted_label"]))
        assert test["Balanced Accuracy"] == pytest.approx(
            balanced_accuracy_score(predictions["label"], predictions["predicted_label"])
        )
        assert_one_finished_run(tiny_run)

    def test_manifest_split_is_subject_level(self, tiny_run):
        manifest = pd.read_parquet(tiny_run / "manifest.parquet")
        assert {"path", "label", "subject", "split", "sha256", "duplicate_of"} <= set(manifest.columns)
        assert (manifest.groupby("subject")["split"].nunique() == 1).all()
        assert set(manifest["split"]) == {"train", "val", "test"}

    def test_features_one_row_per_image_plus_training_copies(self, tiny_run):
        manifest = pd.read_parquet(tiny_run / "manifest.parquet")
        meta, matrix = load_features(str(tiny_run / "features.parquet"))
        assert matrix.shape == (len(meta), 2048) and np.isfinite(matrix).all()
        originals = meta[meta["aug_index"] == 0]
        assert sorted(originals["path"]) == sorted(manifest["path"])
        copies = meta[meta["aug_index"] > 0]
        assert set(copies["split"]) == {"train"}
        assert len(copies) == manifest["n_aug"].sum() > 0
        train = meta[meta["split"] == "train"]["label"].value_counts()
        assert train["all"] == train["hem"]  # the minority class was oversampled to balance

    def test_cell_features_beside_the_trunk_features_and_their_own_sweep(self, tiny_run):
        from leukray.ops.cellfeatures import feature_dim

        meta, _ = load_features(str(tiny_run / "features.parquet"))
        cell_meta, cells = load_features(str(tiny_run / "cell_features.parquet"))
        assert cell_meta[["path", "aug_index"]].equals(meta[["path", "aug_index"]])
        assert cells.shape == (len(meta), feature_dim(("morphology", "colour", "texture"))) and np.isfinite(cells).all()
        area = cells[:, 0]  # morph_area, in pixels of the 450x450-ish synthetic originals
        assert (area > 1000).all()
        copies = cell_meta["aug_index"] > 0  # a copy carries its original's measurements
        originals = dict(zip(cell_meta.loc[~copies, "path"], area[~copies.to_numpy()]))
        assert all(originals[p] == a for p, a in zip(cell_meta.loc[copies, "path"], area[copies.to_numpy()]))
        summary = json.loads((tiny_run / "summary.json").read_text())
        sets = {s["features"]: s for s in summary["feature_sets"]}
        assert list(sets) == ["resnet50", "morphology+colour+texture"]
        assert sets["morphology+colour+texture"]["dim"] == cells.shape[1]
        board = pd.read_csv(tiny_run / sets["morphology+colour+texture"]["file"])
        assert set(board["features"]) == {"morphology+colour+texture"} and len(board) == 5
        assert set(pd.read_csv(tiny_run / "leaderboard.csv")["features"]) == {"resnet50"}

    def test_a_separate_tune_job_reads_the_cell_features_back(self, tiny_run):
        from leukray.io.runfolder import stage_config
        from leukray.ops.cellfeatures import feature_dim
        from leukray.stages.extract import load_extracted
        from leukray.stages.tune import feature_matrix

        extracted = load_extracted(stage_config(str(tiny_run), "tune", {}, {}), "tune")
        assert extracted.cell_matrix.shape == (len(extracted.meta), feature_dim(("morphology", "colour", "texture")))
        cells = feature_matrix(extracted, ("morphology", "colour", "texture"))
        joined = feature_matrix(extracted, ("resnet50", "texture"))
        texture = feature_dim("texture")
        assert joined.shape == (len(extracted.meta), 2048 + texture)
        assert np.array_equal(joined[:, :2048], extracted.matrix) and np.array_equal(
            joined[:, 2048:], cells[:, -texture:]
        )

    def test_a_tune_job_without_the_cell_features_it_needs_is_one_line(self, tiny_run, tmp_path, capsys):
        out = tmp_path / "run"
        shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("tune", "train"))
        (out / "cell_features.parquet").unlink()
        assert main(["tune", "--out", str(out)]) == 3  # a damaged run folder: bad data
        err = capsys.readouterr().err.strip()
        assert err.startswith("leukray: error: ") and "cell_features.parquet not found" in err and "\n" not in err

    def test_model_chosen_by_subject_grouped_cross_validation(self, tiny_run):
        choice = pd.read_csv(tiny_run / "model_choice.csv")
        ok = choice[choice["status"] == "ok"]
        assert len(ok) >= 2 and (ok["cv_folds"] >= 2).all()
        assert ok["CV Balanced Accuracy"].is_monotonic_decreasing  # best first
        chosen = json.loads((tiny_run / "summary.json").read_text())["chosen_model"]
        assert (chosen["name"], chosen["feature_source"]) == (ok.iloc[0]["Model"], ok.iloc[0]["source"])
        assert chosen["cv_balanced_accuracy"] == pytest.approx(ok.iloc[0]["CV Balanced Accuracy"])
        assert chosen["chosen_by"].startswith("subject-grouped") and "train+val" in chosen["chosen_by"]
        bundle = json.loads((tiny_run / "model" / "bundle.json").read_text())
        assert bundle["chosen_by"] == chosen["chosen_by"] and bundle["classifier"] == chosen["name"]
        # the decision threshold was chosen on the chosen model's out-of-fold predictions, and the
        # test predictions call ALL at it (as `leukray predict` will with this bundle)
        threshold = bundle["decision_threshold"]
        assert threshold == chosen["decision_threshold"] and "out-of-fold" in threshold["chosen_on"]
        predictions = pd.read_parquet(tiny_run / "predictions.parquet")
        assert ((predictions["prob_all"] >= threshold["value"]) == (predictions["predicted_label"] == "all")).all()

    def test_provenance_in_every_output(self, tiny_run):
        summary = json.loads((tiny_run / "summary.json").read_text())
        assert summary["weights"]["kind"] == "random" and summary["weights"]["is_pretrained"] is False
        meta = json.loads(pq.read_schema(tiny_run / "features.parquet").metadata[b"leukray"])
        assert json.loads(meta["weights"])["kind"] == "random"
        from leukray.io.tables import SCHEMA_VERSION

        assert meta["schema_version"] == summary["schema_version"] == SCHEMA_VERSION == 1
        assert list(summary)[0] == "schema_version"
        assert "NOT ImageNet" in (tiny_run / "leaderboard.md").read_text()
        assert set(pd.read_csv(tiny_run / "leaderboard.csv")["weights"]) == {"random-init"}
        assert "random" in (tiny_run / "config.yaml").read_text()

    def test_leaderboard(self, tiny_run):
        board = pd.read_csv(tiny_run / "leaderboard.csv")
        for col in ["Model", "Accuracy", "Balanced Accuracy", "ROC AUC", "F1 Score", "Time Taken", "status"]:
            assert col in board.columns
        assert len(board) == 5
        ok = board[board["status"] == "ok"]
        assert len(ok) == 4 and ok["Balanced Accuracy"].is_monotonic_decreasing
        assert board.loc[board["Model"] == "StackingClassifier", "status"].item() == "failed"
        # ROC AUC from scores: it differs from balanced accuracy (from labels it would equal it)
        assert (ok["ROC AUC"] - ok["Balanced Accuracy"]).abs().max() > 1e-6

    def test_summary(self, tiny_run):
        summary = json.loads((tiny_run / "summary.json").read_text())
        assert summary["split"]["mode"] == "subject" and summary["split"]["leaking_subjects"] == 0
        assert summary["best_model"]["chosen_by"] == "validation balanced accuracy"
        counts = summary["counts"]["by_split_and_class"]
        assert set(counts) == {"train", "val", "test"}
        assert set(summary["seconds"]) >= {"discover_hash_split", "preprocess_augment_extract", "sweep", "total"}
        assert summary["ray"]["node_ids"]["extract"]


def assert_one_finished_run(out: Path) -> dict:
    """Every stage finished and intact, and every file a stage could have written belongs to
    exactly one finished stage: nothing from a killed attempt or an earlier run is left."""
    from leukray.io import journal

    record = json.loads((out / "run.json").read_text())
    owners: dict[str, str] = {}
    for stage, entry in record["stages"].items():
        journal.verify(str(out), stage, "test")
        for name in entry["files"]:
            assert name not in owners, f"{name} claimed by {owners.get(name)} and {stage}"
            owners[name] = stage
    on_disk = {
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and p.relative_to(out).parts[0] not in ("model", "train", "tune", "data")
    } - {"config.yaml", "run.json"}
    assert on_disk == set(owners), on_disk ^ set(owners)
    return record


def write(path: Path, image: np.ndarray | None = None, data: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        path.write_bytes(data)
    else:
        assert cv2.imwrite(str(path), image)


@pytest.mark.slow
def test_bad_input_is_recorded_and_good_input_used(ray_local, tiny_cells, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_cells, data)
    folder = data / "fold_0" / "all"
    good = cv2.imread(str(next(folder.glob("*.bmp"))))
    gray16 = cv2.cvtColor(good, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
    rgba = np.dstack([good, np.full(good.shape[:2], 255, np.uint8)])
    bmp = cv2.imencode(".bmp", good)[1].tobytes()
    bad = {
        "UID_1_90_1_all.bmp": b"",  # zero bytes
        "UID_1_90_2_all.bmp": bmp[: len(bmp) // 3],  # truncated
        "UID_1_90_3_all.bmp": b"just some text, not an image\n",
        "UID_1_90_4_all.png": cv2.imencode(".png", np.full((10, 10, 3), 200, np.uint8))[1].tobytes(),
        "UID_1_90_5_all.png": cv2.imencode(".png", np.zeros((450, 450, 3), np.uint8))[1].tobytes(),
    }
    for name, payload in bad.items():
        write(folder / name, data=payload)
    convertible = {
        "UID_1_91_1_all.png": cv2.cvtColor(good, cv2.COLOR_BGR2GRAY),
        "UID_1_91_2_all.png": rgba,
        "UID_1_91_3_all.png": gray16,
    }
    for name, image in convertible.items():
        write(folder / name, image)
    write(folder / "README.txt", data=b"notes")

    out = tmp_path / "run"
    assert main(["run", "--data", str(data), "--out", str(out), *FAST]) == 0
    errors = pd.read_csv(out / "errors.csv")
    reasons = dict(zip(errors["path"].map(lambda p: Path(p).name), errors["reason"]))
    assert set(reasons) == set(bad) | {"README.txt"}
    assert "empty file" in reasons["UID_1_90_1_all.bmp"]
    assert "not a decodable image" in reasons["UID_1_90_2_all.bmp"]
    assert "not a decodable image" in reasons["UID_1_90_3_all.bmp"]
    assert "too small" in reasons["UID_1_90_4_all.png"]
    assert "no foreground" in reasons["UID_1_90_5_all.png"]
    meta, _ = load_features(str(out / "features.parquet"))
    used = set(meta["path"].map(lambda p: Path(p).name))
    assert set(convertible) <= used
    n_good = len(list(tiny_cells.rglob("*.bmp")))
    assert len(meta[meta["aug_index"] == 0]) == n_good + len(convertible)


@pytest.mark.slow
def test_duplicates_are_kept_once_before_the_split(ray_local, tiny_cells, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_cells, data)
    source = sorted((data / "fold_0" / "hem").glob("*.bmp"))[0]
    shutil.copy(source, data / "fold_0" / "hem" / "UID_H99_1_1_hem.bmp")  # same bytes, new subject
    out = tmp_path / "run"
    assert main(["run", "--data", str(data), "--out", str(out), *FAST, "--classifiers", "GaussianNB"]) == 0
    manifest = pd.read_parquet(out / "manifest.parquet")
    dup = manifest[manifest["duplicate_of"] != ""]
    assert len(dup) == 1 and dup["split"].item() == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["duplicates_removed"] == 1


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "leukray.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize(
    "setup, extra, message, code",
    [
        (None, ["--data", "missing-folder"], "data path not found", 2),
        ("empty", ["--data", "empty"], "no class folders", 3),
        ("single", ["--data", "single"], "at least two classes", 3),
        ("tiny", ["--data", "tiny", "--sweep.timeout_s", "soon"], "sweep.timeout_s must be a number", 2),
        ("tiny", ["--data", "tiny", "--classifiers", "Magic"], "unknown classifier", 2),
        ("tiny", ["--data", "tiny", "--weights", "nope.pth"], "no such file", 4),
        ("tiny", ["--data", "tiny", "--config", "missing.yaml"], "config file not found", 2),
    ],
)
def test_user_mistakes_give_one_line_and_their_exit_code(tmp_path, tiny_cells, setup, extra, message, code):
    if setup == "empty":
        (tmp_path / "empty").mkdir()
    elif setup == "single":
        shutil.copytree(tiny_cells / "fold_0" / "all", tmp_path / "single" / "all")
    elif setup == "tiny":
        (tmp_path / "tiny").symlink_to(tiny_cells)
    result = run_cli("run", "--out", "run", "--weights", "random", *extra, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("leukray: error: ") and message in lines[0], result.stderr


@pytest.mark.slow
def test_the_run_is_logged_to_mlflow(tiny_run):
    """`--tracking.mlflow DIR`: one parent run holding the config, the chosen model's test
    metrics and the head's curve, one nested run per sweep row and tuning trial."""
    check_logged_to_mlflow(tiny_run, tiny_run.parent / "mlruns")


def check_logged_to_mlflow(tiny_run: Path, store: Path) -> None:
    from mlflow.tracking import MlflowClient

    summary = json.loads((tiny_run / "summary.json").read_text())
    client = MlflowClient(tracking_uri="file:" + str(store))
    experiment = client.get_experiment_by_name("leukray")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == "run" and parent.info.status == "FINISHED"
    tags, params, metrics = parent.data.tags, parent.data.params, parent.data.metrics
    assert tags["leukray.weights"] == summary["weights"]["name"] == "random-init"
    assert tags["leukray.chosen_model"] == summary["chosen_model"]["name"]
    assert tags["leukray.data_fingerprint"] == summary["data"]["fingerprint"]
    assert params["train.epochs"] == "2" and params["preprocess.size"] == "64"
    assert metrics["test_balanced_accuracy"] == pytest.approx(summary["chosen_model"]["test"]["Balanced Accuracy"])
    curve = client.get_metric_history(parent.info.run_id, "head_val_loss")
    assert sorted(m.step for m in curve) == [1, 2]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    boards = [pd.read_csv(tiny_run / s["file"]) for s in summary["feature_sets"]]
    boards.append(pd.read_csv(tiny_run / "custom_leaderboard.csv"))
    tuning = pd.read_csv(tiny_run / "tuning.csv")
    kinds = [r.data.tags["leukray.kind"] for r in children]
    assert kinds.count("sweep") == sum(len(b) for b in boards) and kinds.count("tuning") == len(tuning)
    logistic = [
        r for r in children if r.info.run_name == "sweep/resnet50/LogisticRegression"
    ]  # fmt: skip
    row = boards[0].set_index("Model").loc["LogisticRegression"]
    assert logistic[0].data.metrics["balanced_accuracy"] == pytest.approx(row["Balanced Accuracy"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "config.yaml", "model_choice.csv", "model"} <= artifacts


def test_track_refuses_an_unfinished_run_in_one_line(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    assert main(["track", str(tmp_path / "half"), "--mlflow", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "summary.json not found" in err and "Traceback" not in err


def _crash(monkeypatch, module, name: str) -> None:
    """Make `module.name` raise: the stage dies half-way, after some of its files are written."""

    def killed(*args, **kwargs):
        raise RuntimeError(f"killed at {name}")

    monkeypatch.setattr(module, name, killed)


def _copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("tune", "train"))  # Ray's storage stays behind
    return out


@pytest.mark.slow
def test_a_killed_train_stage_leaves_nothing_trusted_and_the_old_bundle_loads(tiny_run, tmp_path, monkeypatch, capsys):
    from leukray.models.bundle import load_bundle
    from leukray.stages import train

    out = _copy_run(tiny_run, tmp_path)
    bundle_json = (out / "model" / "bundle.json").read_bytes()
    _crash(monkeypatch, train, "embed_maps")  # after the new model and history.csv are written
    args = ["run", "--data", json.loads((out / "run.json").read_text())["settings"]["data.path"], "--out", str(out)]
    with pytest.raises(RuntimeError, match="killed at embed_maps"):
        main([*args, *FAST, "--train.epochs", "1", "--resume"])
    assert (out / "history.csv").is_file() and (out / "custom_model" / "custom_resnet50.pt").is_file()
    assert not (out / "leaderboard.csv").exists() and not (out / "report.md").exists()  # the old tables are gone
    assert main(["tune", "--out", str(out)]) == 3  # the half-trained model is never read (exit 3: the folder's data)
    (err,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("leukray: error: ")]  # Ray logs too
    assert "the train stage of" in err and "did not finish (killed, or still running)" in err
    assert (out / "model" / "bundle.json").read_bytes() == bundle_json
    load_bundle(str(out / "model"))  # the previous bundle is whole and loads


@pytest.mark.slow
def test_run_without_training_after_a_killed_sweep_resumes_clean_and_reproduces(
    tiny_run, tiny_cells, tmp_path, monkeypatch
):
    """Run B is `run --train.enabled false` over a copy of tiny_run, killed once in the
    sweep, then resumed (extract reused, the custom model's files discarded, the sweep
    redone). Run C is the same job from a copy of the data in another folder. Both must
    give the same features (within rtol 1e-5: batched CPU convolutions), the same leaderboards
    and model choice (exactly), the same chosen model (exactly) and the same predictions
    (labels exactly away from 0.5, probabilities within 1e-3)."""
    from leukray.stages import tune

    b_out = _copy_run(tiny_run, tmp_path / "b")
    no_train = [*FAST, "--train.enabled", "false"]
    _crash(monkeypatch, tune, "write_model_bundle")  # after the leaderboards and predictions are written
    with pytest.raises(RuntimeError, match="killed at write_model_bundle"):
        main(["run", "--data", str(tiny_cells), "--out", str(b_out), *no_train, "--resume"])
    assert (b_out / "leaderboard.csv").is_file() and not (b_out / "history.csv").exists()
    assert json.loads((b_out / "run.json").read_text())["stages"]["tune"]["state"] == "running"
    monkeypatch.undo()
    assert main(["run", "--data", str(tiny_cells), "--out", str(b_out), *no_train, "--resume"]) == 0
    record = assert_one_finished_run(b_out)
    assert set(record["stages"]) == {"extract", "tune"}
    for stale in [
        "custom_leaderboard.csv",
        "history.csv",
        "custom_features.parquet",
        "train.json",
        "head_probs.parquet",
    ]:
        assert not (b_out / stale).exists(), stale
    assert "the custom model was not trained in this run" in (b_out / "report.md").read_text()  # no stale Table IV
    assert (b_out / "features.parquet").stat().st_mtime == (tiny_run / "features.parquet").stat().st_mtime  # reused

    data_copy = tmp_path / "elsewhere" / "cells"
    shutil.copytree(tiny_cells, data_copy)
    c_out = tmp_path / "c"
    assert main(["run", "--data", str(data_copy), "--out", str(c_out), *no_train]) == 0
    _assert_same_results(b_out, c_out)


def _by_content(out: Path, name: str) -> tuple[pd.DataFrame, np.ndarray]:
    meta, matrix = load_features(str(out / name))
    sha = pd.read_parquet(out / "manifest.parquet").set_index("path")["sha256"]
    key = meta["path"].map(sha) + ":" + meta["aug_index"].astype(str)
    order = np.argsort(key.to_numpy())
    return meta.iloc[order].reset_index(drop=True), matrix[order]


def _assert_close_tree(a, b, atol: float) -> None:
    """Nested dicts/lists equal, their floats within `atol`."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for key in a:
            _assert_close_tree(a[key], b[key], atol)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_close_tree(x, y, atol)
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=atol)
    else:
        assert a == b


def _assert_same_results(a: Path, b: Path) -> None:
    for name in ["features.parquet", "cell_features.parquet"]:
        (meta_a, x_a), (meta_b, x_b) = _by_content(a, name), _by_content(b, name)
        assert list(meta_a["aug_index"]) == list(meta_b["aug_index"]) and x_a.shape == x_b.shape
        # batched CPU convolutions round differently when Ray Data batches other rows together:
        # measured up to 5.7e-5 absolute (3e-6 relative) on activations of ~20
        np.testing.assert_allclose(x_a, x_b, rtol=1e-5, atol=1e-4)
    metrics = ["Model", "Accuracy", "Balanced Accuracy", "ROC AUC", "F1 Score", "Val Balanced Accuracy", "status"]
    summary_a, summary_b = (json.loads((o / "summary.json").read_text()) for o in (a, b))
    for entry in summary_a["feature_sets"]:
        pd.testing.assert_frame_equal(pd.read_csv(a / entry["file"])[metrics], pd.read_csv(b / entry["file"])[metrics])
    pd.testing.assert_frame_equal(*(pd.read_csv(o / "model_choice.csv").drop(columns=["Time Taken"], errors="ignore")
                                    .drop(columns=["node_id"], errors="ignore") for o in (a, b)))  # fmt: skip
    chosen_a, chosen_b = dict(summary_a["chosen_model"]), dict(summary_b["chosen_model"])
    # the decision threshold lies between two out-of-fold probabilities, which carry the
    # features' rounding (below): equal within it, everything else exactly
    threshold_a, threshold_b = chosen_a.pop("decision_threshold", None), chosen_b.pop("decision_threshold", None)
    assert chosen_a == chosen_b
    _assert_close_tree(threshold_a, threshold_b, atol=1e-3)
    threshold = (threshold_a or {}).get("value") or 0.5
    pa_, pb_ = (pd.read_parquet(o / "predictions.parquet") for o in (a, b))
    pa_["path"], pb_["path"] = pa_["path"].map(lambda p: Path(p).name), pb_["path"].map(lambda p: Path(p).name)
    pa_, pb_ = (p.sort_values("path").reset_index(drop=True) for p in (pa_, pb_))
    # the features' rounding (above) reaches the probabilities: measured up to 1.4e-4
    np.testing.assert_allclose(pa_["prob_all"], pb_["prob_all"], rtol=0, atol=1e-3)
    clear = (pa_["prob_all"] - threshold).abs() > 1e-3  # a label within the tolerance of the threshold may flip
    pd.testing.assert_frame_equal(pa_.drop(columns="prob_all")[clear], pb_.drop(columns="prob_all")[clear])


@pytest.mark.slow
def test_a_new_preprocessing_setting_is_refused_then_overwrite_starts_clean(tiny_run, tmp_path, monkeypatch, capsys):
    from leukray.models.bundle import load_bundle
    from leukray.stages import extract

    out = _copy_run(tiny_run, tmp_path)
    data = json.loads((out / "run.json").read_text())["settings"]["data.path"]
    cheap = [*FAST, "--train.enabled", "false", "--sweep.tune_trials", "0", "--features", "resnet50",
             "--classifiers", "GaussianNB,LogisticRegression", "--sweep.cv_folds", "0"]  # fmt: skip
    assert main(["run", "--data", data, "--out", str(out), *FAST, "--preprocess.margin", "6"]) == 2
    (err,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("leukray: error: ")]
    assert "preprocess.margin 4 -> 6" in err and "--overwrite" in err

    _crash(monkeypatch, extract, "write_errors")  # after the new manifest and features are written
    with pytest.raises(RuntimeError, match="killed at write_errors"):
        main(["run", "--data", data, "--out", str(out), *cheap, "--preprocess.margin", "6", "--overwrite"])
    assert (out / "features.parquet").is_file() and not (out / "leaderboard.csv").exists()
    assert main(["tune", "--out", str(out)]) == 3
    assert "extract stage of" in capsys.readouterr().err
    load_bundle(str(out / "model"))  # the previous bundle survives until a new one is complete
    monkeypatch.undo()

    assert main(["run", "--data", data, "--out", str(out), *cheap, "--preprocess.margin", "6", "--overwrite"]) == 0
    record = assert_one_finished_run(out)
    assert set(record["stages"]) == {"extract", "tune"} and record["settings"]["preprocess.margin"] == 6
    assert not (out / "custom_leaderboard.csv").exists() and not (out / "tuning.csv").exists()
    bundle = load_bundle(str(out / "model"))
    assert bundle.preprocess.margin == 6 and len(list((out / "model").glob("v-*"))) == 1
