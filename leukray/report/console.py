"""What a run prints at the end (the leaderboard and the facts that qualify it) and the
leaderboards' Markdown files.

May import: pandas, `leukray.io`.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import pandas as pd

from leukray.io import storage

if TYPE_CHECKING:
    from leukray.models.trunk import WeightsInfo


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _short(title: str) -> str:
    return title.replace(" (the paper's Table III)", "")


# Why a classifier failed, in words, for the failures a sweep meets on every dataset:
# (pattern in the error, explanation). Others are shown as their first line.
FAILURE_REASONS = (
    (
        "Negative values in data passed to",
        "needs non-negative inputs (counts or categories), but the features are standardised and so partly negative",
    ),
    ("exceeded sweep.timeout_s", "took longer than sweep.timeout_s"),
    ("MemoryError", "ran out of memory"),
    ("the fit process died", "its fit process died (out of memory or a crash in native code)"),
    ("needs samples of at least 2 classes", "a training fold held a single class"),
)


def failure_reason(detail: Any) -> str:
    """One short line saying why a classifier failed, from its leaderboard `detail`."""
    text = "" if detail is None or (isinstance(detail, float) and math.isnan(detail)) else str(detail)
    for pattern, reason in FAILURE_REASONS:
        if pattern in text:
            return reason
    first = (text.strip().splitlines() or ["no reason recorded"])[0]
    return first if len(first) <= 120 else first[:117] + "..."


def _tables(summary: dict[str, Any]) -> list[tuple[str, str]]:
    sets = summary.get("feature_sets") or [{"file": "leaderboard.csv", "title": "ResNet50 trunk features"}]
    tables = [("leaderboard.csv", f"Table III — classifiers on {_short(sets[0]['title'])}")]
    tables += [(t["file"], f"Classifiers on {t['title']}") for t in sets[1:]]
    if summary.get("custom_model"):
        tables.append(
            (
                "custom_leaderboard.csv",
                f"Table IV — classifiers on custom-model features ({summary['custom_model']['embedding']}-d)",
            )
        )
    return tables


def print_leaderboard(out: str, summary: dict[str, Any], top: int | None = None) -> None:
    """Print Table III (and Table IV when the custom model was trained), why classifiers
    failed, then the facts that qualify them: weights, split, chosen model. The final line
    (`final_line`) is the caller's to print."""
    failures: dict[str, tuple[str, list[str]]] = {}
    for name, title in _tables(summary):
        # empty cells (e.g. no ROC AUC) read as NaN, so the metric columns stay numeric
        board = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(out, name))))
        for row in board[board["status"] != "ok"].itertuples(index=False):
            reason = failure_reason(getattr(row, "detail", None))
            failures.setdefault(row.Model, (f"{row.status}: {reason}", []))[1].append(name)
        shown = board.drop(columns=["detail", "weights", "node_id", "features"], errors="ignore")
        if top:
            shown = shown.head(top)
        val = "; Val Balanced Accuracy on the validation split" if "Val Balanced Accuracy" in shown.columns else ""
        print()
        print(f"{title} (test-split metrics{val}; trunk weights: {summary['weights']['name']}):")
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
    print()
    for model, (why, boards) in failures.items():
        print(f"Not scored: {model} ({why}) in {', '.join(boards)}")
    _print_facts(summary)


