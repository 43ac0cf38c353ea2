"""`leukray tune`, the last stage of `run`: the classifier sweeps on the trunk features
(the paper's Table III) and, when the custom model was trained, on its embeddings (Table IV);
fine-tuning the best classifier (the paper's step 6); the model choice on validation;
predictions, the model bundle, summary.json and the report.

Each of those is a function of its own; `tune_stage` runs them in order on what the earlier
stages handed over (in memory within `run`, from the run folder for a separate job).

May import: `leukray.config`, `leukray.errors`, `leukray.io`, `leukray.data`, `leukray.ops`,
`leukray.models`, `leukray.distributed`, `leukray.report`, `leukray.stages.extract`,
`leukray.stages.train`, `leukray.stages.trunktrain`.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from leukray import __version__
from leukray.config import CELL_FAMILIES, AugmentConfig, RunConfig, parse_threshold_rule
from leukray.data.splits import TEST, TRAIN, VAL
from leukray.distributed.resources import cluster_cpus, cluster_gpus
from leukray.distributed.tuning import run_cv_tune, run_search_tune, run_sweep_tune, tunable
from leukray.errors import DataError
from leukray.io import runfolder, storage
from leukray.io.tables import counts_by, log, write_csv, write_json, write_parquet
from leukray.models.bundle import MODEL_SOURCES, classifier_input, save_bundle, source_families
from leukray.models.classifiers import (
    STACKING,
    GroupedData,
    SweepData,
    best_row,
    build_model,
    choose_model,
    fold_scores,
    format_row,
    grouped_data,
    grouped_folds,
    has_probabilities,
    make_pipeline,
    positive_index,
    run_one,
    score_probabilities,
    score_split,
    select_classifiers,
    soft_voting,
    subject_bootstrap,
    subject_groups,
    sweep_data,
    threshold_labels,
    threshold_record,
)
from leukray.models.custom import build_custom_model, load_model_state
from leukray.models.trunk import FEATURE_DIM, TrunkExtractor, build_trunk, resolve_weights
from leukray.ops.cellfeatures import family_columns
from leukray.ops.preprocess import load_and_preprocess
from leukray.report.console import leaderboard_markdown
from leukray.stages.extract import Extracted
from leukray.stages.train import Trained
from leukray.stages.trunktrain import local_trunk_file

HEAD_MODEL = "CustomResNet50 head (sigmoid)"
METRICS = ["Accuracy", "Balanced Accuracy", "ROC AUC", "F1 Score"]


@dataclass
class Sweeps:
    """The sweeps' results: features and leaderboard per source (`trunk` for the ResNet50
    features alone, a feature set such as `morphology+colour+texture`, `custom`), the
    candidates for the model choice (source, leaderboard row) and what each table holds."""

    data: dict[str, SweepData]
    boards: dict[str, pd.DataFrame]
    candidates: list[tuple[str, pd.Series | None]]
    has_val: bool
    classes: list[str]
    tables: list[dict[str, Any]]  # per feature set: features, source, file, title, dim
    best: dict[str, pd.Series | None] = field(default_factory=dict)  # per source, before fine-tuning
    choice: pd.DataFrame | None = None  # model_choice.csv: the grouped CV of the candidates and the ensembles
    # (source, Model) -> (labels, out-of-fold probabilities, folds) over the CV's original rows
    oof: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass
class Chosen:
    """The model chosen on validation, fitted, with its test-split probabilities."""

    source: str  # trunk | custom | head
    name: str
    row: pd.Series
    params: dict[str, Any] | None
    classifier: Any  # the fitted pipeline; None for the head
    test_meta: pd.DataFrame
    test_probs: np.ndarray  # N x C
    chosen_by: str = "validation balanced accuracy"
    threshold: dict[str, Any] | None = None  # the decision threshold (`decision_threshold`); None: multi-class


def tune_stage(
    extracted: Extracted,
    trained: Trained | None,
    start_ray: Callable[[], None] | None = None,
    total_start: float | None = None,
    write_config: bool = True,
) -> dict[str, Any]:
    """Sweep, fine-tune, choose, bundle and report; returns summary.json's content."""
    t0 = time.perf_counter() if total_start is None else total_start
    cfg = extracted.cfg
    seconds: dict[str, float] = {**extracted.record["seconds"], **(trained.record["seconds"] if trained else {})}
    seconds.update(
        extracted.trunk_record["seconds"] if extracted.trunk_record else {}
    )  # the trunk trained on the cells
    names = select_classifiers(cfg.sweep.classifiers)
    if write_config:
        runfolder.write_config(cfg)
    if start_ray is not None:
        start_ray()
    sweeps = run_sweeps(extracted, trained, names, seconds)
    tuned = None
    if cfg.sweep.tune_trials > 0 and sweeps.has_val and cfg.sweep.cv_folds >= 2:
        tick = time.perf_counter()
        tuned = tune_best(extracted, trained, sweeps)
        seconds["tuning"] = time.perf_counter() - tick
        if tuned is not None and tuned["row"] is not None:
            sweeps.candidates.append((tuned["feature_source"], tuned["row"]))
    tick = time.perf_counter()
    choice, chosen_by = choose(extracted, trained, sweeps)
    seconds["model_choice"] = time.perf_counter() - tick
    chosen = fit_chosen(extracted, trained, sweeps, choice, chosen_by)
    chosen.threshold = decision_threshold(cfg, sweeps, choice)
    predictions = write_predictions(extracted, chosen, sweeps.classes)
    log(f"chosen model (by {chosen_by}): {chosen.name} on {chosen.source} features")
    write_model_bundle(extracted, trained, chosen, sweeps.classes)
    timing = measure_inference(chosen.test_meta["path"].tolist()[:32], extracted, trained, chosen)
    seconds["total" if total_start is not None else "tune_total"] = time.perf_counter() - t0
    summary = build_summary(extracted, trained, sweeps, tuned, chosen, predictions, len(names), timing, seconds)
    write_json(storage.join(cfg.out, "summary.json"), summary)
    _write_report(cfg.out)
    return summary


