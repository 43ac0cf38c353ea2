"""`leukray screen`: leukocyte detection and cropping on constructed smear fields, detection
recall on real ALL-IDB1 and BCCD fields, and the whole job through a local Ray runtime."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_DATA

from leukray.config import PreprocessConfig, ScreenConfig
from leukray.errors import ConfigError, DataError, LeukrayError
from leukray.io import screenparts
from leukray.ops.smear import (
    NO_CELLS,
    CellBox,
    cell_crop,
    detect_and_crop,
    detect_leukocytes,
    detection_recall,
    estimate_red_cell_diameter,
    leukocyte_mask,
    normalise_field_cells,
)
from leukray.report.review import review_order
from leukray.stages.screen import CELL_COLUMNS, SLIDE_COLUMNS, screen, summarise_slides

ALL_IDB1 = SHARED_DATA / "all-idb1-dev"
BCCD = SHARED_DATA / "bccd"

# -- a constructed smear field ---------------------------------------------------------------

PLASMA = (226, 218, 206)  # pale beige background: B - G < 0
RED_CELL = (208, 150, 148)  # pink-red: B - G ~ 0
NUCLEUS = (112, 48, 150)  # deep purple: B - G ~ 100
CYTOPLASM = (200, 186, 206)  # pale blue-grey ring: B - G ~ 20
RED_CELL_D = 40
ROUND_CELLS = [(90, 80, 22), (260, 230, 17)]  # (x, y, nucleus radius)
LOBED_CELL = (420, 110)  # a neutrophil: three lobes, a few pixels apart
LOBES = [(-12, -6, 9), (8, -9, 9), (0, 12, 9)]
PLATELETS = [(200, 60), (330, 320)]


def smear_field(seed: int = 0, leukocytes: bool = True) -> np.ndarray:
    """A 480x360 smear field (HxWx3 uint8 RGB): red cells of diameter 40 px with a paler
    centre on plasma, two round-nucleus leukocytes, one three-lobed neutrophil and two
    platelets, with seeded sensor noise and a slight blur."""
    rng = np.random.default_rng(seed)
    h, w = 360, 480
    image = np.empty((h, w, 3), np.uint8)
    image[:] = PLASMA
    white = [(x, y, 34) for x, y, _ in ROUND_CELLS] + [(*LOBED_CELL, 34)]
    placed: list[tuple[int, int]] = []
    for _ in range(400):
        x, y = int(rng.integers(10, w - 10)), int(rng.integers(10, h - 10))
        if any(math.hypot(x - a, y - b) < r + RED_CELL_D / 2 + 4 for a, b, r in white):
            continue
        if any(math.hypot(x - a, y - b) < RED_CELL_D + 2 for a, b in placed):
            continue
        placed.append((x, y))
        cv2.circle(image, (x, y), RED_CELL_D // 2, RED_CELL, -1)
        cv2.circle(image, (x, y), RED_CELL_D // 6, (222, 190, 186), -1)  # central pallor
    if leukocytes:
        for x, y, r in ROUND_CELLS:
            cv2.circle(image, (x, y), int(r * 1.5), CYTOPLASM, -1)
            cv2.circle(image, (x, y), r, NUCLEUS, -1)
        cx, cy = LOBED_CELL
        cv2.circle(image, (cx, cy), 30, CYTOPLASM, -1)
        for dx, dy, r in LOBES:
            cv2.circle(image, (cx + dx, cy + dy), r, NUCLEUS, -1)
        for x, y in PLATELETS:
            cv2.circle(image, (x, y), 3, NUCLEUS, -1)
    noisy = image.astype(np.float32) + rng.normal(0, 3, image.shape)
    return cv2.GaussianBlur(np.clip(noisy, 0, 255).astype(np.uint8), (3, 3), 0)


def lobed_centre() -> tuple[float, float]:
    return LOBED_CELL[0] + float(np.mean([d[0] for d in LOBES])), LOBED_CELL[1] + float(np.mean([d[1] for d in LOBES]))


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, image[:, :, ::-1])
    assert ok
    return buf.tobytes()


class TestConfig:
    def test_defaults_are_valid_and_bad_values_are_refused(self):
        ScreenConfig()
        with pytest.raises(ConfigError, match="blast_threshold"):
            ScreenConfig(blast_threshold=1.5)
        with pytest.raises(ConfigError, match="max_area_fraction"):
            ScreenConfig(min_area_fraction=2.0, max_area_fraction=1.0)
        with pytest.raises(ConfigError, match="red_cell_diameter_px"):
            ScreenConfig(red_cell_diameter_px=2)
        with pytest.raises(ConfigError, match="batch_size"):
            ScreenConfig(batch_size=0)


class TestDetection:
    def test_red_cell_diameter_is_estimated(self):
        assert estimate_red_cell_diameter(smear_field()) == pytest.approx(RED_CELL_D, rel=0.15)

    def test_finds_exactly_the_leukocytes_and_merges_lobes(self):
        cells = detect_leukocytes(smear_field(), ScreenConfig())
        expected = [(x, y) for x, y, _ in ROUND_CELLS] + [lobed_centre()]
        assert len(cells) == len(expected), [(c.cx, c.cy) for c in cells]
        for x, y in expected:
            nearest = min(cells, key=lambda c: math.hypot(c.cx - x, c.cy - y))
            assert math.hypot(nearest.cx - x, nearest.cy - y) < 4
            assert nearest.contains(x, y)
        lobed = min(
            cells,
            key=lambda c: math.hypot(c.cx - lobed_centre()[0], c.cy - lobed_centre()[1]),
        )
        lobe_area = math.pi * 9**2
        assert 2.5 * lobe_area < lobed.area < 3.6 * lobe_area  # all three lobes, one cell
        big = min(cells, key=lambda c: math.hypot(c.cx - 90, c.cy - 80))
        assert big.area == pytest.approx(math.pi * 22**2, rel=0.15)
        # the box holds the nucleus plus the cytoplasm ring (margin 0.5 x radius)
        assert big.x1 - big.x0 == pytest.approx(2 * 22 * 1.5, abs=6)

    def test_a_field_without_leukocytes_has_none(self):
        field = smear_field(seed=3, leukocytes=False)
        assert detect_leukocytes(field, ScreenConfig()) == []
        assert not leukocyte_mask(field, ScreenConfig()).any()

    def test_touching_nuclei_are_split(self):
        image = np.empty((300, 400, 3), np.uint8)
        image[:] = PLASMA
        for x in (150, 185):  # two round nuclei of radius 20 overlapping by 5 px
            cv2.circle(image, (x, 150), 20, NUCLEUS, -1)
        cfg = ScreenConfig(red_cell_diameter_px=40)
        cells = detect_leukocytes(image, cfg)
        assert sorted(round(c.cx) for c in cells) == pytest.approx([150, 185], abs=3)
        merged = detect_leukocytes(image, ScreenConfig(red_cell_diameter_px=40, split_depth=0))
        assert len(merged) == 1

    def test_size_filter_is_relative_to_the_red_cell(self):
        image = smear_field()
        # the same nuclei are "platelets" when red cells are said to be 4x larger
        assert detect_leukocytes(image, ScreenConfig(red_cell_diameter_px=160)) == []

    def test_crop_is_the_cell_on_black(self):
        image = smear_field()
        cfg = ScreenConfig()
        cell = min(
            detect_leukocytes(image, cfg),
            key=lambda c: math.hypot(c.cx - 90, c.cy - 80),
        )
        crop = cell_crop(image, cell, cfg)
        assert crop.shape == (cell.y1 - cell.y0, cell.x1 - cell.x0, 3) and crop.dtype == np.uint8
        for corner in (crop[0, 0], crop[0, -1], crop[-1, 0], crop[-1, -1]):
            assert not corner.any()
        centre = crop[round(cell.cy) - cell.y0, round(cell.cx) - cell.x0]
        assert np.abs(centre.astype(int) - NUCLEUS).max() < 20  # the nucleus is kept
        kept = crop.any(axis=2)
        assert math.pi * 22**2 < kept.sum() < math.pi * (22 * 1.5 + 4) ** 2  # nucleus + ring

    def test_hand_made_box_keeps_the_inscribed_ellipse(self):
        image = smear_field()
        crop = cell_crop(image, CellBox(60, 50, 121, 111, 90.0, 80.0, 0), ScreenConfig())
        assert crop.shape == (61, 61, 3) and not crop[0, 0].any() and crop[30, 30].any()

    @pytest.mark.parametrize(
        "bad",
        [
            np.zeros((50, 50), np.uint8),
            np.zeros((50, 50, 3), np.float32),
            np.zeros((50, 50, 4), np.uint8),
        ],
    )
    def test_bad_input_is_refused_with_the_shape(self, bad):
        for call in (
            lambda: detect_leukocytes(bad, ScreenConfig()),
            lambda: leukocyte_mask(bad, ScreenConfig()),
        ):
            with pytest.raises(ValueError, match=r"expected HxWx3 uint8 RGB, got \(50, 50"):
                call()
        with pytest.raises(ValueError, match="expected HxWx3 uint8"):
            cell_crop(bad, CellBox(0, 0, 10, 10, 5.0, 5.0, 1), ScreenConfig())

    def test_detection_recall_counts_each_box_once(self):
        boxes = [
            CellBox(0, 0, 10, 10, 5.0, 5.0, 1),
            CellBox(20, 20, 30, 30, 25.0, 25.0, 1),
        ]
        assert detection_recall(boxes, [(5, 5), (25, 25), (50, 50)]) == pytest.approx(2 / 3)
        assert detection_recall(boxes[:1], [(4, 4), (6, 6)]) == pytest.approx(1 / 2)
        assert math.isnan(detection_recall(boxes, []))


class TestBatchAndReport:
    def test_detect_and_crop_emits_cells_and_keeps_failed_slides(self):
        files = {
            "a.png": encode(smear_field(seed=0)),
            "empty.png": encode(smear_field(seed=1, leukocytes=False)),
            "broken.jpg": b"not an image at all",
        }
        batch = {"path": np.asarray(list(files), dtype=object)}
        out = detect_and_crop(batch, ScreenConfig(), PreprocessConfig(size=64), files.__getitem__)
        frame = pd.DataFrame({k: v for k, v in out.items() if k != "image"})
        assert out["image"].shape == (len(frame), 64, 64, 3) and out["image"].dtype == np.uint8
        cells = frame[frame["slide"] == "a.png"]
        assert cells["cell_index"].tolist() == [0, 1, 2] and (cells["error"] == "").all()
        assert out["image"][cells.index].reshape(3, -1).max(axis=1).min() > 0  # real crops
        empty = frame[frame["slide"] == "empty.png"]
        assert empty["cell_index"].tolist() == [-1] and empty["error"].tolist() == [NO_CELLS]
        broken = frame[frame["slide"] == "broken.jpg"]
        assert broken["cell_index"].tolist() == [-1] and "not a decodable image" in broken["error"].item()
        assert not out["image"][broken.index].any()

    def test_a_fields_cells_are_stain_normalised_together_toward_the_bundles_target(self):
        from leukray.ops import stain

        field = smear_field(seed=0)
        cells = detect_leukocytes(field, ScreenConfig())
        crops = [cell_crop(field, c, ScreenConfig()) for c in cells]
        target = np.array([40.0, 35.0, -30.0, 9.0, 7.0, 6.0])
        cfg = PreprocessConfig(size=64, stain="reinhard", stain_target=stain.format_target(target))
        normalised = normalise_field_cells(crops, cfg)
        # pooled over the field's cells the target holds; each cell keeps its own offset
        np.testing.assert_allclose(stain.reinhard_stats(normalised), target, atol=0.8)
        assert [(c == 0).all(axis=2).sum() for c in normalised] == [(c == 0).all(axis=2).sum() for c in crops]
        files = {"a.png": encode(field)}
        out = detect_and_crop({"path": np.asarray(["a.png"], object)}, ScreenConfig(), cfg, files.__getitem__)
        assert (out["error"] == "").all() and len(out["error"]) == 3
        no_target = PreprocessConfig(size=64, stain="macenko")
        out = detect_and_crop({"path": np.asarray(["a.png"], object)}, ScreenConfig(), no_target, files.__getitem__)
        assert out["cell_index"].tolist() == [-1] and "stain_target is empty" in out["error"][0]

    def test_detect_and_crop_measures_the_cells_families_when_the_bundle_asks(self):
        from leukray.ops.cellfeatures import feature_dim

        files = {"a.png": encode(smear_field(seed=0)), "broken.jpg": b"not an image"}
        batch = {"path": np.asarray(list(files), dtype=object)}
        plain = detect_and_crop(batch, ScreenConfig(), PreprocessConfig(size=64), files.__getitem__)
        out = detect_and_crop(batch, ScreenConfig(), PreprocessConfig(size=64), files.__getitem__, ("morphology",))
        assert "cell_features" not in plain
        assert np.array_equal(out["image"], plain["image"])  # the same crops either way
        assert out["cell_features"].shape == (len(out["slide"]), feature_dim("morphology"))
        cells = out["cell_index"] >= 0
        assert (out["cell_features"][cells, 0] > 0).all()  # each detected cell has an area
        assert not out["cell_features"][~cells].any()  # the broken slide's row carries zeros

    def test_a_field_over_the_screen_pixel_cap_is_an_error_row(self):
        field = smear_field(seed=0)
        files = {"a.png": encode(field)}
        batch = {"path": np.asarray(list(files), dtype=object)}
        cap = field.shape[0] * field.shape[1] - 1
        out = detect_and_crop(batch, ScreenConfig(max_pixels=cap), PreprocessConfig(size=64), files.__getitem__)
        assert out["cell_index"].tolist() == [-1]
        assert out["error"][0].startswith(f"image too large: {field.shape[1]}x{field.shape[0]} px")

    def test_slide_statuses(self):
        rows = pd.DataFrame(
            {
                "slide": ["pos", "pos", "pos", "neg", "neg", "one", "none", "bad"],
                "cell_index": [0, 1, 2, 0, 1, 0, -1, -1],
                "prob_all": [0.9, 0.8, 0.1, 0.2, 0.3, 0.99, np.nan, np.nan],
                "predicted_label": ["all", "all", "hem", "hem", "hem", "all", "", ""],
                "error": ["", "", "", "", "", "", NO_CELLS, "file not found"],
                "node_id": "n",
                **{c: 0 for c in ["x0", "y0", "x1", "y1", "cx", "cy", "area"]},
            }
        )
        cells, slides = summarise_slides(
            rows,
            ScreenConfig(blast_threshold=0.5, slide_flag_fraction=0.5, min_cells=2),
        )
        assert list(cells.columns) == CELL_COLUMNS and len(cells) == 6
        assert cells["flagged"].tolist() == [
            False,
            False,
            True,
            True,
            True,
            False,
        ]  # neg, one, pos
        assert list(slides.columns) == SLIDE_COLUMNS
        status = slides.set_index("slide")["status"].to_dict()
        assert status == {
            "pos": "flagged",
            "neg": "not flagged",
            "one": "insufficient cells",
            "none": "insufficient cells",
            "bad": "error",
        }
        pos = slides.set_index("slide").loc["pos"]
        assert pos["cells"] == 3 and pos["flagged_cells"] == 2 and pos["blast_fraction"] == pytest.approx(2 / 3)
        assert pos["mean_prob_all"] == pytest.approx(0.6)
        assert slides.set_index("slide").loc["none", "error"] == NO_CELLS


# -- real smear fields -------------------------------------------------------------------------


def read_rgb(path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1].copy()


@pytest.mark.realdata
@pytest.mark.skipif(not ALL_IDB1.is_dir(), reason=f"ALL-IDB1 fields not found at {ALL_IDB1}")
def test_all_idb1_blasts_are_detected():
    """12 ALL-IDB1 fields, 59 annotated blasts. Measured with the defaults: all 59 blast
    centres inside a detected box, each centre in its own box (53/59 before the red-cell
    estimate ignored stained pixels and clumps were cut at their pale seams)."""
    found, total = all_idb1_blasts_found(ScreenConfig())
    assert total == 59
    # detection is deterministic: the bound is the measured 59 less a margin of one cell
    # (a platform's OpenCV build may round one contour differently); 57 = 0.966 >= 0.95
    assert found >= 58, f"blast recall {found}/{total} (measured 59/59)"


def all_idb1_blasts_found(cfg: ScreenConfig) -> tuple[int, int]:
    """(annotated blast centres inside a detected cell, annotated blast centres)."""
    found = total = 0
    for image_path in sorted((ALL_IDB1 / "im").glob("*.jpg")):
        text = (ALL_IDB1 / "xyc" / f"{image_path.stem}.xyc").read_text().split()
        centres = np.asarray(text, dtype=float).reshape(-1, 2)
        if not len(centres):
            continue
        cells = detect_leukocytes(read_rgb(image_path), cfg)
        found += round(detection_recall(cells, centres) * len(centres))
        total += len(centres)
    return found, total


def voc_boxes(xml_path, name: str) -> list[tuple[int, int, int, int]]:
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.findall("object"):
        if obj.findtext("name", "").strip() == name:
            b = obj.find("bndbox")
            boxes.append(tuple(int(float(b.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")))
    return boxes


@pytest.mark.realdata
@pytest.mark.skipif(not BCCD.is_dir(), reason=f"BCCD not found at {BCCD}")
def test_bccd_white_cells_are_detected_with_few_false_detections():
    """40 BCCD fields (seeded sample). Measured with the defaults: WBC recall 41/41, 50
    detections of which 1 lies outside every WBC box (0.025 false detections per field;
    the other 8 surplus are cells split in two: 5 before the red-cell estimate left stained
    pixels out). On all 364 fields: 369/372, 0.044, 440 detections (426 before)."""
    annotations = sorted((BCCD / "Annotations").glob("*.xml"))
    pick = sorted(np.random.default_rng(0).choice(len(annotations), 40, replace=False))
    hits, truth, false, detections, fields = bccd_white_cells_found([annotations[i] for i in pick], ScreenConfig())
    assert fields == 40 and truth >= 40
    # deterministic detection: measured 41/41, 1 false, 50 detections; margin of one cell each
    assert hits >= truth - 1, f"WBC recall {hits}/{truth} (measured 41/41)"
    assert false <= 2, f"{false} false detections in {fields} fields (measured 1)"
    assert detections <= 51, f"{detections} detections for {truth} white cells (measured 50)"


def bccd_white_cells_found(annotations, cfg: ScreenConfig) -> tuple[int, int, int, int, int]:
    """(annotated WBCs with a detection inside their box, annotated WBCs, detections inside
    no WBC box, detections, fields) over the BCCD fields of `annotations`."""
    hits = truth = false = fields = detections = 0
    for annotation in annotations:
        image_path = BCCD / "JPEGImages" / f"{annotation.stem}.jpg"
        if not image_path.is_file():
            continue
        wbc = voc_boxes(annotation, "WBC")
        cells = detect_leukocytes(read_rgb(image_path), cfg)
        inside = [[b[0] <= c.cx <= b[2] and b[1] <= c.cy <= b[3] for b in wbc] for c in cells]
        claimed: set[int] = set()
        for k in range(len(wbc)):
            match = [j for j, row in enumerate(inside) if row[k] and j not in claimed]
            if match:
                claimed.add(match[0])
                hits += 1
        truth += len(wbc)
        false += sum(1 for row in inside if not any(row))
        detections += len(cells)
        fields += 1
    return hits, truth, false, detections, fields


# -- the whole job through Ray -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A model bundle without a run: a seeded random ResNet50 trunk and a logistic
    regression fitted on seeded random 2,048-d features (its answers mean nothing; the job's
    plumbing is what is tested)."""
    from sklearn.linear_model import LogisticRegression

    from leukray.models.bundle import save_bundle
    from leukray.models.trunk import build_trunk, resolve_weights

    state, info = resolve_weights("random", 0)
    rng = np.random.default_rng(0)
    classifier = LogisticRegression(max_iter=500).fit(rng.normal(size=(40, 2048)), np.arange(40) % 2)
    model_dir = tmp_path_factory.mktemp("bundle") / "model"
    save_bundle(
        str(model_dir),
        classes=["hem", "all"],
        positive_label="all",
        preprocess=PreprocessConfig(size=64),
        weights=info.as_dict(),
        weights_seed=0,
        feature_source="trunk",
        classifier_name="LogisticRegression",
        classifier=classifier,
        trunk_state=build_trunk(state, 0).state_dict(),
        extra={"data_fingerprint": "f" * 64, "extract_batch_size": 16},
    )
    return model_dir


