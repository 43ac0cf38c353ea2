"""The run report: `write_report(RUN)` turns a finished run folder into RUN/report.md, a
self-contained RUN/report.html and RUN/figures/*.png (the paper's Tables III-IV and
Figures 4-6, plus the chosen model's confusion matrix, ROC curve and a subject-level
bootstrap interval of its balanced accuracy).

The report is built once as data (sections of paragraphs, warnings, item lists, tables and
figures) and rendered twice: report.md in Python, report.html through the Jinja2 template
templates/report.html.j2 shipped in this package, so the two cannot drift apart in content.

May import: pandas, matplotlib, scikit-learn's metrics, jinja2, `leukray.io`.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from leukray.io import storage
from leukray.io.runfolder import HISTORY_COLUMNS

# -- the run report: report.md, report.html and figures/*.png ------------------------------

LEADERBOARD_COLUMNS = ["Model", "Accuracy", "Balanced Accuracy", "ROC AUC", "F1 Score", "Time Taken", "status"]
METRIC_COLUMNS = ["Accuracy", "Balanced Accuracy", "ROC AUC", "F1 Score"]
INFERENCE_STAGES = {
    "decode_preprocess": "decode + Otsu crop + resize",
    "trunk": "ResNet50 trunk",
    "head": "custom head",
    "classifier": "classifier",
}
SPLIT_ORDER = ["train", "val", "test"]
NOT_AVAILABLE = "not available"
SUBJECT_ROWS_SHOWN = 300
FIRST_ROWS = 20
REASON_ROWS_SHOWN = 50
SMALL_TEST_SUBJECTS = 10  # below this, a bootstrap over subjects says little


def subject_bootstrap_ci(
    y_true: Any,
    y_pred: Any,
    subjects: Any,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float, int]:
    """Balanced accuracy with a percentile confidence interval from a cluster bootstrap.

    Cells of one subject share a patient, a smear and a stain, so their errors are not
    independent; resampling cells would understate the uncertainty about new patients. Each
    resample therefore draws subjects with replacement and takes all their cells (the cluster
    bootstrap, Davison & Hinkley 1997, section 3.8). A resample that lacks a class present in
    `y_true` has no balanced accuracy and is skipped; the count of those used is returned.

    Args:
        y_true: (N,) true labels, any comparable values (e.g. "all"/"hem").
        y_pred: (N,) predicted labels, same values as `y_true`.
        subjects: (N,) subject ID of each cell; `np.arange(N)` resamples cells instead.
        n_boot: number of resamples drawn.
        seed: seed of the generator that draws them.
        alpha: 1 - confidence level; 0.05 gives a 95% interval.

    Returns:
        (balanced accuracy on all cells, interval low, interval high, resamples used);
        low and high are NaN when no resample was usable.
    """
    import numpy as np

    y_true, y_pred, subjects = _bootstrap_inputs(y_true, y_pred, subjects, alpha)
    totals, correct = _counts_by_subject(y_true, y_pred, subjects)
    point = float(np.mean(correct.sum(axis=0) / totals.sum(axis=0)))
    values = _bootstrap_values(totals, correct, n_boot, seed)
    if len(values) == 0:
        return point, math.nan, math.nan, 0
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return point, float(low), float(high), int(len(values))


def _bootstrap_inputs(y_true: Any, y_pred: Any, subjects: Any, alpha: float) -> tuple[Any, Any, Any]:
    """The bootstrap's inputs as 1-D arrays of one length (subjects as strings), or ValueError."""
    import numpy as np

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    subjects = np.asarray(subjects).astype(str)
    if not (y_true.ndim == y_pred.ndim == subjects.ndim == 1):
        raise ValueError(f"expected 1-D arrays, got shapes {y_true.shape}, {y_pred.shape}, {subjects.shape}")
    if not (len(y_true) == len(y_pred) == len(subjects)):
        raise ValueError(f"lengths differ: y_true {len(y_true)}, y_pred {len(y_pred)}, subjects {len(subjects)}")
    if len(y_true) == 0:
        raise ValueError("no cells to evaluate")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return y_true, y_pred, subjects


def _counts_by_subject(y_true: Any, y_pred: Any, subjects: Any) -> tuple[Any, Any]:
    """(subjects, classes) arrays: cells per subject and true class, and how many predicted correctly.

    A resample is then a vector of subject multiplicities, and its confusion counts are
    matrix products.
    """
    import numpy as np

    _, true_code = np.unique(y_true, return_inverse=True)
    _, subject_code = np.unique(subjects, return_inverse=True)
    n_subjects, n_classes = int(subject_code.max()) + 1, int(true_code.max()) + 1
    totals = np.zeros((n_subjects, n_classes))
    correct = np.zeros((n_subjects, n_classes))
    np.add.at(totals, (subject_code, true_code), 1.0)
    np.add.at(correct, (subject_code, true_code), (y_true == y_pred).astype(float))
    return totals, correct