def describe_split(cfg: RunConfig, facts: dict[str, Any]) -> str:
    if cfg.split.mode == "image":
        return (
            f"image-level (the paper's protocol): {facts['leaking_subjects']} subject(s) have images on more than "
            "one side, so scores are optimistic for new patients"
        )
    base = f"subject-level, stratified (no subject on two sides); groups: {facts['group_source']}"
    if cfg.data.test_path:
        base += f"; test = the separate dataset {cfg.data.test_path}"
    return base


def _describe_data(cfg: RunConfig, fingerprint: str) -> str:
    test = f" + test {cfg.data.test_path}" if cfg.data.test_path else ""
    return f"{cfg.data.path}{test} (fingerprint {fingerprint[:12]})"


def source_name(families: tuple[str, ...]) -> str:
    """The model-choice source of a feature set: `trunk` for ResNet50 alone (as bundles of
    earlier versions call it), else the families joined with '+'."""
    return "trunk" if families == ("resnet50",) else "+".join(families)


def feature_matrix(extracted: Extracted, families: tuple[str, ...]) -> np.ndarray:
    """The N x D matrix of a feature set: the trunk's 2,048 features and/or the columns of
    the measured cell families it names, side by side."""
    parts = [extracted.matrix] if "resnet50" in families else []
    parts += [extracted.trained_matrix] if "trained" in families else []  # the trunk trained on the cells
    cell = tuple(f for f in families if f in CELL_FAMILIES)
    if cell:
        parts.append(extracted.cell_matrix[:, family_columns(extracted.cfg.extract.cell_families, cell)])
    return np.hstack(parts) if len(parts) > 1 else parts[0]


def _table_of(families: tuple[str, ...], first: bool, dim: int) -> dict[str, Any]:
    name = "+".join(families)
    title = (
        "ResNet50 trunk features (the paper's Table III)" if families == ("resnet50",) else f"{name} features, {dim}-d"
    )
    if families == ("trained",):
        title = f"features of the ResNet50 trained on the cells, {dim}-d"
    stem = "leaderboard" if first else "leaderboard-" + "-".join(families)
    return {
        "features": name,
        "source": source_name(families),
        "stem": stem,
        "file": f"{stem}.csv",
        "title": title,
        "dim": dim,
    }


def run_sweeps(extracted: Extracted, trained: Trained | None, names: list[str], seconds: dict[str, float]) -> Sweeps:
    """One sweep per feature set of `extract.features` (the first is leaderboard.csv, the
    paper's Table III when it is resnet50); with a trained custom model, Table IV on its
    embeddings and the head itself as a candidate."""
    cfg = extracted.cfg
    sweeps = None
    for k, families in enumerate(cfg.extract.feature_sets):
        data = sweep_data(extracted.meta, feature_matrix(extracted, families), cfg.data.positive_label)
        if sweeps is None:
            _check_two_classes(data)
            sweeps = Sweeps({}, {}, [], len(data.y_val) > 0, data.classes, [])
        table = _table_of(families, k == 0, data.X_train.shape[1])
        tick = time.perf_counter()
        board = sweep_and_write(
            data, names, extracted, stem=table["stem"], title=table["title"], features=table["features"]
        )
        seconds["sweep" if k == 0 else f"sweep_{table['features']}"] = time.perf_counter() - tick
        _add_sweep(sweeps, table["source"], data, board, cfg.sweep.seed)
        sweeps.tables.append(table)
    if trained is None:
        return sweeps
    custom_data = sweep_data(trained.meta, trained.matrix, cfg.data.positive_label)
    tick = time.perf_counter()
    embedding = trained.record["custom_model"]["embedding"]
    title = f"custom-model features, {embedding}-d (the paper's Table IV)"
    custom_board = sweep_and_write(
        custom_data, names, extracted, stem="custom_leaderboard", title=title, features="custom"
    )
    seconds["sweep_custom"] = time.perf_counter() - tick
    _add_sweep(sweeps, "custom", custom_data, custom_board, cfg.sweep.seed)
    sweeps.candidates.append(("head", _head_row(trained, sweeps.classes)))
    return sweeps


def _check_two_classes(data: SweepData) -> None:
    for split_name, y in ((TRAIN, data.y_train), (TEST, data.y_test)):
        if len(np.unique(y)) < 2:
            single = [data.classes[c] for c in set(y)]
            raise DataError(
                f"after preprocessing, the {split_name} split holds a single class ({single}); see errors.csv"
            )


def _add_sweep(sweeps: Sweeps, source: str, data: SweepData, board: pd.DataFrame, seed: int) -> None:
    sweeps.data[source], sweeps.boards[source] = data, board
    sweeps.best[source] = best_row(board, sweeps.has_val, seed=seed)
    sweeps.candidates.append((source, sweeps.best[source]))


def _head_row(trained: Trained, classes: list[str]) -> pd.Series:
    """The custom model's own sigmoid as a candidate, scored on validation."""
    head_val = trained.head_probs[trained.head_probs["split"] == VAL]
    code = {name: i for i, name in enumerate(classes)}
    probs = np.stack(head_val["head_prob"].to_numpy()) if len(head_val) else np.zeros((0, len(classes)))
    metrics = score_probabilities(head_val["label"].map(code).to_numpy(), probs)
    row = pd.Series({"Model": HEAD_MODEL, **metrics, "status": "ok"})
    row["Val Balanced Accuracy"] = row["Balanced Accuracy"]
    return row