def make_slides(root):
    """Two fields with three leukocytes each, one without any, an unreadable file and a
    text file that is not a slide."""
    (root / "ward-b").mkdir(parents=True)
    (root / "field-1.png").write_bytes(encode(smear_field(seed=0)))
    (root / "ward-b" / "field-2.jpg").write_bytes(encode(smear_field(seed=5), ".jpg"))
    (root / "no-cells.png").write_bytes(encode(smear_field(seed=1, leukocytes=False)))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (root / "notes.txt").write_text("not a slide")
    return root


@pytest.fixture()
def slides_dir(tmp_path):
    return make_slides(tmp_path / "slides")


@pytest.fixture(scope="module")
def screened(ray_local, tiny_bundle, tmp_path_factory):
    """One uninterrupted screen of `make_slides`' folder: (slides, out, summary)."""
    root = tmp_path_factory.mktemp("screened")
    slides = make_slides(root / "slides")
    out = root / "screen"
    return slides, out, screen(str(tiny_bundle), str(slides), str(out), ScreenConfig(min_cells=2))


@pytest.mark.slow
def test_screen_end_to_end(tiny_bundle, screened):
    slides_dir, out, summary = screened

    cells = pd.read_parquet(out / "cells.parquet")
    assert list(cells.columns) == CELL_COLUMNS
    assert cells.groupby("slide").size().to_dict() == {
        str(slides_dir / "field-1.png"): 3,
        str(slides_dir / "ward-b" / "field-2.jpg"): 3,
    }
    assert cells["prob_all"].between(0, 1).all()
    assert set(cells["predicted_label"]) <= {"hem", "all"}
    assert (cells["flagged"] == (cells["prob_all"] >= 0.5)).all()
    assert (cells["node_id"] != "").all()

    slides = pd.read_csv(out / "slides.csv", keep_default_na=False).set_index("slide")
    assert list(slides.reset_index().columns) == SLIDE_COLUMNS
    assert len(slides) == 4  # notes.txt is not a slide; nothing else is dropped
    assert slides.loc[str(slides_dir / "no-cells.png"), "status"] == "insufficient cells"
    assert slides.loc[str(slides_dir / "no-cells.png"), "error"] == NO_CELLS
    assert slides.loc[str(slides_dir / "broken.jpg"), "status"] == "error"
    assert "not a decodable image" in slides.loc[str(slides_dir / "broken.jpg"), "error"]
    assert slides.loc[str(slides_dir / "field-1.png"), "status"] in (
        "flagged",
        "not flagged",
    )
    assert slides.loc[str(slides_dir / "field-1.png"), "cells"] == 3

    written = json.loads((out / "screen.json").read_text())
    bundle_json = (tiny_bundle / "bundle.json").read_bytes()
    assert written["model"]["bundle_json_sha256"] == hashlib.sha256(bundle_json).hexdigest()
    assert written["model"]["weights"]["kind"] == "random"
    assert written["model"]["weights"]["name"] == json.loads(bundle_json)["weights"]["name"]
    assert written["model"]["training_data_fingerprint"] == "f" * 64
    assert written["config"]["min_cells"] == 2
    assert written["counts"]["cells"] == 6 and written["counts"]["slides"] == 4
    assert written["counts"]["error"] == 1 and written["counts"]["insufficient cells"] == 1
    assert "not a diagnosis" in written["caveat"]
    assert written["ray"]["node_ids"]["detect"] and written["ray"]["node_ids"]["classify"]
    assert summary["counts"] == written["counts"]
    meta = json.loads(pq.read_schema(out / "cells.parquet").metadata[b"leukray"])
    assert meta["bundle_sha256"] == written["model"]["bundle_json_sha256"]
    assert json.loads(meta["weights"])["kind"] == "random"
    # the review: a section per slide in review order, the three decodable fields as thumbnails
    page = (out / "report.html").read_text()
    shown = re.findall(r'<section class="slide" id="s\d+" data-slide="([^"]+)"', page)
    assert shown == list(review_order(slides.reset_index())["slide"]) and len(shown) == 4
    assert shown[-1] == str(slides_dir / "broken.jpg")  # errors last
    thumbs = re.findall(r'<image href="data:image/jpeg;base64,([^"]+)"', page)
    assert len(thumbs) == 3 and all(
        cv2.imdecode(np.frombuffer(base64.b64decode(t), np.uint8), 1).shape[1] == 480 for t in thumbs
    )
    assert page.count('<rect id="s') == 6  # every classified cell outlined


