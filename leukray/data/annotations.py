"""Cell annotations of smear fields, and the labels they give to detected cells.

Three formats, each keyed by the field's file stem (`Im029_1`, `BloodImage_00000`):

- ALL-IDB `.xyc` (Labati, Piuri & Scotti, ICIP 2011): one `x y` line per lymphoblast centre.
  The annotation is complete: a detected cell containing a centre is a blast, every other
  detected cell of the field is not (in `_1` fields from ALL patients and in `_0` healthy
  fields alike). A field from an ALL patient (`_1`) is a positive slide.
- Pascal-VOC `.xml` (BCCD): the `WBC` boxes are normal leukocytes; a detected cell whose
  nucleus centre lies in one is normal, other detections (a red cell, stain debris) are left
  unlabelled. BCCD is normal blood: a negative slide.
- CSV with columns `slide,x,y,label` (label all/blast/1 or hem/normal/0): the cell containing
  each point gets its label, others are unlabelled; a slide with any blast is positive.

May import: numpy, pandas, `leukray.errors`.
"""

from __future__ import annotations

import io
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from leukray.errors import DataError

BLAST, NORMAL, UNLABELLED = 1, 0, -1
POSITIVE_NAMES = ("all", "blast", "1")
NEGATIVE_NAMES = ("hem", "normal", "0")
ANNOTATION_EXTENSIONS = (".xyc", ".xml", ".csv")


@dataclass(frozen=True)
class SlideAnnotation:
    """What is known about one field's cells.

    points: N x 2 float (x, y) of annotated cells with `point_labels` (N, BLAST or NORMAL);
    boxes: M x 4 float (x0, y0, x1, y1) of normal leukocytes; complete: every blast is among
    the points (unclaimed cells are NORMAL); positive: the slide's own truth (ALL or not).
    """

    slide: str
    source: str  # xyc | voc | csv
    positive: bool
    complete: bool = False
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))


def slide_key(path: str) -> str:
    """A field's key: its file name without folder and extension."""
    return posixpath.splitext(posixpath.basename(path.replace("\\", "/")))[0]


def parse_xyc(text: str, where: str) -> SlideAnnotation:
    """An ALL-IDB `.xyc` file's text (whitespace-separated x y pairs; may be empty).

    Raises:
        DataError: an odd count or a non-number (naming `where`).
    """
    try:
        values = np.asarray(text.split(), dtype=np.float64)
    except ValueError:
        raise DataError(f"{where}: an .xyc file holds `x y` numbers per line") from None
    if len(values) % 2:
        raise DataError(f"{where}: an .xyc file holds `x y` pairs, got {len(values)} numbers")
    points = values.reshape(-1, 2)
    stem = slide_key(where)
    positive = stem.endswith("_1") or (not stem.endswith("_0") and len(points) > 0)
    return SlideAnnotation(stem, "xyc", positive, True, points, np.full(len(points), BLAST, np.int64))


