"""Measure how a bundle screens annotated smear fields against the smear-domain classifier's
leave-slides-out figures on the same cells (not a test; docs/screening.md's comparison of
the C-NMC bundle with `smear-train` comes from here):

    leukray smear-train --fields FIELDS --annotations XYC --out SMEAR [--preprocess.stain reinhard]
    leukray screen --model BUNDLE --data FIELDS --out SCREEN
    PYTHONPATH=. python tests/measure_screen_transfer.py --smear SMEAR --screen SCREEN

Both commands cut the cells with the same detector, so each screened cell is matched to the
labelled cell of smear-train with the same slide and box. The bundle never saw these fields;
smear-train's probabilities are out of fold (each from a model that never saw its slide).
Prints cell AUROC, balanced accuracy at the bundle's own flag and at p >= 0.5, and the slide
AUROC of the mean probability, for both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from leukray.data.annotations import BLAST, NORMAL

BOX = ["x0", "y0", "x1", "y1"]


def labelled_cells(smear: Path, screen: Path) -> pd.DataFrame:
    """smear-train's labelled cells with the screen's prob_all and flag beside their own."""
    mine = pd.read_parquet(smear / "cells.parquet")
    mine = mine[mine["label"].isin([BLAST, NORMAL])].copy()
    theirs = pd.read_parquet(screen / "cells.parquet")
    for frame in (mine, theirs):
        frame["field"] = frame["slide"].map(lambda s: Path(str(s)).stem)
    joined = mine.merge(theirs[["field", *BOX, "prob_all", "flagged"]], on=["field", *BOX], suffixes=("", "_screen"))
    if len(joined) != len(mine):
        raise SystemExit(f"only {len(joined)} of {len(mine)} labelled cells were screened with the same box")
    return joined


def scores(cells: pd.DataFrame, prob: str, flag: pd.Series) -> dict[str, float]:
    truth = (cells["label"] == BLAST).to_numpy()
    slides = cells.groupby("field")[prob].mean()
    positive = np.array([k.endswith("_1") for k in slides.index])
    return {
        "cell_auroc": round(roc_auc_score(truth, cells[prob]), 3),
        "cell_balanced_accuracy_flag": round(balanced_accuracy_score(truth, flag), 3),
        "cell_balanced_accuracy_p05": round(balanced_accuracy_score(truth, cells[prob] >= 0.5), 3),
        "cells_called_blast": int(flag.sum()),
        "slide_auroc_mean_prob": round(roc_auc_score(positive, slides.to_numpy()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--smear", type=Path, required=True, help="a smear-train --out folder")
    parser.add_argument("--screen", type=Path, required=True, help="a screen --out folder over the same fields")
    args = parser.parse_args()
    cells = labelled_cells(args.smear, args.screen)
    screened = json.loads((args.screen / "screen.json").read_text())
    result = {
        "cells": len(cells),
        "blasts": int((cells["label"] == BLAST).sum()),
        "slides": int(cells["field"].nunique()),
        "screen_bundle": scores(cells, "prob_all_screen", cells["flagged"]),
        "smear_train_out_of_fold": scores(cells, "prob_all", cells["prob_all"] >= 0.5),
        "screen_model": {k: screened["model"].get(k) for k in ("bundle", "weights", "classifier", "feature_source")},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