def read_results(out) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(out / "cells.parquet"), pd.read_csv(out / "slides.csv", keep_default_na=False)


@pytest.mark.slow
def test_an_interrupted_screen_resumes_to_the_uninterrupted_result(tiny_bundle, screened, tmp_path, monkeypatch):
    """A screen killed while writing its second part (one slide a part) leaves its first
    part and a half-written temporary file; the rerun into the same folder screens only the
    other slides and its tables equal those of an uninterrupted screen."""
    slides, reference, _ = screened
    out = tmp_path / "screen"
    cfg = ScreenConfig(min_cells=2, part_slides=1)
    real_write = screenparts.write_part

    def killed_at_second_part(folder, name, rows, identity, provenance, **kwargs):
        if screenparts.list_parts(folder)[0]:
            (out / "parts" / f"{name}.tmp-killed").write_bytes(b"PAR1 half a part")
            raise RuntimeError("killed while writing a part")
        return real_write(folder, name, rows, identity, provenance, **kwargs)

    monkeypatch.setattr(screenparts, "write_part", killed_at_second_part)
    with pytest.raises(RuntimeError, match="killed while writing a part"):
        screen(str(tiny_bundle), str(slides), str(out), cfg)
    monkeypatch.undo()
    (first,) = screenparts.list_parts(str(out))[0]
    first_bytes = Path(first.path).read_bytes()
    assert not (out / "cells.parquet").exists() and len(first.slides) == 1

    summary = screen(str(tiny_bundle), str(slides), str(out), cfg)
    retried = list(first.failed)  # the first part may hold the unreadable slide: it is read again
    assert summary["resumed"] == {
        "slides_from_earlier_attempts": 1 - len(retried),
        "slides_screened_now": 3 + len(retried),
        "unreadable_slides_read_again": len(retried),
    }
    parts, stray = screenparts.list_parts(str(out))
    assert not stray and Path(first.path).read_bytes() == first_bytes  # kept, not redone
    held = [s for p in parts for s in p.slides]
    assert sorted(held) == sorted([*pd.read_csv(reference / "slides.csv")["slide"], *retried])  # each slide once
    (cells, table), (want_cells, want_table) = read_results(out), read_results(reference)
    pd.testing.assert_frame_equal(table, want_table, check_exact=False, rtol=1e-5)
    pd.testing.assert_frame_equal(cells, want_cells, check_exact=False, rtol=1e-5)
    assert (out / "report.html").read_text().count('<section class="slide"') == 4

    # other detection settings are refused; other flagging settings, with --resume, reuse every part
    with pytest.raises(ConfigError, match=r"other data or settings \(screen.min_stain 20 -> 30\)"):
        screen(str(tiny_bundle), str(slides), str(out), ScreenConfig(min_cells=2, min_stain=30))
    strict = ScreenConfig(min_cells=2, blast_threshold=0.9999)
    again = screen(str(tiny_bundle), str(slides), str(out), strict, existing="resume")
    assert again["counts"]["flagged_cells"] == int((want_cells["prob_all"] >= 0.9999).sum())
    # only the slide that could not be read is read again (and fails again: both failures kept)
    assert again["resumed"]["slides_screened_now"] == again["resumed"]["unreadable_slides_read_again"] == 1
    broken = str(slides / "broken.jpg")
    assert [(f["slide"], f["read_later"]) for f in again["read_failures"]] == [(broken, False)] * (2 + len(retried))