def _print_facts(summary: dict[str, Any]) -> None:
    if not summary["weights"]["is_pretrained"]:
        print("NOTE: random-init trunk — these are not ImageNet-feature results.")
    print(f"Split: {summary['split']['description']}")
    custom = summary.get("custom_model")
    if custom:
        print(
            f"Custom ResNet50: {custom['epochs']} epochs, best validation balanced accuracy "
            f"{_fmt(custom['best_val_balanced_accuracy'])} at epoch {custom['best_epoch']} (history.csv)"
        )
    search = (custom or {}).get("search")
    if search:
        best = search["best"]
        print(
            f"Head search: {search['trials']} Ray Tune trials ({search['stopped_by_asha']} stopped early by ASHA, "
            f"head_search.csv); the head is trial {best['trial']}'s: lr {best['lr']:.2e}, dropout "
            f"{best['dropout']:.2f}, weight decay {best['weight_decay']:.1e}"
        )
    tuned = summary.get("tuned_model")
    if tuned and tuned.get("params") is not None:
        print(
            f"Fine-tuned {tuned['name']} on {tuned['feature_source']} features "
            f"({tuned['ok_trials']}/{tuned['trials']} Ray Tune "
            f"trials, tuning.csv): validation balanced accuracy {_fmt(tuned['val_balanced_accuracy'])} "
            f"(untuned {_fmt(tuned['untuned_val_balanced_accuracy'])}), "
            f"test {_fmt(tuned['test']['Balanced Accuracy'])}; {tuned['params']}"
        )
    chosen = summary.get("chosen_model") or summary.get("best_model")
    if chosen:
        test = chosen["test"]
        source = f" on {chosen['feature_source']} features" if chosen.get("feature_source") else ""
        print(
            f"Chosen by {chosen['chosen_by']}: {chosen['name']}{source} — test accuracy {_fmt(test['Accuracy'])}, "
            f"balanced accuracy {_fmt(test['Balanced Accuracy'])}, ROC AUC {_fmt(test['ROC AUC'])}"
        )
        threshold = chosen.get("decision_threshold") or {}
        if isinstance(threshold.get("value"), (int, float)):
            print(
                f"  decision threshold on P(ALL) {threshold['value']:.3f} ({threshold.get('rule')}), "
                "in model/bundle.json"
            )
        ci = chosen.get("test_ci95") or {}
        if ci.get("Balanced Accuracy") and ci.get("ROC AUC"):
            (b0, b1), (a0, a1) = ci["Balanced Accuracy"], ci["ROC AUC"]
            print(
                f"  95% intervals by subject bootstrap ({ci['subjects']} test subjects): balanced accuracy "
                f"[{_fmt(b0)}, {_fmt(b1)}], ROC AUC [{_fmt(a0)}, {_fmt(a1)}]"
            )


# What a finished run is expected to leave for people, by name in the run folder (model/ by
# its manifest): the final line lists only those that exist.
RUN_OUTPUTS = (("leaderboard.md", "leaderboard.md"), ("report.html", "report.html"), ("model/", "model/bundle.json"))


def existing_outputs(out: str) -> list[str]:
    """Which of the run's outputs for people really exist in `out`."""
    return [name for name, probe in RUN_OUTPUTS if storage.exists(storage.join(out, probe))]


def final_line(out: str, summary: dict[str, Any]) -> str:
    """The last line of `leukray run`/`tune`: counts and where the outputs are."""
    counts = summary["counts"]
    files = ", ".join(existing_outputs(out))
    return (
        f"Images: {counts['usable']} used, {counts['duplicates_removed']} duplicates kept once, "
        f"{counts['errors']} in errors.csv. Outputs in {out}" + (f" ({files})" if files else "")
    )


def leaderboard_markdown(
    board: pd.DataFrame,
    weights: WeightsInfo,
    data_desc: str,
    split_desc: str,
    title: str = "ResNet50 trunk features (the paper's Table III)",
) -> str:
    """RUN/leaderboard.md (and custom_leaderboard.md): the table with what qualifies it."""
    lines = [
        f"# Classifier sweep on {title}",
        "",
        f"- Trunk weights: **{weights.describe()}**",
        f"- Data: {data_desc}",
        f"- Split: {split_desc}",
        "- Metrics on the test split; ROC AUC from predicted scores; the best model is chosen on validation.",
        "",
    ]
    if not weights.is_pretrained:
        lines.insert(2, "> **Random-init trunk: these are NOT ImageNet-feature results.**\n")
    shown = board.copy()
    for col in ["Accuracy", "Balanced Accuracy", "ROC AUC", "F1 Score", "Val Balanced Accuracy"]:
        shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    shown["Time Taken"] = shown["Time Taken"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    shown["detail"] = shown["detail"].fillna("").map(lambda s: str(s).replace("|", "/")[:120])
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines + [header, rule, *body]) + "\n"
