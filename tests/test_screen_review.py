"""The screen's result parts and its visual review, without Ray: rows of hand-made slides go
through the part writer the stage uses (`SlideParts`), the tables are summarised as the
stage does, and report.html is written from the parts and read back — its sections, links
and images — and rendered in headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from test_screen import encode, smear_field

from leukray.config import ScreenConfig
from leukray.errors import DataError
from leukray.io import screenparts
from leukray.ops.review import add_review_media, field_thumbnail, prob_colour
from leukray.report.review import review_order, write_review
from leukray.stages.screen import CAVEAT, PART_COLUMNS, SlideParts, summarise_slides

CHROMIUM = "/usr/bin/chromium"
CROP = 64


def crop(value: int) -> np.ndarray:
    return np.full((CROP, CROP, 3), value, np.uint8)


def slide_rows(slide: str, probs: list[float], thumb: tuple[bytes, float] | None, error: str = "") -> pd.DataFrame:
    """The stream's rows of one slide: one cell per probability (boxes 40 px apart), or one
    error row (cell_index -1) when `probs` is empty; media added by `add_review_media`."""
    n = max(len(probs), 1)
    batch = {
        "slide": np.asarray([slide] * n, dtype=object),
        "cell_index": np.arange(n) if probs else np.asarray([-1]),
        "image": np.stack([crop(40 + 50 * i) for i in range(n)]),
        "error": np.asarray(["" if probs else error] * n, dtype=object),
    }
    batch = add_review_media(batch, {slide: thumb} if thumb else {})
    frame = pd.DataFrame({k: v for k, v in batch.items() if k != "image"})
    x0 = np.arange(n) * 40 + 10
    frame = frame.assign(x0=x0, y0=20, x1=x0 + 30, y1=50, cx=x0 + 15.0, cy=35.0, area=700)
    probs_or_nan = probs if probs else [np.nan]
    return frame.assign(
        prob_all=probs_or_nan,
        predicted_label=["all" if p >= 0.5 else "hem" for p in probs] if probs else [""],
        detect_node="n1",
        node_id="n1" if probs else "",
    )


@pytest.fixture()
def review_folder(tmp_path):
    """A screen folder of three slides written through `SlideParts` (two slides a part):
    a.png flagged (3 cells), b.png not flagged (1 cell), c.jpg unreadable."""
    field = smear_field(seed=0)
    thumb = field_thumbnail(field, 240)
    cfg = ScreenConfig(part_slides=2, report_cells=2)
    writer = SlideParts(str(tmp_path), "id-1", {"data": "test"}, cfg)
    a = slide_rows("a.png", [0.99, 0.2, 0.7], thumb)
    writer.add(pd.concat([a.iloc[:2], slide_rows("b.png", [0.1], thumb)]))  # a.png not finished yet
    writer.add(pd.concat([a.iloc[1:], slide_rows("c.jpg", [], None, "not a decodable image")]))  # one row again
    writer.add(a.iloc[:1])  # a finished slide's row delivered again
    writer.close()
    return tmp_path, writer, cfg


def test_parts_hold_whole_slides_once_with_their_top_crops(review_folder):
    out, writer, _ = review_folder
    parts, stray = screenparts.list_parts(str(out))
    assert not stray and [p.path for p in parts] == [p.path for p in writer.parts]
    assert [p.slides for p in parts] == [("a.png", "b.png"), ("c.jpg",)]  # b finished first, a with the 2nd frame
    rows = pd.concat([pd.read_parquet(p.path) for p in parts], ignore_index=True)
    assert list(rows.columns) == PART_COLUMNS
    assert rows.groupby("slide").size().to_dict() == {"a.png": 3, "b.png": 1, "c.jpg": 1}  # a's repeated row once
    a = rows[rows["slide"] == "a.png"].set_index("cell_index")
    assert [bool(len(a.loc[i, "crop_jpeg"])) for i in (0, 1, 2)] == [True, False, True]  # report_cells=2: 0.99, 0.7
    assert (rows.groupby("slide")["thumbnail"].apply(lambda t: sum(map(len, t)) > 0)).to_dict() == {
        "a.png": True,
        "b.png": True,
        "c.jpg": False,
    }
    thumb, scale, crops = screenparts.read_media(parts[0].path, "a.png")
    assert cv2.imdecode(np.frombuffer(thumb, np.uint8), 1).shape == (180, 240, 3) and scale == 0.5
    assert sorted(crops) == [0, 2]
    assert abs(float(cv2.imdecode(np.frombuffer(crops[2], np.uint8), 1).mean()) - 140) < 3  # cell 2's own crop


def test_a_slide_still_missing_rows_when_the_stream_ends_is_an_error(tmp_path):
    writer = SlideParts(str(tmp_path), "id", {}, ScreenConfig())
    writer.add(slide_rows("a.png", [0.9, 0.2], None).iloc[:1])
    with pytest.raises(DataError, match="before these slides were complete: a.png"):
        writer.close()
    assert screenparts.list_parts(str(tmp_path)) == ([], [])


def test_review_order_puts_flagged_slides_first():
    slides = pd.DataFrame(
        {
            "slide": ["e", "n1", "f1", "i", "f2", "n2"],
            "status": ["error", "not flagged", "flagged", "insufficient cells", "flagged", "not flagged"],
            "blast_fraction": [np.nan, 0.1, 0.4, np.nan, 0.9, 0.1],
            "mean_prob_all": [np.nan, 0.2, 0.5, np.nan, 0.8, 0.3],
        }
    )
    assert list(review_order(slides)["slide"]) == ["f2", "f1", "n2", "n1", "i", "e"]


def test_prob_colour_runs_from_green_to_red():
    assert prob_colour(0.0) == "#00c820" and prob_colour(1.0) == "#ff0020" and prob_colour(0.5) == "#ffc820"
    assert prob_colour(float("nan")) == "#8a8a8a"


def write_folder_review(out: Path, cfg: ScreenConfig) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    parts, _ = screenparts.list_parts(str(out))
    rows = pd.concat([screenparts.read_rows(p, PART_COLUMNS) for p in parts], ignore_index=True)
    cells, slides = summarise_slides(rows, cfg)
    owner = {s: p.path for p in parts for s in p.slides}
    path = write_review(str(out), slides, cells, owner, cfg.report_cells, CAVEAT)
    return Path(path).read_text(encoding="utf-8"), cells, slides


def test_review_has_a_section_per_slide_in_order_with_images_that_decode_and_links_that_resolve(review_folder):
    out, _, cfg = review_folder
    page, cells, slides = write_folder_review(out, cfg)
    sections = re.findall(r'<section class="slide" id="(s\d+)" data-slide="([^"]+)" data-status="([^"]+)"', page)
    assert sections == [("s1", "a.png", "flagged"), ("s2", "b.png", "not flagged"), ("s3", "c.jpg", "error")]
    assert "not a diagnosis" in page and "not a decodable image" in page
    images = re.findall(r'data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 + 2 + 1  # thumbnails of a and b, a's two top crops, b's crop
    shapes = [cv2.imdecode(np.frombuffer(base64.b64decode(i), np.uint8), 1).shape for i in images]
    assert shapes.count((180, 240, 3)) == 2 and shapes.count((CROP, CROP, 3)) == 3
    # every classified cell is a box on its thumbnail, coloured by its probability
    boxes = re.findall(r'<rect id="(s\d+-c\d+)" class="box[^"]*" x="[^"]+" y="[^"]+"[^>]*stroke="(#[0-9a-f]{6})"', page)
    assert len(boxes) == len(cells) == 4
    assert ("s1-c0", prob_colour(0.99)) in boxes and ("s1-c1", prob_colour(0.2)) in boxes
    # the contact sheet: a's most suspicious first, each linking to its box, with its field coordinates
    links = re.findall(r'<figure><a href="#(s\d+-c\d+)">', page)
    assert links == ["s1-c0", "s1-c2", "s2-c0"]
    assert set(links) <= {box for box, _ in boxes}
    assert "cell 0: p 0.990 (flagged)<br>x 10-40, y 20-50" in page
    table_links = re.findall(r'<td><a href="#(s\d+)">([^<]+)</a></td>', page)
    assert table_links == [("s1", "a.png"), ("s2", "b.png"), ("s3", "c.jpg")]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_review_renders_in_headless_chromium(review_folder, tmp_path_factory):
    out, _, cfg = review_folder
    write_folder_review(out, cfg)
    alone = tmp_path_factory.mktemp("alone")  # self-contained: no parts beside it
    (alone / "report.html").write_bytes((out / "report.html").read_bytes())
    shot = alone / "review.png"
    subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={alone / 'profile'}", f"--screenshot={shot}", "--window-size=1000,1400",
            f"file://{alone / 'report.html'}",
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = cv2.imread(str(shot))[..., ::-1].astype(int)
    assert pixels.shape == (1400, 1000, 3)
    # the thumbnails are drawn (the smear's pink red cells) with a's first cell outlined red (#ff0420)
    pink = (abs(pixels[..., 0] - 208) < 20) & (abs(pixels[..., 1] - 150) < 25) & (abs(pixels[..., 2] - 148) < 25)
    red_box = (pixels[..., 0] > 230) & (pixels[..., 1] < 40) & (pixels[..., 2] < 60)
    thumb_rows = pink.sum(axis=1) > 40  # the thumbnails' rows; the legend's red swatch is above them
    assert thumb_rows.sum() > 100
    assert red_box[thumb_rows].sum() > 30  # cell 0 (prob_all 0.99) outlined in red


def test_a_field_thumbnail_keeps_the_aspect_and_says_its_scale():
    field = smear_field(seed=0)  # 480 x 360
    jpeg, scale = field_thumbnail(field, 120)
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), 1).shape == (90, 120, 3) and scale == 0.25
    jpeg, scale = field_thumbnail(field, 1000)  # never enlarged
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), 1).shape == (360, 480, 3) and scale == 1.0
    assert encode(field)  # the test field encodes (the fixture's thumbnails are made from it)