@pytest.mark.slow
def test_a_slide_that_could_not_be_read_is_read_again_by_a_rerun(tiny_bundle, screened, tmp_path):
    """A read error may be transient (network storage): the rerun reads that slide again,
    and only it; the earlier failure stays recorded with its reason in screen.json."""
    _, reference, _ = screened
    slides, out = make_slides(tmp_path / "slides"), tmp_path / "screen"
    cfg = ScreenConfig(min_cells=2)
    first = screen(str(tiny_bundle), str(slides), str(out), cfg)
    broken = str(slides / "broken.jpg")
    ((failure,),) = [first["read_failures"]]
    assert failure["slide"] == broken and "not a decodable image" in failure["error"] and not failure["read_later"]

    (slides / "broken.jpg").write_bytes(encode(smear_field(seed=0), ".jpg"))  # the storage is back
    second = screen(str(tiny_bundle), str(slides), str(out), cfg)
    assert second["resumed"] == {
        "slides_from_earlier_attempts": 3,
        "slides_screened_now": 1,
        "unreadable_slides_read_again": 1,
    }
    assert second["read_failures"] == [{**failure, "read_later": True}]
    assert second["counts"]["error"] == 0 and second["counts"]["cells"] == first["counts"]["cells"] + 3
    table = pd.read_csv(out / "slides.csv", keep_default_na=False).set_index("slide")
    assert table.loc[broken, "cells"] == 3 and table.loc[broken, "error"] == ""
    # the other slides' results are the earlier ones, unchanged
    want = pd.read_csv(reference / "slides.csv", keep_default_na=False)
    want["slide"] = want["slide"].str.replace(str(reference.parent / "slides"), str(slides), regex=False)
    pd.testing.assert_frame_equal(
        table.drop(index=broken).reset_index(), want[want["slide"] != broken].reset_index(drop=True)
    )
    assert screen(str(tiny_bundle), str(slides), str(out), cfg)["resumed"]["slides_screened_now"] == 0


