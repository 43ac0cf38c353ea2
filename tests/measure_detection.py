"""Measure leukocyte detection on the real smear fields of ../shared/data (not a test; the
README's and docs/screening.md's detection numbers come from here):

    PYTHONPATH=. .venv/bin/python tests/measure_detection.py [--misses]

With --misses, every ALL-IDB1 blast centre outside all detected cells is listed with what
lies there: the detection that swallowed it (and how many annotated centres that one box
holds: a clump), or the nucleus-mask component under it (too small, or not in the mask at
all: a pale nucleus), and its distance to the field's edge.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_screen import ALL_IDB1, BCCD, all_idb1_blasts_found, bccd_white_cells_found, read_rgb  # noqa: E402

from leukray.config import ScreenConfig  # noqa: E402
from leukray.ops import smear  # noqa: E402


def missed_blasts(cfg: ScreenConfig) -> list[str]:
    """One line per annotated blast centre that no detected cell claims, with why."""
    lines = []
    for image_path in sorted((ALL_IDB1 / "im").glob("*.jpg")):
        centres = np.asarray((ALL_IDB1 / "xyc" / f"{image_path.stem}.xyc").read_text().split(), float).reshape(-1, 2)
        if not len(centres):
            continue
        image = read_rgb(image_path)
        cells = smear.detect_leukocytes(image, cfg)
        diameter = cfg.red_cell_diameter_px or smear.estimate_red_cell_diameter(image)
        free = list(range(len(cells)))
        for x, y in centres:
            inside = [i for i in free if cells[i].contains(x, y)]
            if inside:
                free.remove(min(inside, key=lambda i: (cells[i].cx - x) ** 2 + (cells[i].cy - y) ** 2))
                continue
            edge = min(x, y, image.shape[1] - x, image.shape[0] - y)
            holders = [c for c in cells if c.contains(x, y)]
            if holders:
                box = holders[0]
                held = sum(box.contains(a, b) for a, b in centres)
                why = f"clump: one detection ({box.x0},{box.y0})-({box.x1},{box.y1}) holds {held} annotated blasts"
            else:
                mask = smear.leukocyte_mask(image, cfg)
                why = (
                    "in the nucleus mask but dropped by the size filter"
                    if mask[int(y), int(x)]
                    else "pale: not in mask"
                )
            lines.append(
                f"{image_path.stem} ({x:.0f},{y:.0f}): {why}; red cell {diameter:.0f} px; "
                f"{edge / diameter:.1f} red cells from the edge"
            )
    return lines


if __name__ == "__main__":
    found, total = all_idb1_blasts_found(ScreenConfig())
    print(f"ALL-IDB1 blast centres in a detected cell: {found}/{total} = {found / total:.3f}")
    if "--misses" in sys.argv:
        print("\n".join(missed_blasts(ScreenConfig())) or "no blast missed")
    hits, truth, false, detections, fields = bccd_white_cells_found(
        sorted((BCCD / "Annotations").glob("*.xml")), ScreenConfig()
    )
    print(
        f"BCCD: {fields} fields, WBC found {hits}/{truth} = {hits / truth:.3f}, {detections} detections, "
        f"{false} outside every WBC box = {false / fields:.3f} per field"
    )