def sweep_and_write(
    data: SweepData, names: list[str], extracted: Extracted, *, stem: str, title: str, features: str
) -> pd.DataFrame:
    """Run one Tune sweep and write RUN/<stem>.csv and .md."""
    cfg = extracted.cfg
    log(
        f"sweeping {len(names)} classifiers on {title} "
        f"(one Ray Tune trial each; limit {cfg.sweep.timeout_s:g}s per classifier)"
    )
    board = run_sweep_tune(
        data,
        names,
        seed=cfg.sweep.seed,
        timeout_s=cfg.sweep.timeout_s,
        cpus_per_trial=cfg.sweep.cpus_per_trial,
        storage_path=runfolder.tune_store(cfg.out),
        name=stem,
        on_result=lambda row: print(format_row(row), flush=True),
    )
    weights = extracted.weights
    board["weights"] = weights.name
    board["features"] = features
    write_csv(storage.join(cfg.out, f"{stem}.csv"), board)
    data_desc = _describe_data(cfg, extracted.record["fingerprint"])
    split_desc = describe_split(cfg, extracted.record["facts"])
    shown = board.drop(columns=["weights", "node_id", "features"])
    storage.write_text(
        storage.join(cfg.out, f"{stem}.md"), leaderboard_markdown(shown, weights, data_desc, split_desc, title)
    )
    return board


def tune_best(extracted: Extracted, trained: Trained | None, sweeps: Sweeps) -> dict[str, Any] | None:
    """Search the hyperparameters of the sweeps' best classifiers (the paper's step 6): the
    `sweep.tune_top` best on validation that have a search space, across the feature sets,
    get `sweep.tune_trials` Ray Tune trials in all, drawn by Optuna and each scored by
    subject-grouped CV over train+val (`distributed.tuning.run_search_tune`). Writes
    RUN/tuning.csv (every trial); returns what summary.json records (`row` is the best
    setting as a model candidate, with its validation and test scores for the record only,
    or None when every trial failed)."""
    cfg = extracted.cfg
    ranked = [
        (src, row) for src, row in _pool_rows(sweeps)
        if row["status"] == "ok" and tunable(row["Model"]) and pd.notna(row["Val Balanced Accuracy"])
        and has_probabilities(row["Model"], cfg.sweep.seed)
    ]  # fmt: skip
    ranked.sort(key=lambda sr: (-sr[1]["Val Balanced Accuracy"], sr[0], sr[1]["Model"]))
    picks = ranked[: cfg.sweep.tune_top]
    data = {src: _grouped(extracted, trained, src, sweeps.classes) for src in {s for s, _ in picks}}
    if not picks or min(grouped_folds(d, cfg.sweep.cv_folds) for d in data.values()) < 2:
        log("hyperparameter search skipped: no tunable classifier succeeded, or too few subjects per class")
        return None
    candidates = [{"source": s, "Model": r["Model"], "block": _trunk_block(s)} for s, r in picks]
    log(
        f"hyperparameter search: {cfg.sweep.tune_trials} Ray Tune trials (Optuna TPE) over "
        f"{', '.join(c['Model'] + ' on ' + c['source'] for c in candidates)}; "
        f"each scored by subject-grouped {cfg.sweep.cv_folds}-fold CV on train+val"
    )
    trials = run_search_tune(
        candidates, data, cfg.sweep.tune_trials, seed=cfg.sweep.seed, folds=cfg.sweep.cv_folds,
        timeout_s=cfg.sweep.timeout_s, cpus_per_trial=cfg.sweep.cpus_per_trial,
        storage_path=runfolder.tune_store(cfg.out), on_result=lambda r: print(_format_cv(r), flush=True),
    )  # fmt: skip
    write_csv(storage.join(cfg.out, "tuning.csv"), trials.rename(columns={"source": "feature_source"}))
    best = trials.iloc[0]
    ok = best["status"] == "ok"
    untuned = next((r for s, r in picks if ok and (s, r["Model"]) == (best["source"], best["Model"])), picks[0][1])
    record = run_one(best["Model"], sweeps.data[best["source"]], cfg.sweep.seed, cfg.sweep.timeout_s,
                     params=json.loads(best["params"])) if ok else None  # fmt: skip
    row = None
    if record is not None and record["status"] == "ok":
        row = pd.Series({**record, "Model": f"{best['Model']} (tuned)", "base_model": best["Model"]})
        row["params"], row["tune CV Balanced Accuracy"] = best["params"], best["CV Balanced Accuracy"]
    return {
        "name": best["Model"] if ok else picks[0][1]["Model"],
        "feature_source": best["source"] if ok else picks[0][0],
        "search": "Optuna TPE through Ray Tune, scored by subject-grouped CV on train+val",
        "searched": [f"{c['Model']} on {c['source']}" for c in candidates],
        "trials": int(len(trials)),
        "ok_trials": int((trials["status"] == "ok").sum()),
        "params": json.loads(best["params"]) if ok else None,
        "cv_balanced_accuracy": best["CV Balanced Accuracy"] if ok else None,
        "cv_sd": best["CV sd"] if ok else None,
        "val_balanced_accuracy": row["Val Balanced Accuracy"] if row is not None else None,
        "untuned_val_balanced_accuracy": untuned["Val Balanced Accuracy"],
        "test": {k: row[k] for k in METRICS} if row is not None else None,
        "row": row,
    }


def _trunk_block(source: str) -> int:
    """How many leading columns of a source's features are the trunk's (what a search may
    reduce with PCA or a filter); 0 without trunk features."""
    trunk = source not in MODEL_SOURCES and {"resnet50", "trained"} & set(source_families(source))
    return FEATURE_DIM if trunk else 0