def test_bad_bundle_and_empty_data_are_one_line_errors(tmp_path, slides_dir):
    with pytest.raises(LeukrayError, match="not a leukray model bundle") as bad:
        screen(str(tmp_path / "nowhere"), str(slides_dir), str(tmp_path / "out"))
    assert "\n" not in str(bad.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    from leukray.stages.screen import list_slides

    with pytest.raises(DataError, match="no images found"):
        list_slides(str(empty))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "yaml_text", "message"),
    [
        (["--screen.blast_threshold", "2"], None, "screen.blast_threshold must be between 0.0 and 1.0"),
        (["--screen.min_cells", "few"], None, "screen.min_cells must be an integer"),
        ([], "bogus: 1\n", "unknown: bogus"),
        ([], "screen: {threshold: 0.3}\n", "unknown config key 'screen.threshold'"),
        (["--model", "MISSING"], None, "not a leukray model bundle"),
        (["--data", "EMPTY"], None, "no images found in"),
        (["--data", "NOWHERE"], None, "data path not found"),
    ],
)
def test_screen_user_mistakes_are_one_line(tiny_bundle, tmp_path, capsys, argv, yaml_text, message):
    from leukray.cli import main

    (tmp_path / "empty").mkdir()
    places = {
        "MISSING": str(tmp_path / "no-model"),
        "EMPTY": str(tmp_path / "empty"),
        "NOWHERE": str(tmp_path / "nowhere"),
    }
    argv = [places.get(a, a) for a in argv]
    base = {"--model": str(tiny_bundle), "--data": str(tmp_path / "empty"), "--out": str(tmp_path / "out")}
    for flag, value in base.items():
        if flag not in argv:
            argv += [flag, value]
    if yaml_text is not None:
        (tmp_path / "cfg.yaml").write_text(yaml_text)
        argv += ["--config", str(tmp_path / "cfg.yaml")]
    assert main(["screen", *argv]) == (3 if message == "no images found in" else 2)  # an empty folder: bad data
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # nothing half-written