def _bootstrap_values(totals: Any, correct: Any, n_boot: int, seed: int) -> Any:
    """Balanced accuracy of each usable resample of subjects (those with every class)."""
    import numpy as np

    n_subjects = totals.shape[0]
    rng = np.random.default_rng(seed)
    block = max(1, min(n_boot, 2_000_000 // max(n_subjects, 1)))  # bounds memory for many subjects
    stats = []
    for start in range(0, n_boot, block):
        rows = min(block, n_boot - start)
        draws = rng.integers(0, n_subjects, size=(rows, n_subjects))
        offsets = (draws + n_subjects * np.arange(rows)[:, None]).ravel()
        multiplicity = np.bincount(offsets, minlength=rows * n_subjects).reshape(rows, n_subjects).astype(float)
        tot = multiplicity @ totals
        cor = multiplicity @ correct
        usable = (tot > 0).all(axis=1)
        stats.append((cor[usable] / tot[usable]).mean(axis=1))
    return np.concatenate(stats) if stats else np.empty(0)


# The report is built once as data, a list of sections of blocks, and rendered twice, so
# report.md and report.html cannot drift apart in content.

REPORT_HEADING = "leukray run report: ALL vs normal cells (Narendra & Negi, customised ResNet50)"
HTML_TEMPLATE = "report.html.j2"  # in leukray/report/templates/
SCROLL_ROWS = 15  # a single table longer than this scrolls inside the HTML page


@dataclass
class _Table:
    columns: list[str]
    rows: list[list[str]]
    title: str = ""
    note: str = ""


@dataclass
class _Block:
    kind: str  # p | warning | items | table | tables | figure
    text: str = ""
    items: list[str] = field(default_factory=list)
    tables: list[_Table] = field(default_factory=list)
    figure: str = ""  # file name under figures/


@dataclass
class _Section:
    title: str  # "" for the part right under the page heading
    blocks: list[_Block]


def _p(text: str) -> _Block:
    return _Block("p", text)


def _warning(text: str) -> _Block:
    return _Block("warning", text)


def _items(items: list[str]) -> _Block:
    return _Block("items", items=items)


def _table(table: _Table) -> _Block:
    return _Block("table", tables=[table])


def _figure(name: str, caption: str) -> _Block:
    return _Block("figure", caption, figure=name)


def num(value: Any, digits: int = 4) -> str:
    """`value` to `digits` decimals for a table cell: "-" for None, "" and NaN, other
    non-numbers as they are (the report's and the screen review's one number format)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-" if value is None or value == "" else str(value)
    return "-" if math.isnan(number) else f"{number:.{digits}f}"


class _RunFolder:
    """Reads a run folder's optional inputs; a missing or unreadable one is None plus a reason."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.problems: dict[str, str] = {}

    def path(self, name: str) -> str:
        return storage.join(self.run_dir, name)

    def _read(self, name: str, parse: Any) -> Any:
        path = self.path(name)
        try:
            if not storage.exists(path):
                self.problems[name] = f"{name} not found"
                return None
            return parse(storage.read_bytes(path))
        except Exception as exc:  # a damaged optional input must not stop the report
            self.problems[name] = f"could not read {name}: {type(exc).__name__}: {exc}"
            return None

    def json(self, name: str) -> dict[str, Any] | None:
        import json

        value = self._read(name, lambda raw: json.loads(raw.decode("utf-8")))
        return value if isinstance(value, dict) else None

    def csv(self, name: str) -> pd.DataFrame | None:
        import io

        return self._read(name, lambda raw: pd.read_csv(io.BytesIO(raw), keep_default_na=True))

    def parquet(self, name: str) -> pd.DataFrame | None:
        import io

        import pyarrow.parquet as pq

        return self._read(name, lambda raw: pq.read_table(io.BytesIO(raw)).to_pandas())

    def why(self, name: str) -> str:
        return f"{NOT_AVAILABLE} ({self.problems.get(name, name + ' not found')})"


def _chosen_model(summary: dict[str, Any]) -> dict[str, Any] | None:
    # Runs written before the custom model existed record the sweep's pick as best_model.
    chosen = summary.get("chosen_model") or summary.get("best_model")
    return chosen if isinstance(chosen, dict) else None


def _data_description(data: Any) -> str:
    if isinstance(data, dict):
        text = str(data.get("path") or NOT_AVAILABLE)
        if data.get("test_path"):
            text += f" (test: separate dataset {data['test_path']})"
        if data.get("fingerprint"):
            text += f"; data fingerprint {str(data['fingerprint'])[:12]}"
        return text
    return NOT_AVAILABLE if data in (None, "") else str(data)


def _weights_description(weights: Any) -> str:
    if not isinstance(weights, dict):
        return NOT_AVAILABLE
    parts = [str(weights.get("name") or weights.get("kind") or "unnamed")]
    if weights.get("source"):
        parts.append(f"from {weights['source']}")
    if weights.get("sha256"):
        parts.append(f"sha256 {str(weights['sha256'])[:12]}")
    return ", ".join(parts)


def _groups(manifest: pd.DataFrame) -> pd.Series:
    """The split's grouping (as leukray.dataset.assign_groups): the subject, else the image."""
    subject = manifest["subject"].fillna("").astype(str)
    return subject.where(subject != "", "image:" + manifest["path"].astype(str))


def _test_subjects_seen_in_training(manifest: pd.DataFrame | None) -> int | None:
    if manifest is None or not {"path", "subject", "split"} <= set(manifest.columns):
        return None
    usable = manifest[manifest["split"].fillna("") != ""]
    groups = _groups(usable)
    test = set(groups[usable["split"] == "test"])
    fitted = set(groups[usable["split"].isin(["train", "val"])])
    return len(test & fitted)


def _split_statement(summary: dict[str, Any], manifest: pd.DataFrame | None) -> tuple[str, bool]:
    """One plain sentence on what the split means for the numbers; True when it leaks."""
    split = summary.get("split") if isinstance(summary.get("split"), dict) else {}
    mode = split.get("mode")
    shared = _test_subjects_seen_in_training(manifest)
    test_path = summary["data"].get("test_path") if isinstance(summary.get("data"), dict) else None
    if mode == "image":
        leaking = split.get("leaking_subjects", shared)
        return (
            f"Image-level split (the paper's protocol): {leaking if leaking is not None else 'an unknown number of'} "
            "subject(s) have cells on more than one side of the split, so a classifier can recognise the "
            "patient rather than the disease; these numbers overstate accuracy on new patients.",
            True,
        )
    if mode == "subject":
        if shared:
            return (
                f"Subject-level split was requested, but manifest.parquet shows {shared} test subject(s) also in "
                "training or validation; these numbers may overstate accuracy on new patients.",
                True,
            )
        text = (
            "Subject-level split: no subject's cells appear in both training and test, so these numbers "
            "estimate performance on new patients."
        )
        if test_path:
            text += f" The test split is the separate dataset {test_path}."
        groups = str(split.get("groups", ""))
        if groups.startswith("none") or "each their own group" in groups:
            text += f" Caveat: {groups}."
        return text, False
    return f"The split is {NOT_AVAILABLE} (summary.json does not record it); treat the numbers with care.", False


def _header(summary: dict[str, Any], folder: _RunFolder, manifest: pd.DataFrame | None) -> _Section:
    """The part under the page heading: warnings, then the run's facts."""
    from leukray import __version__

    weights = summary.get("weights")
    split = summary.get("split") if isinstance(summary.get("split"), dict) else {}
    blocks = []
    if not summary:
        blocks.append(_warning(f"summary.json is {folder.why('summary.json')}; the facts below are incomplete."))
    if isinstance(weights, dict) and weights.get("is_pretrained") is False:
        blocks.append(
            _warning(
                "RANDOM-INIT TRUNK: the ResNet50 trunk was not loaded with ImageNet weights "
                f"({weights.get('source') or 'seeded random initialisation'}). These are NOT ImageNet results "
                "and are not comparable with the paper's tables."
            )
        )
    statement, leaks = _split_statement(summary, manifest)
    if split.get("mode") == "image":
        blocks.append(
            _warning(
                "IMAGE-LEVEL SPLIT: cells of the same subject are in both training and test, so the split leaks "
                "subjects and overstates accuracy on new patients. " + statement
            )
        )
    elif leaks:
        blocks.append(_warning(statement))
    blocks.append(
        _items(
            [
                f"Data: {_data_description(summary.get('data'))}",
                f"Trunk weights: {_weights_description(weights)}",
                f"leukray version of the run: {summary.get('leukray_version', NOT_AVAILABLE)} "
                f"(report written by {__version__})",
                f"Split: {split.get('description', NOT_AVAILABLE)}",
                f"Run folder: {folder.run_dir}",
            ]
        )
    )
    return _Section("", blocks)


def _counts_table(summary: dict[str, Any]) -> _Table | None:
    counts = summary.get("counts") if isinstance(summary.get("counts"), dict) else {}
    by_split = counts.get("by_split_and_class")
    if not isinstance(by_split, dict) or not by_split:
        return None
    labels = sorted({label for per in by_split.values() if isinstance(per, dict) for label in per})
    splits = [s for s in SPLIT_ORDER if s in by_split] + sorted(s for s in by_split if s not in SPLIT_ORDER)
    rows = []
    for name in splits:
        per = by_split[name] if isinstance(by_split[name], dict) else {}
        values = [int(per.get(label, 0)) for label in labels]
        rows.append([name, *map(str, values), str(sum(values))])
    totals = [sum(int(by_split[s].get(label, 0)) for s in splits if isinstance(by_split[s], dict)) for label in labels]
    rows.append(["total", *map(str, totals), str(sum(totals))])
    return _Table(["split", *labels, "total"], rows, "Images per split and class (originals, after preprocessing)")


def _subject_table(manifest: pd.DataFrame) -> _Table:
    usable = manifest[manifest["split"].fillna("") != ""].copy()
    usable["subject"] = usable["subject"].fillna("").astype(str).replace("", "(no subject ID)")
    counts = usable.groupby(["subject", "label", "split"]).size().unstack("split", fill_value=0)
    splits = [s for s in SPLIT_ORDER if s in counts.columns] + sorted(c for c in counts.columns if c not in SPLIT_ORDER)
    counts = counts.reindex(columns=splits)
    if "n_aug" in usable.columns:
        counts["augmented copies"] = usable.groupby(["subject", "label"])["n_aug"].sum()
    rows = [
        [str(subject), str(label), *(str(int(v)) for v in values)]
        for (subject, label), values in zip(counts.index, counts.to_numpy())
    ]
    note = ""
    if len(rows) > SUBJECT_ROWS_SHOWN:
        note = f"First {SUBJECT_ROWS_SHOWN} of {len(rows)} subject/class rows shown."
        rows = rows[:SUBJECT_ROWS_SHOWN]
    return _Table(
        ["subject", "label", *map(str, counts.columns)],
        rows,
        "Images per subject, class and split (manifest.parquet)",
        note,
    )


def _data_section(summary: dict[str, Any], folder: _RunFolder, manifest: pd.DataFrame | None) -> _Section:
    counts = summary.get("counts") if isinstance(summary.get("counts"), dict) else {}
    blocks = [_items(_count_lines(counts))] if counts else []
    table = _counts_table(summary)
    blocks.append(_table(table) if table else _p(f"Counts per split and class: {NOT_AVAILABLE}."))
    blocks.append(_augmented_block(counts, manifest))
    if manifest is not None and {"path", "label", "subject", "split"} <= set(manifest.columns):
        blocks.append(_table(_subject_table(manifest)))
    else:
        blocks.append(_p(f"Images per subject: {folder.why('manifest.parquet')}."))
    blocks.append(_duplicates_block(summary.get("duplicates"), counts))
    blocks += _errors_blocks(folder)
    return _Section("Data", blocks)


def _count_lines(counts: dict[str, Any]) -> list[str]:
    subjects = counts.get("subjects_by_split")
    return [
        f"Images found: {counts.get('found', NOT_AVAILABLE)}; used: {counts.get('usable', NOT_AVAILABLE)}; "
        f"duplicates removed: {counts.get('duplicates_removed', NOT_AVAILABLE)}; "
        f"in errors.csv: {counts.get('errors', NOT_AVAILABLE)}",
        "Subjects per split: "
        + (", ".join(f"{k} {v}" for k, v in subjects.items()) if isinstance(subjects, dict) else NOT_AVAILABLE),
    ]


def _augmented_block(counts: dict[str, Any], manifest: pd.DataFrame | None) -> _Block:
    augmented = counts.get("augmented_copies_by_class")
    if isinstance(augmented, dict):
        text = ", ".join(f"{label} {n}" for label, n in sorted(augmented.items())) or "none"
        return _p(f"Augmented copies (training split only, to balance the classes): {text}.")
    if manifest is not None and {"n_aug", "label"} <= set(manifest.columns):
        per = manifest.groupby("label")["n_aug"].sum()
        return _p(
            "Augmented copies planned (manifest.parquet): " + ", ".join(f"{k} {int(v)}" for k, v in per.items()) + "."
        )
    return _p(f"Augmented copies: {NOT_AVAILABLE}.")


def _duplicates_block(duplicates: Any, counts: dict[str, Any]) -> _Block:
    if not isinstance(duplicates, list):
        return _p(f"Duplicates: {NOT_AVAILABLE}.")
    if not duplicates:
        return _p("Byte-identical duplicates removed: none.")
    rows = [
        [str(d.get("path", "")), str(d.get("duplicate_of", ""))] for d in duplicates[:FIRST_ROWS] if isinstance(d, dict)
    ]
    return _table(
        _Table(
            ["path (removed)", "duplicate of (kept)"],
            rows,
            f"Byte-identical duplicates removed: {counts.get('duplicates_removed', len(duplicates))}",
            f"First {len(rows)} shown." if len(duplicates) > FIRST_ROWS else "",
        )
    )


def _errors_blocks(folder: _RunFolder) -> list[_Block]:
    errors = folder.csv("errors.csv")
    if errors is None:
        return [_p(f"Errors: {folder.why('errors.csv')}.")]
    if errors.empty:
        return [_p("Errors: none (errors.csv is empty).")]
    errors = errors.reindex(columns=["path", "stage", "reason"]).fillna("")
    per = errors.groupby(["stage", "reason"]).size().sort_values(ascending=False)
    rows = [[str(stage), str(reason), str(int(n))] for (stage, reason), n in per.items()]
    note = (
        f"The {REASON_ROWS_SHOWN} most frequent of {len(rows)} reasons shown." if len(rows) > REASON_ROWS_SHOWN else ""
    )
    first = [[str(v) for v in row] for row in errors.head(FIRST_ROWS).itertuples(index=False)]
    return [
        _table(
            _Table(
                ["stage", "reason", "images"],
                rows[:REASON_ROWS_SHOWN],
                f"Errors by stage and reason ({len(errors)} images)",
                note,
            )
        ),
        _table(_Table(["path", "stage", "reason"], first, f"errors.csv, first {len(first)} rows")),
    ]


def _leaderboard_table(board: pd.DataFrame | None, title: str, why: str) -> _Table:
    if board is None:
        return _Table(LEADERBOARD_COLUMNS, [], title, why)
    shown = board.reindex(columns=LEADERBOARD_COLUMNS)
    rows = []
    for row in shown.itertuples(index=False):
        values = dict(zip(LEADERBOARD_COLUMNS, row))
        rows.append(
            [
                str(values["Model"]),
                *(num(values[c]) for c in METRIC_COLUMNS),
                num(values["Time Taken"], 2),
                "-" if pd.isna(values["status"]) else str(values["status"]),
            ]
        )
    return _Table(
        LEADERBOARD_COLUMNS,
        rows,
        title,
        "Test split; ROC AUC from predicted scores; Time Taken in seconds (fit + predict).",
    )


def _leaderboards_section(
    trunk: pd.DataFrame | None, custom: pd.DataFrame | None, folder: _RunFolder, summary: dict[str, Any]
) -> _Section:
    sets = summary.get("feature_sets") or [{}]
    first = sets[0].get("title", "ResNet50 trunk features (the paper's Table III)")
    tables = [
        _leaderboard_table(
            trunk, f"Table III: classifiers on {first} (leaderboard.csv)", folder.why("leaderboard.csv")
        ),
        _leaderboard_table(
            custom,
            "Table IV: classifiers on custom-model features (custom_leaderboard.csv)",
            f"{folder.why('custom_leaderboard.csv')}: the custom model was not trained in this run.",
        ),
    ]
    return _Section("Classifier sweeps (the paper's Tables III and IV)", [_Block("tables", tables=tables)])


def _feature_sets_section(summary: dict[str, Any], folder: _RunFolder) -> _Section | None:
    """The sweeps on the other feature sets of `extract.features` (e.g. the hand-crafted
    cell features), one table each; None when the run swept only one set."""
    extra = (summary.get("feature_sets") or [])[1:]
    if not extra:
        return None
    blocks = [
        _p(
            "The same sweep on the other feature sets of this run (extract.features); every set's best model "
            "on validation was a candidate for the chosen model."
        )
    ]
    for entry in extra:
        title = f"Classifiers on {entry['title']} ({entry['file']})"
        blocks.append(_table(_leaderboard_table(folder.csv(entry["file"]), title, folder.why(entry["file"]))))
    return _Section("Classifier sweeps on other feature sets", blocks)


def _head_search_section(summary: dict[str, Any], folder: _RunFolder) -> _Section | None:
    """The head search (train.search_trials): what it searched and every trial
    (head_search.csv); None when the run had none."""
    search = (summary.get("custom_model") or {}).get("search")
    if not search:
        return None
    best, asha = search["best"], search["asha"]
    text = (
        f"{search['trials']} Ray Tune trials, each a Ray Train run of the head, Optuna's TPE drawing the learning "
        f"rate, dropout and weight decay; ASHA stopped {search['stopped_by_asha']} of them early on the validation "
        f"loss (first rung at epoch {asha['grace_epochs']}, reduction factor {asha['reduction_factor']}, at most "
        f"{asha['max_t']} epochs); {search['failed']} failed. The head is trial {best['trial']}'s epoch "
        f"{best['best_epoch']} (the best validation balanced accuracy, {num(search['best_val_balanced_accuracy'])}): "
        f"lr {best['lr']:.2e}, dropout {best['dropout']:.2f}, weight decay {best['weight_decay']:.1e}. "
        "The test split was not seen."
    )
    trials = folder.csv("head_search.csv")
    blocks = [_p(text)]
    if trials is not None:
        shown = trials.drop(columns=["trial_id", "detail"], errors="ignore")
        rows = [[_cell(v) for v in row] for row in shown.itertuples(index=False)]
        blocks.append(_table(_Table(list(shown.columns), rows, "Every trial of the head search (head_search.csv)")))
    return _Section("Search over the custom model's training settings", blocks)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if pd.isna(value) else f"{value:.4g}"
    return str(value)


def _history_section(history: pd.DataFrame | None, folder: _RunFolder, figures: dict[str, bytes]) -> _Section:
    section = _Section("Training of the custom model (the paper's Figures 4 and 5)", [])
    if history is None:
        section.blocks.append(_p(f"Training was not run: history.csv is {folder.why('history.csv')}."))
        return section
    missing = [c for c in HISTORY_COLUMNS if c not in history.columns]
    if history.empty or missing:
        section.blocks.append(
            _p(f"Training curves: {NOT_AVAILABLE} (history.csv is empty or lacks {', '.join(missing) or 'rows'}).")
        )
        return section
    figures["accuracy_per_epoch.png"] = _plot_history(
        history,
        [
            ("train_accuracy", "train accuracy", "C0", "-"),
            ("val_accuracy", "validation accuracy", "C1", "-"),
            ("train_balanced_accuracy", "train balanced accuracy", "C0", "--"),
            ("val_balanced_accuracy", "validation balanced accuracy", "C1", "--"),
        ],
        "Accuracy per epoch (Figure 4)",
        "accuracy",
        (0.0, 1.02),
    )
    figures["loss_per_epoch.png"] = _plot_history(
        history,
        [("train_loss", "train loss", "C0", "-"), ("val_loss", "validation loss", "C1", "-")],
        "Loss per epoch (Figure 5)",
        "loss",
        None,
    )
    last = history.iloc[-1]
    section.blocks += [
        _p(
            f"{len(history)} epochs. Last epoch: train accuracy {num(last['train_accuracy'])}, validation accuracy "
            f"{num(last['val_accuracy'])}, validation balanced accuracy {num(last['val_balanced_accuracy'])}, "
            f"validation loss {num(last['val_loss'])}."
        ),
        _figure(
            "accuracy_per_epoch.png", "Figure 4: train and validation accuracy per epoch; dashed: balanced accuracy."
        ),
        _figure("loss_per_epoch.png", "Figure 5: train and validation loss per epoch."),
    ]
    return section


def _top_section(
    trunk: pd.DataFrame | None, custom: pd.DataFrame | None, top_n: int, figures: dict[str, bytes]
) -> _Section:
    section = _Section(f"Top {top_n} classifiers: trunk vs custom-model features (the paper's Figure 6)", [])
    boards = {
        name: board
        for name, board in (("trunk features", trunk), ("custom-model features", custom))
        if board is not None
    }
    ranked: dict[str, float] = {}
    for board in boards.values():
        if not {"Model", "Accuracy", "Balanced Accuracy"} <= set(board.columns):
            continue
        for model, value in zip(board["Model"].astype(str), pd.to_numeric(board["Balanced Accuracy"], errors="coerce")):
            if not pd.isna(value):
                ranked[model] = max(ranked.get(model, -1.0), float(value))
    if not ranked:
        section.blocks.append(_p(f"Figure 6: {NOT_AVAILABLE} (no leaderboard with test metrics)."))
        return section
    models = sorted(ranked, key=lambda m: -ranked[m])[:top_n]
    figures["top_classifiers.png"] = _plot_top(models, boards)
    absent = (
        "" if custom is not None else " The custom model was not trained in this run, so only trunk features are shown."
    )
    section.blocks += [
        _p(
            f"The {len(models)} classifiers with the highest test balanced accuracy on either feature set; bars "
            f"show test accuracy and balanced accuracy.{absent}"
        ),
        _figure(
            "top_classifiers.png",
            "Figure 6: test accuracy (solid) and balanced accuracy (hatched) per classifier and feature set.",
        ),
    ]
    return section


def _tuned_lines(tuned: Any) -> list[str]:
    """The fine-tuning of the best classifier (the paper's step 6), when the run did one."""
    if not isinstance(tuned, dict) or tuned.get("params") is None:
        return []
    return [
        f"Fine-tuned candidate: {tuned.get('name')} on {tuned.get('feature_source')} features, "
        f"{tuned.get('ok_trials')}/{tuned.get('trials')} Ray Tune trials (tuning.csv); validation balanced accuracy "
        f"{num(tuned.get('val_balanced_accuracy'))} vs {num(tuned.get('untuned_val_balanced_accuracy'))} untuned; "
        f"settings {json.dumps(tuned.get('params'), sort_keys=True)}"
    ]


def _choice_lines(choice: Any, ci: Any) -> list[str]:
    """Grouped-CV balanced accuracy of the best single, tuned and ensemble candidates, and the
    chosen model's subject-bootstrap test intervals, as summary.json records them."""
    lines = []
    if isinstance(choice, dict):
        kinds = {"ensemble": "soft voting", "stacking": "stacked"}
        parts = [
            f"{kinds.get(kind, kind.replace('_', ' '))} {c['name']} "
            f"{num(c['cv_balanced_accuracy'])} ± {num(c['cv_sd'])}"
            for kind, c in choice.items()
            if isinstance(c, dict)
        ]
        if parts:
            lines.append("Subject-grouped CV balanced accuracy on train+val: " + "; ".join(parts))
    if isinstance(ci, dict):
        shown = [
            f"{metric} [{num(ci[metric][0])}, {num(ci[metric][1])}]"
            for metric in ("Balanced Accuracy", "ROC AUC")
            if ci.get(metric)
        ]
        if shown:
            lines.append(
                f"Test 95% intervals (bootstrap over {ci.get('subjects')} subjects, "
                f"{ci.get('resamples')} resamples): " + ", ".join(shown)
            )
    return lines


def _threshold_lines(threshold: Any, test: Any, test_argmax: Any) -> list[str]:
    """The decision threshold on P(ALL) the bundle carries (summary.json's
    `chosen_model.decision_threshold`), what it gave on the out-of-fold predictions it was
    chosen on, and the test balanced accuracy at it and at the most probable class."""
    if not isinstance(threshold, dict):
        return []
    line = (
        f"Decision threshold on P(ALL): {num(threshold.get('value'), 3)} "
        f"({threshold.get('rule')}; {threshold.get('chosen_on')})"
    )
    oof, half = threshold.get("oof"), threshold.get("oof_at_0.5")
    if isinstance(oof, dict) and isinstance(half, dict):
        line += (
            f"; out-of-fold balanced accuracy {num(oof.get('balanced_accuracy'))} (sensitivity "
            f"{num(oof.get('sensitivity'))}, specificity {num(oof.get('specificity'))}) vs "
            f"{num(half.get('balanced_accuracy'))} at 0.5, {num(threshold.get('crossfit_cv_balanced_accuracy'))} "
            "with the threshold chosen on the other folds"
        )
    if isinstance(test, dict) and isinstance(test_argmax, dict):
        line += (
            f"; test balanced accuracy {num(test.get('Balanced Accuracy'))} at it, "
            f"{num(test_argmax.get('Balanced Accuracy'))} at the most probable class"
        )
    return [line]


def _chosen_section(
    summary: dict[str, Any], folder: _RunFolder, n_boot: int, seed: int, figures: dict[str, bytes]
) -> tuple[_Section, str]:
    """The section on the chosen model, and one sentence for the conclusions."""
    chosen = _chosen_model(summary)
    section = _Section("The chosen model on the test split", [])
    conclusion = _chosen_facts(summary, chosen, section)
    recorded = chosen.get("test") if chosen and isinstance(chosen.get("test"), dict) else {}
    predictions = _test_predictions(folder.parquet("predictions.parquet"))
    if predictions is None or not {"label", "predicted_label"} <= set(predictions.columns) or predictions.empty:
        return section, conclusion + _without_predictions(folder, predictions, recorded, section)

    cells = _Cells.of(predictions, str(summary.get("positive_label", "all")))
    computed, (point, low, high, used) = _test_metrics(cells, n_boot, seed)
    rows = [[m, num(recorded.get(m)) if recorded else NOT_AVAILABLE, num(computed[m])] for m in METRIC_COLUMNS]
    section.blocks += [
        _table(
            _Table(
                ["metric", "recorded in summary.json", "from predictions.parquet"],
                rows,
                f"Test metrics ({len(cells.y_true)} cells)",
            )
        ),
        _bootstrap_paragraph(point, low, high, used, len(set(cells.subjects)), n_boot, seed),
    ]
    section.blocks += _confusion_and_roc(cells, computed["ROC AUC"], figures)
    return (
        section,
        conclusion
        + f" Test balanced accuracy {num(point)} ({_ci_text(low, high, used)}, subject bootstrap, {used} resamples).",
    )


def _chosen_facts(summary: dict[str, Any], chosen: dict[str, Any] | None, section: _Section) -> str:
    """Adds what the run records about the chosen model to `section`; returns the conclusion's start."""
    if chosen is None:
        section.blocks.append(_p(f"Chosen model: {NOT_AVAILABLE} (summary.json records none)."))
        return f"Chosen model: {NOT_AVAILABLE}."
    section.blocks.append(
        _items(
            [
                f"Model: {chosen.get('name', NOT_AVAILABLE)}",
                "Features: "
                f"{chosen.get('feature_source') or ('trunk' if 'chosen_model' not in summary else NOT_AVAILABLE)}",
                f"Chosen by: {chosen.get('chosen_by', NOT_AVAILABLE)}",
                *_tuned_lines(summary.get("tuned_model")),
                *_choice_lines(summary.get("model_choice"), chosen.get("test_ci95")),
                *_threshold_lines(chosen.get("decision_threshold"), chosen.get("test"), chosen.get("test_argmax")),
            ]
        )
    )
    return f"Chosen model: {chosen.get('name', NOT_AVAILABLE)}, chosen by {chosen.get('chosen_by', NOT_AVAILABLE)}."


def _test_predictions(predictions: pd.DataFrame | None) -> pd.DataFrame | None:
    if predictions is not None and "split" in predictions.columns:
        return predictions[predictions["split"] == "test"]
    return predictions


def _without_predictions(
    folder: _RunFolder, predictions: pd.DataFrame | None, recorded: dict[str, Any], section: _Section
) -> str:
    """Adds the recorded test metrics to `section`; returns the conclusion's addition (may be "")."""
    why = (
        folder.why("predictions.parquet")
        if predictions is None
        else f"{NOT_AVAILABLE} (predictions.parquet is empty or lacks label/predicted_label)"
    )
    rows = [[m, num(recorded.get(m)), NOT_AVAILABLE] for m in METRIC_COLUMNS]
    section.blocks.append(
        _table(_Table(["metric", "recorded in summary.json", "from predictions.parquet"], rows, "Test metrics"))
    )
    section.blocks.append(_p(f"Confusion matrix, ROC curve and bootstrap interval: {why}."))
    if not recorded:
        return ""
    return (
        f" Test balanced accuracy {num(recorded.get('Balanced Accuracy'))} "
        "(no confidence interval: predictions not available)."
    )


@dataclass
class _Cells:
    """The chosen model's test predictions, one entry per cell."""

    y_true: Any
    y_pred: Any
    subjects: Any  # the bootstrap's clusters
    classes: list[str]  # the positive label last
    positive: str
    score_column: str | None
    scores: Any  # of the positive label, or None

    @classmethod
    def of(cls, predictions: pd.DataFrame, positive: str) -> _Cells:
        y_true = predictions["label"].astype(str).to_numpy()
        y_pred = predictions["predicted_label"].astype(str).to_numpy()
        # Cells without a subject ID are their own cluster, as in the split (dataset.assign_groups).
        cell_ids = "cell:" + pd.Series(range(len(predictions)), index=predictions.index).astype(str)
        subject = (
            predictions["subject"].fillna("").astype(str)
            if "subject" in predictions.columns
            else pd.Series("", index=predictions.index)
        )
        classes = sorted(set(y_true) | set(y_pred))
        if positive in classes:
            classes = [c for c in classes if c != positive] + [positive]
        score_column = next((c for c in (f"prob_{positive}", "prob_all") if c in predictions.columns), None)
        scores = pd.to_numeric(predictions[score_column], errors="coerce").to_numpy() if score_column else None
        subjects = subject.where(subject != "", cell_ids).to_numpy()
        return cls(y_true, y_pred, subjects, classes, positive, score_column, scores)

    @property
    def has_roc(self) -> bool:
        """Two true classes, one of them the positive label, and a score for every cell."""
        binary = len(set(self.y_true)) == 2 and self.positive in set(self.y_true)
        return self.scores is not None and binary and not pd.isna(self.scores).any()


def _test_metrics(cells: _Cells, n_boot: int, seed: int) -> tuple[dict[str, float], tuple[float, float, float, int]]:
    """The test metrics from the predictions, and the subject bootstrap of balanced accuracy."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    auc = float(roc_auc_score(cells.y_true == cells.positive, cells.scores)) if cells.has_roc else math.nan
    bootstrap = subject_bootstrap_ci(cells.y_true, cells.y_pred, cells.subjects, n_boot=n_boot, seed=seed)
    computed = {
        "Accuracy": float(accuracy_score(cells.y_true, cells.y_pred)),
        "Balanced Accuracy": bootstrap[0],
        "ROC AUC": auc,
        "F1 Score": float(f1_score(cells.y_true, cells.y_pred, average="weighted", zero_division=0)),
    }
    return computed, bootstrap


def _ci_text(low: float, high: float, used: int) -> str:
    return f"95% confidence interval {num(low)} to {num(high)}" if used else f"95% confidence interval {NOT_AVAILABLE}"


def _bootstrap_paragraph(
    point: float, low: float, high: float, used: int, n_subjects: int, n_boot: int, seed: int
) -> _Block:
    return _p(
        f"Balanced accuracy {num(point)}, {_ci_text(low, high, used)}, "
        f"from a bootstrap that resamples the {n_subjects} test "
        f"subject(s) with replacement and takes all their cells ({used} of {n_boot} resamples used; resamples "
        f"missing a class are skipped; seed {seed}). Resampling subjects rather than cells reflects that cells of "
        "one patient are not independent."
        + (
            f" With only {n_subjects} test subjects the interval itself is very uncertain."
            if n_subjects < SMALL_TEST_SUBJECTS
            else ""
        )
    )


def _confusion_and_roc(cells: _Cells, auc: float, figures: dict[str, bytes]) -> list[_Block]:
    classes, positive = cells.classes, cells.positive
    figures["confusion_matrix.png"] = _plot_confusion(cells.y_true, cells.y_pred, classes)
    counts = pd.crosstab(pd.Series(cells.y_true, name="true"), pd.Series(cells.y_pred, name="predicted")).reindex(
        index=classes, columns=classes, fill_value=0
    )
    rows = [[label, *(str(int(v)) for v in counts.loc[label])] for label in classes]
    blocks = [
        _table(_Table(["true \\ predicted", *classes], rows, "Confusion matrix (test split)")),
        _figure("confusion_matrix.png", "Confusion matrix of the chosen model on the test split."),
    ]
    if cells.has_roc:
        figures["roc_curve.png"] = _plot_roc(cells.y_true == positive, cells.scores, auc, positive)
        blocks.append(
            _figure(
                "roc_curve.png",
                f"ROC curve of the chosen model on the test split ({positive} positive; from {cells.score_column}).",
            )
        )
    else:
        reason = (
            "no probability column"
            if cells.scores is None
            else "the test split lacks one of two classes, or scores are missing"
        )
        blocks.append(_p(f"ROC curve: {NOT_AVAILABLE} ({reason})."))
    return blocks


def _inference_section(summary: dict[str, Any]) -> _Section:
    section = _Section("Inference time per image", [])
    timing = summary.get("inference_seconds_per_image")
    if not isinstance(timing, dict) or not timing:
        section.blocks.append(
            _p(f"Inference time per image: {NOT_AVAILABLE} (summary.json has no inference_seconds_per_image).")
        )
        return section
    rows, total = [], 0.0
    for stage in [*INFERENCE_STAGES, *(s for s in timing if s not in INFERENCE_STAGES)]:
        try:
            seconds = float(timing.get(stage))
        except (TypeError, ValueError):
            seconds = math.nan
        if math.isnan(seconds) or seconds <= 0:
            rows.append([stage, INFERENCE_STAGES.get(stage, stage), NOT_AVAILABLE, NOT_AVAILABLE])
            continue
        total += seconds
        rows.append([stage, INFERENCE_STAGES.get(stage, stage), f"{seconds * 1e3:.3f}", f"{1 / seconds:,.1f}"])
    if total > 0:
        rows.append(["total", "sum of the stages measured", f"{total * 1e3:.3f}", f"{1 / total:,.1f}"])
    section.blocks.append(
        _table(_Table(["stage", "what", "ms / image", "images / s"], rows, "Seconds per image by stage (summary.json)"))
    )
    return section


# -- figures (matplotlib's object API on the Agg canvas: no pyplot state, no display) -------


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _plot_history(
    history: pd.DataFrame, series: list[tuple[str, str, str, str]], title: str, ylabel: str, ylim: Any
) -> bytes:
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(7, 4.2)
    axes = figure.subplots()
    for column, label, color, style in series:
        axes.plot(
            history["epoch"],
            pd.to_numeric(history[column], errors="coerce"),
            style,
            color=color,
            marker="o",
            markersize=3,
            label=label,
        )
    axes.set(title=title, xlabel="epoch", ylabel=ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylim:
        axes.set_ylim(*ylim)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    return _png(figure)


def _plot_top(models: list[str], boards: dict[str, pd.DataFrame]) -> bytes:
    import numpy as np

    figure = _new_figure(8, 1.6 + 0.3 * len(models) * len(boards))
    axes = figure.subplots()
    bars = [(source, metric) for source in boards for metric in ("Accuracy", "Balanced Accuracy")]
    height = 0.84 / len(bars)
    positions = np.arange(len(models))
    for i, (source, metric) in enumerate(bars):
        board = boards[source].drop_duplicates("Model")
        by_model = dict(zip(board["Model"].astype(str), pd.to_numeric(board[metric], errors="coerce")))
        values = np.array([by_model.get(m, np.nan) for m in models], dtype=float)
        offsets = positions - 0.42 + height * (i + 0.5)
        axes.barh(
            offsets,
            np.nan_to_num(values, nan=0.0),
            height=height,
            color="C0" if source.startswith("trunk") else "C1",
            alpha=1.0 if metric == "Accuracy" else 0.55,
            hatch=None if metric == "Accuracy" else "//",
            edgecolor="white",
            label=f"{metric}, {source}",
        )
        table = "Table III" if source.startswith("trunk") else "Table IV"
        for y, value in zip(offsets, values):
            if not np.isnan(value):
                axes.text(value + 0.005, y, f"{value:.3f}", va="center", fontsize=6.5, color="#444")
            elif metric == "Accuracy":
                axes.text(0.005, y + height / 2, f"not in {table}", va="center", fontsize=6.5, color="#444")
    axes.set_yticks(positions, models, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1.08)
    axes.set_xlabel("test score")
    axes.set_title("Top classifiers: trunk vs custom-model features (Figure 6)")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    return _png(figure)


def _plot_confusion(y_true: Any, y_pred: Any, classes: list[str]) -> bytes:
    import numpy as np
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(y_true, y_pred, labels=classes)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure = _new_figure(4.8, 4.2)
    axes = figure.subplots()
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            axes.text(
                j,
                i,
                f"{matrix[i, j]}\n({rates[i, j]:.0%})",
                ha="center",
                va="center",
                color="white" if rates[i, j] > 0.5 else "black",
            )
    axes.set_xticks(range(len(classes)), classes)
    axes.set_yticks(range(len(classes)), classes)
    axes.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test split)")
    figure.colorbar(image, ax=axes, label="fraction of true class")
    return _png(figure)


def _plot_roc(is_positive: Any, scores: Any, auc: float, positive: str) -> bytes:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(is_positive, scores)
    figure = _new_figure(4.8, 4.4)
    axes = figure.subplots()
    axes.plot(fpr, tpr, color="C0", label=f"chosen model (AUC = {auc:.3f})")
    axes.plot([0, 1], [0, 1], ":", color="grey", label="chance (AUC = 0.5)")
    axes.set(
        xlabel="false positive rate",
        ylabel=f"true positive rate ({positive})",
        title="ROC curve (test split)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axes.set_aspect("equal")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    return _png(figure)


# -- rendering: report.md in Python, report.html through the Jinja2 template --------------


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(table: _Table) -> list[str]:
    lines = [f"**{table.title}**", ""] if table.title else []
    if table.rows:
        lines += [
            "| " + " | ".join(_md_cell(c) for c in table.columns) + " |",
            "|" + "|".join("---" for _ in table.columns) + "|",
            *("| " + " | ".join(_md_cell(v) for v in row) + " |" for row in table.rows),
            "",
        ]
    if table.note:
        lines += [f"_{table.note}_", ""]
    return lines


def _md_block(block: _Block) -> list[str]:
    if block.kind == "p":
        return [block.text, ""]
    if block.kind == "warning":
        return [f"> **WARNING: {block.text}**", ""]
    if block.kind == "items":
        return [*(f"- {item}" for item in block.items), ""]
    if block.kind in ("table", "tables"):
        return [line for table in block.tables for line in _md_table(table)]
    if block.kind == "figure":
        return [f"![{block.text}](figures/{block.figure})", "", f"_{block.text}_", ""]
    raise ValueError(f"unknown block kind {block.kind!r}")


def _to_markdown(sections: list[_Section]) -> str:
    lines = [f"# {REPORT_HEADING}", ""]
    for section in sections:
        if section.title:
            lines += [f"## {section.title}", ""]
        for block in section.blocks:
            lines += _md_block(block)
    return "\n".join(lines).rstrip() + "\n"


def _html_escape(value: Any) -> Any:
    """The template's finalize: escapes every {{ value }} as html.escape does (quotes too).

    Autoescape is on as well; markup the template itself made (a macro's output) passes through.
    """
    from markupsafe import Markup

    return value if isinstance(value, Markup) else Markup(html.escape(str(value)))


@functools.lru_cache(maxsize=1)
def templates() -> Any:
    """The Jinja2 environment over leukray/report/templates (works for an installed package too)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("leukray", "report/templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        finalize=_html_escape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _table_data(table: _Table, scroll: bool) -> dict[str, Any]:
    # Long tables (subjects, errors) scroll inside the page rather than lengthen it.
    return {
        "title": table.title,
        "columns": list(table.columns),
        "rows": [list(row) for row in table.rows],
        "note": table.note,
        "scroll": scroll and len(table.rows) > SCROLL_ROWS,
    }


def _block_data(block: _Block, figures: dict[str, bytes]) -> dict[str, Any]:
    """One block as plain data for the template; a figure carries its PNG as base64."""
    data: dict[str, Any] = {
        "kind": block.kind,
        "text": block.text,
        "items": list(block.items),
        "tables": [_table_data(table, scroll=block.kind == "table") for table in block.tables],
    }
    if block.kind == "figure":
        data["figure"] = {
            "name": block.figure,
            "caption": block.text,
            "base64": base64.b64encode(figures[block.figure]).decode("ascii"),
        }
    return data


def _to_html(sections: list[_Section], figures: dict[str, bytes], title: str) -> str:
    return (
        templates()
        .get_template(HTML_TEMPLATE)
        .render(
            title=title,
            heading=REPORT_HEADING,
            sections=[{"title": s.title, "blocks": [_block_data(b, figures) for b in s.blocks]} for s in sections],
        )
    )


def write_report(run_dir: str, top_n: int = 10, n_boot: int = 2000, seed: int = 0) -> dict[str, str]:
    """Write RUN/report.md, RUN/report.html (self-contained) and RUN/figures/*.png.

    Reads what the run folder holds: summary.json, manifest.parquet, errors.csv,
    leaderboard.csv (the paper's Table III), custom_leaderboard.csv (Table IV), history.csv
    (Figures 4 and 5) and predictions.parquet (the chosen model on the test split). Any of
    them may be missing; the report then says "not available" for that part.

    Args:
        run_dir: the run folder (local path or filesystem URI such as s3://…: its files are
            read from there, the report is rendered in this process and written back).
        top_n: classifiers shown in the trunk-vs-custom comparison (the paper's Figure 6).
        n_boot: resamples of the subject-level bootstrap of balanced accuracy.
        seed: seed of that bootstrap.

    Returns:
        What was written, by name relative to the run folder ("report.md", "report.html",
        "figures/roc_curve.png", ...), mapped to its full path.
    """
    figures: dict[str, bytes] = {}
    sections = _report_sections(_RunFolder(run_dir), top_n, n_boot, seed, figures)
    written: dict[str, str] = {}
    for name, png in figures.items():
        path = storage.join(run_dir, "figures", name)
        storage.write_bytes(path, png)
        written[f"figures/{name}"] = path
    for name, text in (
        ("report.md", _to_markdown(sections)),
        ("report.html", _to_html(sections, figures, f"leukray report: {run_dir}")),
    ):
        path = storage.join(run_dir, name)
        storage.write_text(path, text)
        written[name] = path
    return written


def _report_sections(
    folder: _RunFolder, top_n: int, n_boot: int, seed: int, figures: dict[str, bytes]
) -> list[_Section]:
    """The whole report as data; the figures it shows are added to `figures` by file name."""
    summary = folder.json("summary.json") or {}
    manifest = folder.parquet("manifest.parquet")
    trunk = folder.csv("leaderboard.csv")
    custom = folder.csv("custom_leaderboard.csv")
    history = folder.csv("history.csv")
    sections = [
        _header(summary, folder, manifest),
        _data_section(summary, folder, manifest),
        _leaderboards_section(trunk, custom, folder, summary),
        *filter(None, [_feature_sets_section(summary, folder)]),
        *filter(None, [_head_search_section(summary, folder)]),
        _history_section(history, folder, figures),
        _top_section(trunk, custom, top_n, figures),
    ]
    chosen, chosen_sentence = _chosen_section(summary, folder, n_boot, seed, figures)
    split_sentence, _ = _split_statement(summary, manifest)
    weights = summary.get("weights") if isinstance(summary.get("weights"), dict) else {}
    conclusions = [split_sentence, chosen_sentence]
    if weights.get("is_pretrained") is False:
        conclusions.append("The trunk was randomly initialised: these are not ImageNet-feature results.")
    return [*sections, chosen, _inference_section(summary), _Section("Conclusions", [_items(conclusions)])]