def choose(extracted: Extracted, trained: Trained | None, sweeps: Sweeps) -> tuple[tuple[str, pd.Series], str]:
    """The model to keep, and how it was chosen: by subject-grouped cross-validation over the
    training and validation subjects among the best `sweep.cv_top` candidates on validation
    and the tuned one, plus a soft-voting and a stacked ensemble of the best
    `sweep.ensemble_size` of them (RUN/model_choice.csv; an ensemble is chosen only if
    strictly better than every single model); or, with `sweep.cv_folds` 0 or too few
    subjects, by validation balanced accuracy alone. The test split is never used. The
    candidates' out-of-fold probabilities are kept in `sweeps.oof` (for the threshold)."""
    cfg = extracted.cfg
    by_val = choose_model(sweeps.candidates)
    if by_val is None:
        raise DataError("no classifier produced probabilities on this data; see leaderboard.csv")
    pool = _cv_pool(sweeps, cfg.sweep.cv_top, cfg.sweep.seed) if cfg.sweep.cv_folds and sweeps.has_val else []
    if not pool:
        return by_val, "validation balanced accuracy"
    data = {src: _grouped(extracted, trained, src, sweeps.classes) for src in {c["source"] for c in pool}}
    folds = min(grouped_folds(d, cfg.sweep.cv_folds) for d in data.values())
    if folds < 2:
        log("model choice: too few subjects per class for grouped cross-validation; chosen on validation")
        return by_val, "validation balanced accuracy"
    log(f"choosing among {len(pool)} candidates by subject-grouped {folds}-fold cross-validation on train+val")
    table = run_cv_tune(
        pool, data, cfg.sweep.seed, folds, cfg.sweep.cpus_per_trial, runfolder.tune_store(cfg.out),
        on_result=lambda r: print(_format_cv(r), flush=True), timeout_s=cfg.sweep.timeout_s,
    )  # fmt: skip
    ensembles = [soft_voting_row(table, data, cfg.sweep.ensemble_size)]
    train = extracted.meta[(extracted.meta["split"] == TRAIN).to_numpy()]
    if cfg.sweep.stacking and train.assign(_g=subject_groups(train)).groupby("label")["_g"].nunique().min() >= 2:
        ensembles.append(stacking_row(table, data, extracted.cfg, folds))
    elif cfg.sweep.stacking:  # the chosen model is refitted on the training split, with inner folds
        log("stacking skipped: the training split has a class of fewer than two subjects")
    ensembles = [e for e in ensembles if e is not None]
    table = _ranked(pd.concat([table, pd.DataFrame(ensembles)], ignore_index=True) if ensembles else table)
    sweeps.oof = _oof_by_candidate(table, data)
    sweeps.choice = table.drop(columns=["base_model", "oof", "fold", "members"], errors="ignore")
    write_csv(storage.join(cfg.out, "model_choice.csv"), sweeps.choice)
    ok = table[(table["status"] == "ok") & ~table["Model"].isin([e["Model"] for e in ensembles])]
    if ok.empty:
        return by_val, "validation balanced accuracy"
    best = ok.iloc[0]
    how = f"subject-grouped {folds}-fold CV balanced accuracy on train+val (of {len(table)})"
    better = [
        e for e in ensembles if e["status"] == "ok" and e["CV Balanced Accuracy"] > best["CV Balanced Accuracy"]
    ]  # fmt: skip
    if better:  # the best ensemble; on a tie the soft vote, the simpler one
        winner = max(better, key=lambda e: e["CV Balanced Accuracy"])
        keys = ("Model", "members", "ensemble", "params", "CV Balanced Accuracy", "CV sd")
        return (winner["source"], pd.Series({k: winner[k] for k in keys})), how
    row = next(
        r for s, r in sweeps.candidates + _pool_rows(sweeps) if s == best["source"] and r["Model"] == best["Model"]
    )
    row = row.copy()
    row["CV Balanced Accuracy"], row["CV sd"] = best["CV Balanced Accuracy"], best["CV sd"]
    return (best["source"], row), how


def _ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Best CV balanced accuracy first; on a tie a single model ahead of an ensemble (an
    ensemble must beat it)."""
    kind = table["ensemble"] if "ensemble" in table else pd.Series("", index=table.index)
    order = table.assign(_ok=table["status"] == "ok", _ens=kind.fillna("").astype(str) != "")
    order = order.sort_values(["_ok", "CV Balanced Accuracy", "_ens", "Model"], ascending=[False, False, True, True])
    return table.loc[order.index].reset_index(drop=True)


def _oof_by_candidate(
    table: pd.DataFrame, data: dict[str, GroupedData]
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(source, Model) -> (labels, out-of-fold probabilities, folds) of every candidate the
    CV scored, over its feature set's original rows."""
    found = {}
    for _, row in table.iterrows():
        if row["status"] == "ok" and isinstance(row.get("oof"), list) and isinstance(row.get("fold"), list):
            grouped = data[row["source"]]
            found[(row["source"], row["Model"])] = (
                grouped.y[grouped.original],
                np.asarray(row["oof"], dtype=np.float64),
                np.asarray(row["fold"], dtype=np.int64),
            )
    return found


def ensemble_members(table: pd.DataFrame, size: int) -> tuple[str, pd.DataFrame] | None:
    """The members of an ensemble: the best `size` distinct classifiers (by CV balanced
    accuracy; one per base classifier) on the feature set of the best candidate, all
    cross-validated on the same folds; None when fewer than two qualify."""
    ok = table[table["status"] == "ok"]
    if size < 2 or ok.empty:
        return None
    source = ok.iloc[0]["source"]
    members = ok[ok["source"] == source].drop_duplicates("base_model").head(size)
    folds = [np.asarray(f) for f in members["fold"]]
    if len(members) < 2 or any(not np.array_equal(f, folds[0]) for f in folds[1:]):
        return None
    return source, members


