"""The screening review: `write_review(OUT, ...)` writes OUT/report.html for a screen, a
self-contained page a haematologist reads to see why each slide was flagged. Flagged slides
come first; each has its thumbnail with every classified cell drawn on it (outline colour by
prob_all, `leukray.ops.review.prob_colour`), a contact sheet of its most suspicious cells
with their probabilities (each links to its box on the thumbnail and gives its field
coordinates), and its row of the per-slide table, which heads the page.

The images are the ones the screen stored in its parts (`leukray.io.screenparts`) as the
slides finished; they are read a part at a time and the page is rendered as a stream
(Jinja2's `generate`) into the file, so memory stays that of one slide, not of the screen.
The page is laid out on the run report's template (`templates/base.html.j2`, the shared
`table` macro) through the same Jinja2 environment (`leukray.report.document`).

May import: numpy, pandas, cv2, jinja2, `leukray.io`, `leukray.ops.review`,
`leukray.report.document`.
"""

from __future__ import annotations

import base64
from typing import Any, Iterator

import cv2
import numpy as np
import pandas as pd

from leukray.io import screenparts, storage
from leukray.ops.review import prob_colour
from leukray.report.document import num, templates

REVIEW_TEMPLATE = "review.html.j2"
REVIEW_FILE = "report.html"
STATUS_ORDER = {"flagged": 0, "not flagged": 1, "insufficient cells": 2, "error": 3}
SLIDE_TABLE_COLUMNS = ["#", "slide", "status", "cells", "flagged cells", "blast fraction", "mean prob_all", "error"]


def review_order(slides: pd.DataFrame) -> pd.DataFrame:
    """The slides in the order a reviewer reads them: flagged first, then not flagged,
    insufficient cells, errors; within a status the highest blast fraction (then mean
    prob_all) first, ties by name."""
    keyed = slides.assign(
        _status=slides["status"].map(STATUS_ORDER).fillna(len(STATUS_ORDER)),
        _fraction=-pd.to_numeric(slides["blast_fraction"], errors="coerce").fillna(-1.0),
        _mean=-pd.to_numeric(slides["mean_prob_all"], errors="coerce").fillna(-1.0),
    )
    keyed = keyed.sort_values(["_status", "_fraction", "_mean", "slide"], kind="stable")
    return keyed.drop(columns=["_status", "_fraction", "_mean"]).reset_index(drop=True)


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _thumbnail(anchor: str, jpeg: bytes, scale: float, cells: pd.DataFrame) -> dict[str, Any] | None:
    """The thumbnail as an SVG layer: the JPEG, and one outlined box per cell (thumbnail
    coordinates, id `<anchor>-c<cell index>`, a tooltip with its probability)."""
    if not jpeg:
        return None
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)  # a few hundred pixels a side
    if decoded is None:
        return None
    height, width = decoded.shape[:2]
    boxes = []
    for cell in cells.itertuples(index=False):
        boxes.append(
            {
                "id": f"{anchor}-c{int(cell.cell_index)}",
                "x": round(cell.x0 * scale, 1),
                "y": round(cell.y0 * scale, 1),
                "w": round(max(cell.x1 - cell.x0, 1) * scale, 1),
                "h": round(max(cell.y1 - cell.y0, 1) * scale, 1),
                "colour": prob_colour(cell.prob_all),
                "flagged": bool(cell.flagged),
                "title": f"cell {int(cell.cell_index)}: prob_all {num(cell.prob_all, 3)}, "
                f"x {int(cell.x0)}-{int(cell.x1)}, y {int(cell.y0)}-{int(cell.y1)}",
            }
        )
    return {"uri": _data_uri(jpeg), "width": width, "height": height, "boxes": boxes}


def _contact_sheet(anchor: str, cells: pd.DataFrame, crops: dict[int, bytes], shown: int) -> list[dict[str, Any]]:
    """The `shown` most suspicious cells that have a stored crop, highest prob_all first."""
    ranked = cells[cells["cell_index"].isin(list(crops))].sort_values(
        ["prob_all", "cell_index"], ascending=[False, True], kind="stable"
    )
    sheet = []
    for cell in ranked.head(shown).itertuples(index=False):
        index = int(cell.cell_index)
        sheet.append(
            {
                "uri": _data_uri(crops[index]),
                "target": f"{anchor}-c{index}",
                "index": index,
                "prob": num(cell.prob_all, 3),
                "colour": prob_colour(cell.prob_all),
                "flagged": bool(cell.flagged),
                "where": f"x {int(cell.x0)}-{int(cell.x1)}, y {int(cell.y0)}-{int(cell.y1)}",
            }
        )
    return sheet


def _slide_row(rank: int, slide: Any) -> list[str]:
    return [
        str(rank),
        str(slide.slide),
        str(slide.status),
        str(int(slide.cells)),
        str(int(slide.flagged_cells)),
        num(slide.blast_fraction, 3),
        num(slide.mean_prob_all, 3),
        str(slide.error or ""),
    ]


def _slide_sections(
    ordered: pd.DataFrame, cells: pd.DataFrame, part_of: dict[str, str], shown: int
) -> Iterator[dict[str, Any]]:
    """One section per slide, in review order, each built when the page reaches it."""
    by_slide = {slide: own for slide, own in cells.groupby("slide", sort=False)}
    empty = cells.iloc[0:0]
    for rank, slide in enumerate(ordered.itertuples(index=False), start=1):
        anchor = f"s{rank}"
        own = by_slide.get(slide.slide, empty)
        part = part_of.get(slide.slide)
        thumb, scale, crops = screenparts.read_media(part, slide.slide) if part else (b"", 0.0, {})
        yield {
            "anchor": anchor,
            "rank": rank,
            "slide": slide.slide,
            "status": slide.status,
            "row": _slide_row(rank, slide),
            "thumbnail": _thumbnail(anchor, thumb, scale, own),
            "sheet": _contact_sheet(anchor, own, crops, shown),
            "error": str(slide.error or ""),
        }


def write_review(
    out: str, slides: pd.DataFrame, cells: pd.DataFrame, part_of: dict[str, str], report_cells: int, caveat: str
) -> str:
    """Write OUT/report.html (self-contained: every image is a data URI).

    Args:
        out: the screen's output folder (local path or URI).
        slides: slides.csv's rows (`leukray.stages.screen.SLIDE_COLUMNS`).
        cells: cells.parquet's rows (boxes in field pixels, prob_all, flagged).
        part_of: slide -> the part file that holds its thumbnail and crops.
        report_cells: most suspicious cells shown per slide.
        caveat: the screen's caveat, shown as a warning at the top.

    Returns:
        The path written.
    """
    ordered = review_order(slides)
    counts = ordered["status"].value_counts()
    context = {
        "title": f"leukray screening review: {out}",
        "caveat": caveat,
        "counts": [f"{int(counts.get(status, 0))} {status}" for status in STATUS_ORDER],
        "columns": SLIDE_TABLE_COLUMNS,
        "rows": [
            {"anchor": f"s{rank}", "cells": _slide_row(rank, s)}
            for rank, s in enumerate(ordered.itertuples(index=False), start=1)
        ],
        "total": len(ordered),
        "legend": [{"prob": f"{p:.2f}", "colour": prob_colour(p)} for p in (0.0, 0.25, 0.5, 0.75, 1.0)],
        "slides": _slide_sections(ordered, cells, part_of, report_cells),
    }
    path = storage.join(out, REVIEW_FILE)
    with storage.AtomicLocalFile(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for chunk in templates().get_template(REVIEW_TEMPLATE).generate(**context):
            handle.write(chunk)
    return path
