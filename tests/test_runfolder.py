"""The run journal (stages that finish or leave nothing trusted behind), refusing a rerun
with other settings, content-seeded augmentation and confined CSV manifests; no Ray here
(the end-to-end kills and reruns are in test_run_e2e)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from leukray.config import AugmentConfig, PreprocessConfig, build_config
from leukray.data.discovery import discover
from leukray.errors import ConfigError, DataError
from leukray.io import journal, runfolder
from leukray.ops.preprocess import load_and_preprocess


def _stage(out, stage: str, files: dict[str, str], finish: bool = True) -> None:
    journal.begin(str(out), stage, f"{stage}-id")
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    if finish:
        journal.commit(str(out), stage)


def test_a_stage_killed_half_way_is_never_read_and_its_files_go_at_the_rerun(tmp_path):
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "data" / "cell.bmp").write_text("an input that lives in the run folder (leukray demo)")
    journal.open_run(str(out), {"preprocess.size": 64}, "refuse")
    _stage(out, "extract", {"manifest.parquet": "new", "features.parquet": "new"})
    _stage(out, "train", {"history.csv": "1,2", "custom_model/custom_resnet50.pt": "w"})
    _stage(out, "tune", {"leaderboard.csv": "old table", "figures/a.png": "png"})
    assert journal.verify(str(out), "tune", "report")["files"].keys() == {"leaderboard.csv", "figures/a.png"}

    _stage(out, "train", {"history.csv": "1"}, finish=False)  # killed mid-way
    with pytest.raises(DataError, match="train stage of .* did not finish") as refused:
        journal.verify(str(out), "train", "tune")
    assert "\n" not in str(refused.value)
    assert not (out / "leaderboard.csv").exists()  # a later stage's table never outlives a rerun of an earlier one
    assert not (out / "custom_model" / "custom_resnet50.pt").exists()

    _stage(out, "train", {"history.csv": "1,2,3"})  # the rerun starts clean and finishes
    record = json.loads((out / "run.json").read_text())
    assert record["stages"]["train"]["state"] == "done" and "tune" not in record["stages"]
    assert set(record["stages"]["train"]["files"]) == {"history.csv"}
    assert (out / "data" / "cell.bmp").exists() and (out / "manifest.parquet").read_text() == "new"

    (out / "features.parquet").write_text("edited after the stage finished")
    with pytest.raises(DataError, match="features.parquet changed after the extract stage finished"):
        journal.verify(str(out), "extract", "train")
    journal.discard(str(out), "extract")
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["cell.bmp", "run.json"]


def test_a_rerun_with_other_settings_is_refused_unless_told_what_to_do(tmp_path):
    out = tmp_path / "run"
    small, big = (
        runfolder.result_settings(build_config()),
        runfolder.result_settings(build_config(overrides={"preprocess.size": "96"})),
    )
    journal.open_run(str(out), small, "refuse")
    _stage(out, "extract", {"features.parquet": "64 px"})
    journal.open_run(str(out), small, "refuse")  # same settings: fine
    runs_faster = runfolder.result_settings(build_config(overrides={"extract.batch_size": "8"}))
    journal.open_run(str(out), runs_faster, "refuse")  # a resource setting changes no result
    with pytest.raises(ConfigError) as refused:
        journal.open_run(str(out), big, "refuse")
    message = str(refused.value)
    assert "preprocess.size 224 -> 96" in message and "--overwrite" in message and "\n" not in message
    journal.open_run(str(out), big, "resume")  # kept: the extract stage decides whether it still matches
    assert (out / "features.parquet").exists()
    journal.open_run(str(out), big, "overwrite")
    assert not (out / "features.parquet").exists()
    assert json.loads((out / "run.json").read_text())["stages"] == {}


def test_a_folder_from_before_journals_is_refused_and_overwrite_cleans_it(tmp_path):
    out = tmp_path / "old"
    (out / "figures").mkdir(parents=True)
    for name in ["config.yaml", "custom_leaderboard.csv", "figures/table.png", "data/keep.bmp"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    with pytest.raises(ConfigError, match="without a journal"):
        journal.open_run(str(out), {}, "refuse")
    journal.open_run(str(out), {}, "overwrite")
    assert not (out / "custom_leaderboard.csv").exists() and not (out / "figures" / "table.png").exists()
    assert (out / "data" / "keep.bmp").exists()


def test_identities_cover_every_setting_that_changes_the_maps_or_labels():
    weights = {"name": "random-init", "sha256": ""}
    base = build_config()
    ids = {runfolder.extract_identity(base, "f" * 64, weights)}
    for key, value in [
        ("preprocess.margin", "8"),
        ("augment.max_rotation", "90"),
        ("augment.copies", "1"),
        ("split.seed", "3"),
        ("extract.seed", "1"),
        ("data.positive_label", "hem"),
    ]:
        ids.add(runfolder.extract_identity(build_config(overrides={key: value}), "f" * 64, weights))
    ids.add(runfolder.extract_identity(base, "e" * 64, weights))
    ids.add(runfolder.extract_identity(base, "f" * 64, {"name": "file.pt", "sha256": "ab"}))
    assert len(ids) == 9
    assert runfolder.extract_identity(build_config(overrides={"extract.batch_size": "8"}), "f" * 64, weights) in ids
    trains = {runfolder.train_identity(build_config(overrides={k: v}), "x") for k, v in [
        ("train.dropout", "0.2"), ("train.embedding", "512"), ("train.unfreeze_stages", "1"), ("train.lr", "0.1")
    ]}  # fmt: skip
    assert len(trains | {runfolder.train_identity(base, "x"), runfolder.train_identity(base, "y")}) == 6


def _cell(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = np.zeros((90, 90, 3), np.uint8)
    cv2.circle(image, (45, 45), 30, tuple(int(v) for v in rng.integers(60, 250, 3)), -1)
    return cv2.imencode(".png", image)[1].tobytes()


def test_augmentation_is_seeded_by_content_not_by_path():
    files = {"/a/one.png": _cell(0), "/elsewhere/copy.png": _cell(0), "/a/other.png": _cell(1)}
    batch = {"path": np.array(list(files), dtype=object), "n_aug": np.array([2, 2, 2])}
    out = load_and_preprocess(batch, PreprocessConfig(size=48), AugmentConfig(), 7, files.__getitem__)
    copies = out["image"][out["aug_index"] > 0].reshape(3, 2, 48, 48, 3)
    assert np.array_equal(copies[0], copies[1])  # the same bytes in another folder: the same copies
    assert not np.array_equal(copies[0][0], copies[0][1])  # two copies of one image differ
    again = load_and_preprocess(batch, PreprocessConfig(size=48), AugmentConfig(), 8, files.__getitem__)
    assert not np.array_equal(again["image"][1], out["image"][1])  # the seed still matters


def test_a_csv_manifest_is_confined_to_its_folder(tmp_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    for name, seed in [("a.png", 0), ("b.png", 1)]:
        (data / "img" / name).write_bytes(_cell(seed))
    outside = tmp_path / "elsewhere" / "c.png"
    outside.parent.mkdir()
    outside.write_bytes(_cell(2))
    rows = [
        "img/a.png,all,p1",
        "img/b.png,hem,p2",
        "../../../etc/passwd,all,p3",
        "../../../etc/hosts.png,hem,p3",
        "img/../../elsewhere/c.png,hem,p4",
        f"{outside},all,p5",
        "s3://another-bucket/cells/d.png,hem,p6",
        "img/notes.txt,all,p7",
    ]
    (data / "m.csv").write_text("path,label,subject\n" + "\n".join(rows) + "\n")
    images, skipped = discover(str(data / "m.csv"))
    assert sorted(images["path"].map(lambda p: p.rsplit("/", 1)[-1])) == ["a.png", "b.png"]
    reasons = dict(zip(skipped["path"].map(lambda p: p.rsplit("/", 1)[-1]), skipped["reason"]))
    assert len(skipped) == 6 and set(skipped["stage"]) == {"discover"}
    outside_rows = skipped[skipped["reason"].str.startswith("outside the manifest's folder")]
    assert sorted(outside_rows["path"].map(lambda p: p.rsplit("/", 1)[-1])) == ["c.png", "c.png", "d.png", "hosts.png"]
    assert "not an image file extension" in reasons["passwd"] and "not an image" in reasons["notes.txt"]

    images, skipped = discover(str(data / "m.csv"), allowed=(str(outside.parent), "s3://another-bucket/cells"))
    assert sorted(images["path"].map(lambda p: p.rsplit("/", 1)[-1])) == ["a.png", "b.png", "c.png", "c.png", "d.png"]


def test_the_deterministic_flag_turns_on_torchs_deterministic_algorithms():
    import torch

    from leukray.models.trunk import TrunkExtractor

    assert build_config(overrides={"extract.deterministic": "true"}).extract.deterministic is True
    try:
        extractor = TrunkExtractor("random", seed=0, device="cpu", deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        crops = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
        batch = {"image": crops, "error": np.array(["", ""], dtype=object)}
        first, second = extractor(dict(batch))["features"], extractor(dict(batch))["features"]
        assert first.shape == (2, 2048) and np.array_equal(first, second)
    finally:
        torch.use_deterministic_algorithms(False)