def _described(members: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {"model": m["base_model"], "name": m["Model"], "params": _params(m["params"])} for _, m in members.iterrows()
    ]


def soft_voting_row(table: pd.DataFrame, data: dict[str, GroupedData], size: int) -> dict[str, Any] | None:
    """The soft-voting ensemble of `ensemble_members`, scored exactly from their out-of-fold
    probabilities: every member was cross-validated on the same subject folds, so the mean
    of their fold-wise probabilities is what the ensemble fitted on each fold predicts.
    None when fewer than two members qualify."""
    picked = ensemble_members(table, size)
    if picked is None:
        return None
    source, members = picked
    fold = np.asarray(members["fold"].iloc[0])
    probs = np.mean([np.asarray(p, dtype=np.float64) for p in members["oof"]], axis=0)
    y = data[source].y[data[source].original]
    described = _described(members)
    return {
        "source": source,
        "Model": "Soft voting: " + " + ".join(members["Model"]),
        "params": json.dumps(described, sort_keys=True),
        "members": described,
        "ensemble": "voting",
        **fold_scores(y, probs, fold),
        "status": "ok",
        "detail": f"mean probability of {len(members)} models, scored from their out-of-fold predictions",
        "oof": probs.tolist(),
        "fold": fold.tolist(),
    }


def stacking_row(table: pd.DataFrame, data: dict[str, GroupedData], cfg: RunConfig, folds: int) -> dict | None:
    """The stacked ensemble of `ensemble_members` (a logistic regression on their
    probabilities, fitted on inner subject-grouped folds), scored by the same grouped CV as
    the candidates (one Ray Tune trial: every outer fold fits the members on each inner
    fold, so it costs about `folds` + 1 times the members' CV). None when fewer than two
    members qualify."""
    picked = ensemble_members(table, cfg.sweep.ensemble_size)
    if picked is None:
        return None
    source, members = picked
    described = _described(members)
    candidate = {
        "source": source,
        "Model": "Stacking: " + " + ".join(members["Model"]),
        "base_model": STACKING,
        "params": json.dumps({"members": described, "folds": folds}, sort_keys=True),
    }
    log(f"stacking {len(members)} models (logistic regression on their probabilities), by the same grouped CV")
    result = run_cv_tune(
        [candidate], {source: data[source]}, cfg.sweep.seed, folds, cfg.sweep.cpus_per_trial,
        runfolder.tune_store(cfg.out), on_result=lambda r: print(_format_cv(r), flush=True),
        timeout_s=cfg.sweep.timeout_s * (folds + 1) * len(members), run_name="model_choice_stacking",
    )  # fmt: skip
    row = result.iloc[0].to_dict()
    return {**row, "members": described, "ensemble": "stacking"}


def _params(value: Any) -> dict[str, Any] | None:
    """A candidate's settings: JSON text, or None (NaN in a table) for the defaults."""
    return json.loads(value) if isinstance(value, str) else None


# Feature sets learned from the training subjects' labels (the custom head's embeddings): a
# cross-validation over train+val would score them on subjects they were fitted to (the demo
# measured CV 0.84 against test 0.67), so they are neither tuned nor chosen by CV; Table IV
# still reports them on the test split, and a validation-only choice (cv_folds 0) sees them.
LEARNED_SOURCES = frozenset({"custom"})


def learned(source: str) -> bool:
    """Whether a source's features were learned from the training subjects' labels: the
    custom head's, and any set with the trunk trained on the cells (`trained`)."""
    return source in LEARNED_SOURCES or (source not in MODEL_SOURCES and "trained" in source_families(source))


def _pool_rows(sweeps: Sweeps) -> list[tuple[str, pd.Series]]:
    """Every sweep row whose features can be cross-validated honestly (not `learned`)."""
    return [(src, row) for src, board in sweeps.boards.items() if not learned(src) for _, row in board.iterrows()]


def _cv_pool(sweeps: Sweeps, top: int, seed: int) -> list[dict[str, Any]]:
    """The `top` best classifiers on validation over every sweep (those that give
    probabilities), plus the fine-tuned one; the custom model's own head is not refitted."""
    rows = [(s, r) for s, r in _pool_rows(sweeps) if r["status"] == "ok" and pd.notna(r["Val Balanced Accuracy"])]
    rows = [(s, r) for s, r in rows if has_probabilities(r["Model"], seed)]
    rows.sort(key=lambda sr: (-sr[1]["Val Balanced Accuracy"], sr[0], sr[1]["Model"]))
    picked = rows[:top] + [(s, r) for s, r in sweeps.candidates if r is not None and "base_model" in r]
    return [
        {
            "source": s,
            "Model": r["Model"],
            "base_model": r.get("base_model", r["Model"]),
            "params": r["params"] if isinstance(r.get("params"), str) else None,
        }
        for s, r in picked
    ]


def _grouped(extracted: Extracted, trained: Trained | None, source: str, classes: list[str]) -> GroupedData:
    if source == "custom":
        return grouped_data(trained.meta, trained.matrix, classes)
    return grouped_data(extracted.meta, feature_matrix(extracted, source_families(source)), classes)


def _format_cv(row: dict[str, Any]) -> str:
    score = row.get("CV Balanced Accuracy")
    shown = f"{score:.3f} ± {row.get('CV sd') or 0:.3f}" if isinstance(score, float) else "  -  "
    tail = f"  ({row['detail']})" if row.get("detail") else ""
    return f"[choice] {row['Model']:<32} {row['source']:<28} cv bal.acc {shown}{tail}"


