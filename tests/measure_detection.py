"""Measure leukocyte detection on the real smear fields of ../shared/data (not a test; the
README's detection numbers come from here):

    .venv/bin/python tests/measure_detection.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_screen import BCCD, all_idb1_blasts_found, bccd_white_cells_found  # noqa: E402

from leukray.config import ScreenConfig  # noqa: E402

if __name__ == "__main__":
    found, total = all_idb1_blasts_found(ScreenConfig())
    print(f"ALL-IDB1 blast centres in a detected cell: {found}/{total} = {found / total:.3f}")
    hits, truth, false, detections, fields = bccd_white_cells_found(
        sorted((BCCD / "Annotations").glob("*.xml")), ScreenConfig()
    )
    print(
        f"BCCD: {fields} fields, WBC found {hits}/{truth} = {hits / truth:.3f}, {detections} detections, "
        f"{false} outside every WBC box = {false / fields:.3f} per field"
    )
