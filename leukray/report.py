"""What a run prints at the end: the leaderboard and the facts that qualify it."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from leukray import storage


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_leaderboard(out: str, summary: dict[str, Any], top: int | None = None) -> None:
    import io

    board = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(out, "leaderboard.csv"))))
    shown = board.drop(columns=["detail", "weights"], errors="ignore")
    if top:
        shown = shown.head(top)
    print()
    print(f"Leaderboard (test split; trunk weights: {summary['weights']['name']}):")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
    if not summary["weights"]["is_pretrained"]:
        print("NOTE: random-init trunk — these are not ImageNet-feature results.")
    print(f"Split: {summary['split']['description']}")
    best = summary.get("best_model")
    if best:
        test = best["test"]
        print(
            f"Best by {best['chosen_by']}: {best['name']} — test accuracy {_fmt(test['Accuracy'])}, "
            f"balanced accuracy {_fmt(test['Balanced Accuracy'])}, ROC AUC {_fmt(test['ROC AUC'])}"
        )
    counts = summary["counts"]
    print(
        f"Images: {counts['usable']} used, {counts['duplicates_removed']} duplicates kept once, "
        f"{counts['errors']} in errors.csv. Outputs in {out}"
    )