def fit_chosen(
    extracted: Extracted, trained: Trained | None, sweeps: Sweeps, choice: tuple[str, pd.Series], chosen_by: str
) -> Chosen:
    """The chosen candidate fitted on the training split, with its probabilities on the
    test split."""
    source, row = choice
    meta = extracted.meta
    test_meta = meta[(meta["split"] == TEST) & (meta["aug_index"] == 0)].reset_index(drop=True)
    params = json.loads(row["params"]) if isinstance(row.get("params"), str) else None
    if source == "head":
        probs_by_path = trained.head_probs.set_index("path")["head_prob"]
        test_probs = np.stack(test_meta["path"].map(probs_by_path).to_numpy())
        return Chosen(source, HEAD_MODEL, row, params, None, test_meta, test_probs, chosen_by)
    data, seed = sweeps.data[source], extracted.cfg.sweep.seed
    if row.get("ensemble") == "voting":
        pipeline, params = soft_voting(row["members"], seed), {"members": row["members"]}
    elif row.get("ensemble") == "stacking":  # its inner folds follow the training split's subjects
        groups = subject_groups(meta[(meta["split"] == TRAIN).to_numpy()])
        pipeline = build_model(STACKING, seed, params=params, groups=groups, y=data.y_train)
    else:
        pipeline = make_pipeline(row.get("base_model", row["Model"]), seed, params=params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = pipeline.fit(data.X_train, data.y_train)
        probs = classifier.predict_proba(data.X_test)
        if pd.isna(row.get("Val Balanced Accuracy", np.nan)):
            row = row.copy()
            row["Val Balanced Accuracy"] = (
                score_split(classifier, data.X_val, data.y_val)["Balanced Accuracy"] if len(data.y_val) else np.nan
            )
    return Chosen(source, row["Model"], row, params, classifier, test_meta, probs, chosen_by)


def decision_threshold(cfg: RunConfig, sweeps: Sweeps, choice: tuple[str, pd.Series]) -> dict[str, Any] | None:
    """The decision threshold on P(positive) of a two-class model (`sweep.threshold`),
    chosen on the chosen candidate's out-of-fold probabilities of the grouped CV (see
    `threshold_record`); 0.5 when the model was not chosen by CV (no out-of-fold
    predictions); None with more than two classes (the most probable class is called)."""
    if len(sweeps.classes) != 2:
        return None
    rule = parse_threshold_rule(cfg.sweep.threshold)
    source, row = choice
    oof = sweeps.oof.get((source, row["Model"]))
    if oof is None:
        value = rule[1] if rule[0] == "fixed" else 0.5
        why = "sweep.threshold" if rule[0] == "fixed" else "0.5: no out-of-fold predictions of the chosen model"
        return {"value": value, "rule": cfg.sweep.threshold, "chosen_on": why}
    y, probs, fold = oof
    record = threshold_record(y, probs, fold, rule, positive_index(sweeps.classes, cfg.data.positive_label))
    record["chosen_on"] = (
        f"out-of-fold probabilities of {row['Model']} (subject-grouped {int(fold.max()) + 1}-fold CV on train+val)"
        if rule[0] != "fixed" else "sweep.threshold"
    )  # fmt: skip
    oof_at = record["oof"]
    log(
        f"decision threshold {record['value']:.3f} ({record['rule']}): out-of-fold balanced accuracy "
        f"{oof_at['balanced_accuracy']:.3f} (sensitivity {oof_at['sensitivity']:.3f}, specificity "
        f"{oof_at['specificity']:.3f}) vs {record['oof_at_0.5']['balanced_accuracy']:.3f} at 0.5; chosen on other "
        f"folds {record['crossfit_cv_balanced_accuracy']:.3f} ± {record['crossfit_cv_sd']:.3f}"
    )
    return record


def _threshold_value(chosen: Chosen) -> float | None:
    return None if chosen.threshold is None else float(chosen.threshold["value"])


def write_predictions(extracted: Extracted, chosen: Chosen, classes: list[str]) -> pd.DataFrame:
    """predictions.parquet: the chosen model on the test split."""
    positive = positive_index(classes, extracted.cfg.data.positive_label)
    predictions = pd.DataFrame(
        {
            "path": chosen.test_meta["path"],
            "label": chosen.test_meta["label"],
            "subject": chosen.test_meta["subject"],
            "predicted_label": threshold_labels(chosen.test_probs, classes, positive, _threshold_value(chosen)),
            "prob_all": chosen.test_probs[:, positive],
            "error": "",
        }
    )  # the column set of `leukray predict` (leukray.stages.predict.PREDICTION_COLUMNS)
    provenance = {
        **extracted.record["provenance"],
        "positive_label": classes[positive],
        "classes": list(classes),
        "model": chosen.name,
    }
    write_parquet(storage.join(extracted.cfg.out, "predictions.parquet"), predictions, provenance)
    return predictions


def write_model_bundle(extracted: Extracted, trained: Trained | None, chosen: Chosen, classes: list[str]) -> str:
    """RUN/model: everything `predict` and `screen` need (see `leukray.models.bundle`)."""
    cfg, weights = extracted.cfg, extracted.weights
    trunk_state = None
    if chosen.source not in MODEL_SOURCES and "trained" in source_families(chosen.source):
        weights = extracted.trained_weights  # the trunk trained on the cells computes its features
        trunk_state = load_model_state(weights.source)
    elif weights.kind != "imagenet":
        trunk_state = build_trunk(
            resolve_weights(cfg.extract.weights, cfg.extract.seed)[0], cfg.extract.seed
        ).state_dict()
    model_dir = storage.join(cfg.out, "model")
    save_bundle(
        model_dir,
        classes=classes,
        positive_label=cfg.data.positive_label,
        preprocess=cfg.preprocess,
        weights=weights.as_dict(),
        weights_seed=cfg.extract.seed,
        feature_source=chosen.source,
        classifier_name=chosen.name,
        classifier=chosen.classifier,
        head_config=trained.record["head_config"] if trained is not None else None,
        trunk_state=trunk_state,
        custom_state_path=trained.record["state_path"] if trained is not None else None,
        extra={
            "data_fingerprint": extracted.record["fingerprint"],
            "chosen_by": chosen.chosen_by,
            "extract_batch_size": cfg.extract.batch_size,  # predict batches the trunk the same way
            "classifier_params": chosen.params,
            "decision_threshold": chosen.threshold,  # predict and screen call ALL at or above its value
        },
    )
    return model_dir


def measure_inference(
    paths: list[str], extracted: Extracted, trained: Trained | None, chosen: Chosen
) -> dict[str, float]:
    """Seconds per image of each stage of the chosen model, measured in this process on up
    to 32 test images (after one warm-up batch): decode + preprocess (+ cell features),
    trunk, head, classifier."""
    if not paths:
        return {}
    cfg = extracted.cfg
    families = source_families(chosen.source)
    batch = {"path": np.asarray(paths, dtype=object), "n_aug": np.zeros(len(paths), np.int64)}
    cells = tuple(f for f in families if f in CELL_FAMILIES)
    tick = time.perf_counter()
    pre = load_and_preprocess(batch, cfg.preprocess, AugmentConfig(oversample=0.0), 0, storage.read_bytes, cells)
    timing = {"decode_preprocess": (time.perf_counter() - tick) / len(paths)}
    ok = np.asarray([not e for e in pre["error"]], dtype=bool)
    images = pre["image"][ok]
    if not len(images):
        return timing
    custom = chosen.source in MODEL_SOURCES and trained is not None
    features = maps = None
    if custom or {"resnet50", "trained"} & set(families):
        spec = local_trunk_file(extracted.trained_weights.source) if "trained" in families else cfg.extract.weights
        head_config = trained.record["head_config"] if custom else None
        features, maps, timing["trunk"] = _time_trunk(cfg, spec, images, head_config)
    if custom:
        inputs, timing["head"] = _time_head(trained, maps)
    else:
        inputs = classifier_input(families, features, pre["cell_features"][ok] if cells else None)
    if chosen.classifier is not None:
        tick = time.perf_counter()
        chosen.classifier.predict_proba(inputs)
        timing["classifier"] = (time.perf_counter() - tick) / len(images)
    return timing


def _time_trunk(
    cfg: RunConfig, weights: str, images: np.ndarray, head_config: dict[str, Any] | None
) -> tuple[Any, Any, float]:
    maps_stage = head_config["unfreeze_stages"] if head_config else -1
    extractor = TrunkExtractor(weights, seed=cfg.extract.seed, maps_stage=maps_stage)
    extractor.extract(images[:2])  # warm-up
    tick = time.perf_counter()
    features, maps = extractor.extract(images)
    return features, maps, (time.perf_counter() - tick) / len(images)


def _time_head(trained: Trained, maps: np.ndarray) -> tuple[np.ndarray, float]:
    import torch

    head_config = trained.record["head_config"]
    model = build_custom_model(head_config, state=trained.model_state())
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(maps)).float()
        tick = time.perf_counter()
        embedded = model.embed(x, head_config["embedding"]).numpy()
        model(x)
        return embedded, (time.perf_counter() - tick) / len(maps)