def parse_voc(text: str, where: str, name: str = "WBC") -> SlideAnnotation:
    """A Pascal-VOC annotation's `name` boxes as normal leukocytes of a normal slide.

    Raises:
        DataError: not VOC XML.
    """
    try:
        root = ET.fromstring(text)
        boxes = [
            [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            for obj in root.iter("object")
            if (obj.findtext("name") or "").strip() == name
        ]
    except (ET.ParseError, AttributeError, TypeError, ValueError):
        raise DataError(f"{where}: not a Pascal-VOC annotation (object/name/bndbox xmin..ymax)") from None
    stem = slide_key(root.findtext("filename") or where)
    return SlideAnnotation(stem, "voc", False, boxes=np.asarray(boxes, np.float64).reshape(-1, 4))


def parse_point_csv(text: str, where: str) -> list[SlideAnnotation]:
    """A `slide,x,y,label` CSV's points, one annotation per slide.

    Raises:
        DataError: missing columns, a non-number or an unknown label (with its line).
    """
    table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    missing = {"slide", "x", "y", "label"} - set(table.columns)
    if missing:
        raise DataError(f"{where}: a point CSV needs columns slide,x,y,label; missing {', '.join(sorted(missing))}")
    labels = table["label"].str.strip().str.lower()
    bad = ~labels.isin(POSITIVE_NAMES + NEGATIVE_NAMES)
    if bad.any():
        line = int(np.argmax(bad)) + 2
        raise DataError(
            f"{where} line {line}: label {table['label'].iloc[line - 2]!r} is neither "
            f"{'/'.join(POSITIVE_NAMES)} nor {'/'.join(NEGATIVE_NAMES)}"
        )
    try:
        xy = table[["x", "y"]].astype(np.float64).to_numpy()
    except ValueError:
        raise DataError(f"{where}: x and y must be numbers") from None
    coded = np.where(labels.isin(POSITIVE_NAMES), BLAST, NORMAL).astype(np.int64)
    out = []
    for slide, rows in table.groupby(table["slide"].map(slide_key), sort=True).groups.items():
        rows = np.asarray(rows)
        out.append(SlideAnnotation(slide, "csv", bool((coded[rows] == BLAST).any()), False, xy[rows], coded[rows]))
    return out


def load_annotations(
    sources: list[str], list_files: Callable[[str], list[str]], read_text: Callable[[str], str]
) -> dict[str, SlideAnnotation]:
    """Every annotation under `sources` (folders searched for .xyc/.xml/.csv, or single
    files), by slide key.

    Raises:
        DataError: no annotation found, a malformed file, or one slide annotated twice.
    """
    found: dict[str, SlideAnnotation] = {}
    for source in sources:
        files = [source] if source.lower().endswith(ANNOTATION_EXTENSIONS) else list_files(source)
        for path in sorted(p for p in files if p.lower().endswith(ANNOTATION_EXTENSIONS)):
            if path.lower().endswith(".csv"):
                parsed = parse_point_csv(read_text(path), path)
            elif path.lower().endswith(".xyc"):
                parsed = [parse_xyc(read_text(path), path)]
            else:
                parsed = [parse_voc(read_text(path), path)]
            for annotation in parsed:
                if annotation.slide in found:
                    raise DataError(f"slide {annotation.slide} is annotated twice (again in {path})")
                found[annotation.slide] = annotation
    if not found:
        raise DataError(f"no annotations (.xyc, Pascal-VOC .xml, slide,x,y,label .csv) in {', '.join(sources)}")
    return found


def label_cells(cells: pd.DataFrame, annotation: SlideAnnotation) -> np.ndarray:
    """The label (BLAST, NORMAL or UNLABELLED) of each detected cell of one field.

    Args:
        cells: one row per detected cell with x0, y0, x1, y1 (end-exclusive box) and cx, cy
            (nucleus centre), as `leukray screen` writes them.
        annotation: the field's annotation.

    Returns:
        int64 (len(cells),). A point belongs to the cell whose box contains it and whose
        nucleus centre is nearest; a cell holding a blast point is a blast.
    """
    n = len(cells)
    labels = np.full(n, NORMAL if annotation.complete else UNLABELLED, np.int64)
    if n == 0:
        return labels
    x0, y0, x1, y1, cx, cy = (cells[c].to_numpy(np.float64) for c in ("x0", "y0", "x1", "y1", "cx", "cy"))
    for bx0, by0, bx1, by1 in annotation.boxes:
        labels[(cx >= bx0) & (cx <= bx1) & (cy >= by0) & (cy <= by1) & (labels == UNLABELLED)] = NORMAL
    for (x, y), label in zip(annotation.points, annotation.point_labels, strict=True):
        inside = np.flatnonzero((x0 <= x) & (x < x1) & (y0 <= y) & (y < y1))
        if len(inside):
            best = inside[np.argmin((cx[inside] - x) ** 2 + (cy[inside] - y) ** 2)]
            labels[best] = BLAST if label == BLAST or labels[best] == BLAST else NORMAL
    return labels
