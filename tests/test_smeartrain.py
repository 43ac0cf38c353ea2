"""`leukray smear-train`: annotations, labels of detected cells, slide folds, and the whole
command through a local Ray runtime on constructed smear fields, whose bundle `screen` takes."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pandas as pd
import pytest
from test_screen import CYTOPLASM, NUCLEUS, PLASMA, RED_CELL, RED_CELL_D, encode

from leukray.cli import main
from leukray.config import PreprocessConfig, ScreenConfig, SmearTrainConfig
from leukray.data.annotations import (
    BLAST,
    NORMAL,
    UNLABELLED,
    SlideAnnotation,
    label_cells,
    load_annotations,
    parse_point_csv,
    parse_voc,
    parse_xyc,
)
from leukray.errors import ConfigError, DataError
from leukray.ops import stain
from leukray.stages.screen import screen
from leukray.stages.smeartrain import slide_folds, smear_train

VOC = """<annotation><filename>BloodImage_00007.jpg</filename>
<object><name>WBC</name><bndbox><xmin>10</xmin><ymin>20</ymin><xmax>60</xmax><ymax>80</ymax></bndbox></object>
<object><name>RBC</name><bndbox><xmin>100</xmin><ymin>100</ymin><xmax>140</xmax><ymax>140</ymax></bndbox></object>
</annotation>"""


def boxes(*cells: tuple[int, int, int, int]) -> pd.DataFrame:
    """Detected cells as screen writes them, from (x0, y0, x1, y1) with the centre inside."""
    frame = pd.DataFrame(cells, columns=["x0", "y0", "x1", "y1"])
    return frame.assign(cx=(frame["x0"] + frame["x1"]) / 2, cy=(frame["y0"] + frame["y1"]) / 2)


class TestAnnotations:
    def test_xyc_fields_from_all_patients_are_positive_and_complete(self):
        ann = parse_xyc("980\t648\n582 1015\n", "xyc/Im029_1.xyc")
        assert ann.slide == "Im029_1" and ann.positive and ann.complete
        np.testing.assert_array_equal(ann.points, [[980, 648], [582, 1015]])
        healthy = parse_xyc("\n", "Im045_0.xyc")
        assert not healthy.positive and len(healthy.points) == 0
        with pytest.raises(DataError, match="pairs"):
            parse_xyc("1 2 3", "Im001_1.xyc")

    def test_voc_keeps_the_white_cell_boxes_of_a_normal_slide(self):
        ann = parse_voc(VOC, "Annotations/BloodImage_00007.xml")
        assert ann.slide == "BloodImage_00007" and not ann.positive and not ann.complete
        np.testing.assert_array_equal(ann.boxes, [[10, 20, 60, 80]])  # the RBC box is not a leukocyte
        with pytest.raises(DataError, match="Pascal-VOC"):
            parse_voc("<annotation><object><name>WBC</name></object></annotation>", "bad.xml")

    def test_point_csv_groups_by_slide_and_refuses_unknown_labels(self):
        parsed = parse_point_csv("slide,x,y,label\na.jpg,5,5,blast\na.jpg,9,9,normal\nb,1,1,hem\n", "p.csv")
        assert [(a.slide, a.positive, a.point_labels.tolist()) for a in parsed] == [
            ("a", True, [BLAST, NORMAL]),
            ("b", False, [NORMAL]),
        ]
        with pytest.raises(DataError, match="line 3: label 'monocyte'"):
            parse_point_csv("slide,x,y,label\na,1,1,all\na,2,2,monocyte\n", "p.csv")

    def test_one_slide_annotated_twice_is_refused(self, tmp_path):
        (tmp_path / "Im001_1.xyc").write_text("1 2\n")
        (tmp_path / "points.csv").write_text("slide,x,y,label\nIm001_1,3,4,all\n")
        with pytest.raises(DataError, match="Im001_1 is annotated twice"):
            load_annotations([str(tmp_path)], lambda d: [str(p) for p in sorted(tmp_path.iterdir())], open_text)


def open_text(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


class TestLabels:
    def test_a_centre_makes_its_cell_a_blast_and_the_rest_normal(self):
        cells = boxes((0, 0, 50, 50), (40, 0, 100, 50), (200, 200, 240, 240))
        # (48, 25) lies in both boxes: the cell with the nearer nucleus centre takes it
        ann = SlideAnnotation("f_1", "xyc", True, True, np.array([[48.0, 25.0]]), np.array([BLAST]))
        assert label_cells(cells, ann).tolist() == [NORMAL, BLAST, NORMAL]

    def test_voc_boxes_label_only_the_cells_they_hold(self):
        ann = parse_voc(VOC, "BloodImage_00007.xml")
        assert label_cells(boxes((15, 25, 55, 75), (300, 300, 340, 340)), ann).tolist() == [NORMAL, UNLABELLED]

    def test_csv_points_label_their_cells_and_leave_the_rest(self):
        (ann,) = parse_point_csv("slide,x,y,label\nf,20,20,hem\nf,120,20,all\n", "p.csv")
        cells = boxes((0, 0, 40, 40), (100, 0, 140, 40), (300, 0, 340, 40))
        assert label_cells(cells, ann).tolist() == [NORMAL, BLAST, UNLABELLED]


def test_slide_folds_are_disjoint_cover_every_slide_and_mix_classes():
    slides = np.repeat([f"s{i}" for i in range(10)], 3)
    positive = {f"s{i}": i < 4 for i in range(10)}
    folds = slide_folds(slides, positive, 2, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == sorted(set(slides.tolist()))
    assert all(sum(positive[s] for s in fold) == 2 for fold in folds)  # stratified by slide
    assert [len(f) for f in slide_folds(slides, positive, 0, seed=0)] == [1] * 10  # leave one slide out


def test_config_refuses_trunk_features_and_one_fold():
    with pytest.raises(ConfigError, match="cell features only"):
        SmearTrainConfig(features="resnet50")
    with pytest.raises(ConfigError, match="cv_folds"):
        SmearTrainConfig(cv_folds=1)


# -- the whole command on constructed fields ---------------------------------------------------

BLAST_NUCLEUS = (150, 96, 186)  # paler, bluer, larger: a blast's fine open chromatin
BLAST_R, NORMAL_R = 24, 13


def field_with_cells(seed: int, blasts: int, normals: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A 480x360 field: red cells, `blasts` large pale nuclei and `normals` small dark ones
    (lymphocytes) at seeded places; returns the image and the blast centres."""
    rng = np.random.default_rng(seed)
    image = np.empty((360, 480, 3), np.uint8)
    image[:] = PLASMA
    spots: list[tuple[int, int, int]] = []
    while len(spots) < blasts + normals:
        x, y = int(rng.integers(60, 420)), int(rng.integers(60, 300))
        if all(math.hypot(x - a, y - b) > 95 for a, b, _ in spots):
            spots.append((x, y, BLAST_R if len(spots) < blasts else NORMAL_R))
    placed: list[tuple[int, int]] = []
    for _ in range(400):
        x, y = int(rng.integers(10, 470)), int(rng.integers(10, 350))
        if all(math.hypot(x - a, y - b) > r * 1.6 + RED_CELL_D / 2 + 2 for a, b, r in spots) and all(
            math.hypot(x - a, y - b) > RED_CELL_D + 2 for a, b in placed
        ):
            placed.append((x, y))
            cv2.circle(image, (x, y), RED_CELL_D // 2, RED_CELL, -1)
    for x, y, r in spots:
        cv2.circle(image, (x, y), int(r * 1.5), CYTOPLASM, -1)
        cv2.circle(image, (x, y), r, BLAST_NUCLEUS if r == BLAST_R else NUCLEUS, -1)
    noisy = image.astype(np.float32) + rng.normal(0, 3, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), [(x, y) for x, y, r in spots if r == BLAST_R]


@pytest.fixture(scope="module")
def annotated_fields(tmp_path_factory):
    """Six fields in ALL-IDB's layout: three `_1` (two blasts, one lymphocyte each) and three
    healthy `_0` (three lymphocytes), with .xyc blast centres."""
    root = tmp_path_factory.mktemp("smears")
    (root / "im").mkdir()
    (root / "xyc").mkdir()
    for k in range(6):
        positive = k < 3
        image, centres = field_with_cells(k, 2 if positive else 0, 1 if positive else 3)
        name = f"Im{k:03d}_{int(positive)}"
        (root / "im" / f"{name}.png").write_bytes(encode(image))
        (root / "xyc" / f"{name}.xyc").write_text("".join(f"{x}\t{y}\n" for x, y in centres))
    (root / "im" / "Im099_1.png").write_bytes(encode(field_with_cells(9, 1, 1)[0]))  # no annotation
    return root


@pytest.mark.slow
def test_smear_train_learns_blasts_and_screen_takes_its_bundle(ray_local, annotated_fields, tmp_path):
    out = tmp_path / "run"
    summary = smear_train(
        str(annotated_fields / "im"),
        [str(annotated_fields / "xyc")],
        str(out),
        SmearTrainConfig(),
        ScreenConfig(),
        PreprocessConfig(size=64, stain="reinhard"),
    )
    counts = summary["counts"]
    assert counts["fields"] == 6 and counts["fields_without_annotation"] == 1
    assert (counts["blast_cells"], counts["normal_cells"], counts["unlabelled_cells"]) == (6, 12, 0)
    scores = summary["metrics"]["all"]
    assert scores["cell_auroc"] == 1.0 and scores["slide_auroc_mean_prob"] == 1.0 and scores["slides"] == 6
    cells = pd.read_parquet(out / "cells.parquet")
    assert cells["prob_all"].notna().all() and len(cells) == 18
    assert cells["prob_all_uncalibrated"].notna().all() and not np.allclose(
        cells["prob_all"], cells["prob_all_uncalibrated"]
    )
    bundle = json.loads((out / "model" / "bundle.json").read_text())
    calibration = summary["calibration"]  # Platt's, on the out-of-fold predictions: stored in the bundle
    assert bundle["calibration"] == {k: calibration[k] for k in ("method", "slope", "intercept", "cells")}
    assert calibration["method"] == "platt" and calibration["slope"] > 0 and calibration["cells"] == 18
    assert calibration["brier_calibrated"] < 0.25 and calibration["log_loss_calibrated"] > 0
    assert bundle["weights"]["kind"] == "none" and bundle["features"] == "morphology+colour+texture"
    target = stain.parse_target("reinhard", bundle["preprocess"]["stain_target"])  # the training stain travels
    assert 20 < target[0] < 90

    screened = screen(str(out / "model"), str(annotated_fields / "im"), str(tmp_path / "screen"))
    slides = pd.read_csv(tmp_path / "screen" / "slides.csv").set_index("slide")
    status = {k.rsplit("/", 1)[-1]: v for k, v in slides["status"].items()}
    assert screened["counts"]["cells"] == 20
    assert screened["model"]["calibration"] == bundle["calibration"]
    assert [status[f"Im{k:03d}_{int(k < 3)}.png"] for k in range(6)] == ["flagged"] * 3 + ["not flagged"] * 3


def test_smear_train_mistakes_are_one_line_errors(annotated_fields, tmp_path, capsys):
    code = main(["smear-train", "--fields", str(annotated_fields / "im"), "--annotations", str(tmp_path), "--out", "x"])
    assert code == 3  # bad data (a folder without annotations), not a bad option
    assert "no annotations" in capsys.readouterr().err
    code = main(
        ["smear-train", "--fields", str(annotated_fields / "im"), "--annotations", str(annotated_fields / "xyc")]
        + ["--out", str(tmp_path / "o"), "--preprocess.stain", "vahadane"]
    )
    assert code == 2
    assert "preprocess.stain must be one of" in capsys.readouterr().err