def build_summary(
    extracted: Extracted,
    trained: Trained | None,
    sweeps: Sweeps,
    tuned: dict[str, Any] | None,
    chosen: Chosen,
    predictions: pd.DataFrame,
    n_classifiers: int,
    timing: dict[str, float],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """summary.json's content."""
    cfg, record = extracted.cfg, extracted.record
    facts, meta = record["facts"], extracted.meta
    usable_meta = meta[meta["aug_index"] == 0]
    classes = sweeps.classes
    chosen_test = _chosen_test(cfg, chosen, predictions, classes)
    return {
        "leukray_version": __version__,
        "weights": extracted.weights.as_dict(),
        "positive_label": cfg.data.positive_label,
        "classes": classes,
        "data": {"path": cfg.data.path, "test_path": cfg.data.test_path, "fingerprint": record["fingerprint"]},
        "split": {
            "mode": cfg.split.mode,
            "description": describe_split(cfg, facts),
            "leaking_subjects": facts["leaking_subjects"],
            "groups": facts["group_source"],
        },
        "counts": {
            "found": record["counts"]["found"],
            "usable": int(len(usable_meta)),
            "duplicates_removed": facts["duplicates"],
            "errors": int(len(extracted.errors)),
            "by_split_and_class": counts_by(usable_meta, "split", "label"),
            "augmented_copies_by_class": counts_by(meta[meta["aug_index"] > 0], "label"),
            "subjects_by_split": record["counts"]["subjects_by_split"],
        },
        "duplicates": facts["duplicate_pairs"],
        **_model_facts(sweeps, chosen, chosen_test, trained, n_classifiers),
        "custom_model": trained.record["custom_model"] if trained is not None else None,
        "trained_trunk": {**extracted.trunk_record["trained_trunk"], "weights": extracted.trunk_record["weights"]}
        if extracted.trunk_record is not None
        else None,
        "tuned_model": {k: v for k, v in tuned.items() if k != "row"} if tuned is not None else None,
        "model_choice": _choice_summary(sweeps.choice),
        "sweep": _sweep_counts(sweeps.boards[sweeps.tables[0]["source"]], n_classifiers),
        "sweep_custom": _sweep_counts(sweeps.boards["custom"], n_classifiers) if "custom" in sweeps.boards else None,
        "inference_seconds_per_image": timing,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "ray": _ray_facts(record, trained, sweeps.boards[sweeps.tables[0]["source"]]),
        "environment": {"python": platform.python_version(), "platform": sys.platform},
    }


def _chosen_test(cfg: RunConfig, chosen: Chosen, predictions: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """The chosen model's test metrics as predict calls the labels (at the decision
    threshold: predictions.parquet's predicted_label), with `argmax` (at the most probable
    class) and `ci95` (subject-bootstrap intervals) beside them."""
    code = {name: i for i, name in enumerate(classes)}
    y_test = predictions["label"].map(code).to_numpy()
    pred = predictions["predicted_label"].map(code).to_numpy()
    chosen_test = score_probabilities(y_test, chosen.test_probs, pred)
    chosen_test["argmax"] = score_probabilities(y_test, chosen.test_probs)
    if cfg.sweep.bootstrap:
        groups = np.where(
            predictions["subject"].astype(str) != "", predictions["subject"].astype(str), predictions["path"]
        )
        chosen_test["ci95"] = subject_bootstrap(
            y_test, chosen.test_probs, groups, cfg.sweep.bootstrap, cfg.sweep.seed, pred=pred
        )
    return chosen_test


def _model_facts(
    sweeps: Sweeps, chosen: Chosen, chosen_test: dict[str, float], trained: Trained | None, n_classifiers: int
) -> dict[str, Any]:
    """summary.json's best models per table and the chosen one."""
    return {
        "best_model": _best_summary(sweeps.best[sweeps.tables[0]["source"]], sweeps.has_val),
        "best_custom_model": _best_summary(sweeps.best["custom"], sweeps.has_val) if trained else None,
        "feature_sets": [
            {
                **{k: t[k] for k in ("features", "source", "file", "title", "dim")},
                "best": _best_summary(sweeps.best[t["source"]], sweeps.has_val),
                "sweep": _sweep_counts(sweeps.boards[t["source"]], n_classifiers),
            }
            for t in sweeps.tables
        ],  # fmt: skip
        "chosen_model": {
            "name": chosen.name,
            "feature_source": chosen.source,
            "chosen_by": chosen.chosen_by,
            "val_balanced_accuracy": chosen.row["Val Balanced Accuracy"],
            "cv_balanced_accuracy": chosen.row.get("CV Balanced Accuracy"),
            "cv_sd": chosen.row.get("CV sd"),
            "test": {k: v for k, v in chosen_test.items() if k not in ("ci95", "argmax")},
            # subject-bootstrap 95% intervals of the test balanced accuracy and ROC AUC
            "test_ci95": chosen_test.get("ci95"),
            "members": chosen.params.get("members") if isinstance(chosen.params, dict) else None,
            "decision_threshold": chosen.threshold,
            # the most probable class (0.5 for two classes), as before the threshold: for comparison
            "test_argmax": chosen_test.get("argmax"),
        },
    }


def _choice_summary(table: pd.DataFrame | None) -> dict[str, Any] | None:
    """Subject-grouped CV balanced accuracy (mean, sd) of the best single untuned model, the
    best tuned one, the soft-voting (`ensemble`) and the stacked ensemble, as
    model_choice.csv has them."""
    if table is None:
        return None
    ok = table[table["status"] == "ok"]
    ensemble = ok["ensemble"].fillna("").astype(str) if "ensemble" in ok else pd.Series("", index=ok.index)
    kinds = {
        "best_single": ok[~ok["Model"].str.endswith("(tuned)") & (ensemble == "")],
        "tuned": ok[ok["Model"].str.endswith("(tuned)")],
        "ensemble": ok[ensemble == "voting"],
        "stacking": ok[ensemble == "stacking"],
    }
    return {
        kind: None if rows.empty else {
            "name": rows.iloc[0]["Model"], "feature_source": rows.iloc[0]["source"],
            "cv_balanced_accuracy": float(rows.iloc[0]["CV Balanced Accuracy"]), "cv_sd": float(rows.iloc[0]["CV sd"]),
        }
        for kind, rows in kinds.items()
    }  # fmt: skip


def _ray_facts(record: dict[str, Any], trained: Trained | None, board: pd.DataFrame) -> dict[str, Any]:
    node_ids = dict(record["ray"]["node_ids"])
    if trained is not None and trained.record["ray"]["maps_node_ids"]:  # a separate train job made its own maps
        node_ids["train_maps"] = trained.record["ray"]["maps_node_ids"].get("extract", [])
    return {
        "extract_device": record["ray"]["extract_device"],
        "node_ids": node_ids,
        "sweep_node_ids": sorted(set(board.get("node_id", pd.Series(dtype=str)).dropna().astype(str)) - {""}),
        "cluster_cpus": cluster_cpus(),
        "cluster_gpus": cluster_gpus(),
    }


def _best_summary(row: pd.Series | None, has_val: bool) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "name": row["Model"],
        "chosen_by": "validation balanced accuracy" if has_val else "test balanced accuracy (no validation split)",
        "test": {k: row[k] for k in METRICS},
        "val_balanced_accuracy": row["Val Balanced Accuracy"],
    }


def _sweep_counts(board: pd.DataFrame, n: int) -> dict[str, int]:
    return {
        "classifiers": n,
        "ok": int((board["status"] == "ok").sum()),
        "failed": int((board["status"] == "failed").sum()),
        "timeout": int((board["status"] == "timeout").sum()),
    }


def _write_report(out: str) -> None:
    """report.html / report.md / figures; the run's results are already written, so a report
    problem is a warning, not a lost run."""
    from leukray.report.document import write_report

    try:
        write_report(out)
    except Exception as exc:  # noqa: BLE001 - report problems must not lose the run
        log(f"WARNING: the report could not be written: {type(exc).__name__}: {exc}")
