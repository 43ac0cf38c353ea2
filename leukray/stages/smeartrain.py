"""`leukray smear-train`: a cell classifier for the smear domain.

A bundle trained on C-NMC crops (another lab, stain and microscope) does not transfer to
smear fields. This stage trains one on the smears themselves: every field is detected and
cut exactly as `leukray screen` does (`leukray.distributed.smear.detect_cells` runs screen's
own batch function), the cells are labelled from annotations (`leukray.data.annotations`:
ALL-IDB blast centres, Pascal-VOC WBC boxes, or a slide,x,y,label CSV), and a classifier on
the hand-crafted cell features (`leukray.ops.cellfeatures`) is evaluated by leave-slides-out
cross-validation (groups = slides: no slide's cells on both sides) before the final model,
fitted on every labelled cell, is written as a bundle `leukray screen --model` accepts, with
the Platt calibration of its probabilities fitted on the out-of-fold predictions
(`leukray.models.calibration`; the reported metrics use nested calibration).

Outputs (OUT/): model/ (the bundle, its preprocessing with the stain target and its
calibration), cells.parquet (every cut cell: box, label, out-of-fold prob_all, calibrated and
not), slides.csv (per field: truth, cells, out-of-fold blast fraction and mean probability),
smear_train.json (config, counts, metrics, calibration).

May import: `leukray.config`, `leukray.errors`, `leukray.io`, `leukray.data`, `leukray.ops`,
`leukray.models`, `leukray.distributed`, `leukray.stages.screen`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np
import pandas as pd

from leukray import __version__
from leukray.config import PreprocessConfig, ScreenConfig, SmearTrainConfig
from leukray.data.annotations import (
    BLAST,
    NORMAL,
    UNLABELLED,
    SlideAnnotation,
    label_cells,
    load_annotations,
    slide_key,
)
from leukray.distributed.smear import detect_cells
from leukray.errors import ConfigError, DataError
from leukray.io import storage
from leukray.io.tables import log, write_csv, write_json, write_parquet
from leukray.models.bundle import save_bundle
from leukray.models.calibration import apply_calibration, fit_platt
from leukray.ops import stain
from leukray.stages.screen import list_slides

CLASSES = ["hem", "all"]  # C-NMC's names, so screen's outputs read the same for every bundle
NO_TRUNK = {"kind": "none", "name": "none (cell features only)", "source": "", "sha256": "", "is_pretrained": False}
CALIBRATION_FOLDS = 5  # inner folds of whole slides an outer fold's calibration is fitted on
CAVEAT = (
    "Leave-slides-out estimates on few annotated fields: the slide AUROC over a dozen slides is weak evidence "
    "(one misranked slide moves it by several points); the cell-level figures rest on more cells but still "
    "few patients."
)


def build_classifier(cfg: SmearTrainConfig) -> Any:
    """The unfitted, class-balanced classifier `cfg.classifier` names."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if cfg.classifier == "random_forest":
        return RandomForestClassifier(
            n_estimators=300, min_samples_leaf=2, class_weight="balanced_subsample", random_state=cfg.seed, n_jobs=1
        )
    return Pipeline(
        [("scale", StandardScaler()), ("model", LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000))]
    )


def slide_folds(slides: np.ndarray, positive: dict[str, bool], folds: int, seed: int) -> list[np.ndarray]:
    """The held-out slides of each fold: one slide each (folds 0), else `folds` groups with
    positive and negative slides dealt round-robin in a seeded order (stratified by slide)."""
    unique = np.unique(slides)
    if folds == 0 or folds >= len(unique):
        return [np.asarray([s]) for s in unique]
    rng = np.random.default_rng(seed)
    groups: list[list[str]] = [[] for _ in range(folds)]
    dealt = 0
    for cls in (True, False):
        members = [s for s in unique if positive[s] is cls]
        for s in rng.permutation(members):
            groups[dealt % folds].append(str(s))
            dealt += 1
    return [np.asarray(g) for g in groups if g]


def out_of_fold(
    features: np.ndarray, labels: np.ndarray, slides: np.ndarray, positive: dict[str, bool], cfg: SmearTrainConfig
) -> np.ndarray:
    """prob_all of every cell (labelled or not) from a model that never saw its slide; NaN
    where the training slides lacked a class."""
    prob = np.full(len(labels), np.nan)
    for held_out in slide_folds(slides, positive, cfg.cv_folds, cfg.seed):
        test = np.isin(slides, held_out)
        train = ~test & (labels != UNLABELLED)
        if len(np.unique(labels[train])) < 2:
            continue
        model = build_classifier(cfg).fit(features[train], labels[train])
        prob[test] = model.predict_proba(features[test])[:, 1]
    return prob


def calibrated_out_of_fold(
    features: np.ndarray, labels: np.ndarray, slides: np.ndarray, positive: dict[str, bool], cfg: SmearTrainConfig
) -> np.ndarray:
    """Calibrated prob_all of every cell from a model and a calibration that never saw its
    slide (nested cross-validation): in each fold, the model is fitted on the other slides'
    labelled cells and its Platt calibration on their own out-of-fold predictions
    (CALIBRATION_FOLDS folds of whole slides within the training slides). NaN where the
    training slides lacked a class."""
    prob = np.full(len(labels), np.nan)
    inner_cfg = dataclasses.replace(cfg, cv_folds=CALIBRATION_FOLDS)
    for held_out in slide_folds(slides, positive, cfg.cv_folds, cfg.seed):
        test = np.isin(slides, held_out)
        train = ~test & (labels != UNLABELLED)
        inner = out_of_fold(features[train], labels[train], slides[train], positive, inner_cfg)
        known = np.isfinite(inner)
        if len(np.unique(labels[train][known])) < 2:
            continue
        calibration = fit_platt(inner[known], labels[train][known] == BLAST)
        model = build_classifier(cfg).fit(features[train], labels[train])
        prob[test] = apply_calibration(model.predict_proba(features[test])[:, 1], calibration)
    return prob


def calibration_scores(truth: np.ndarray, raw: np.ndarray, calibrated: np.ndarray) -> dict[str, float]:
    """Brier score and log loss of the labelled cells' out-of-fold probabilities, before and
    after calibration (lower is better)."""
    from sklearn.metrics import brier_score_loss, log_loss

    keep = np.isfinite(raw) & np.isfinite(calibrated)
    if len(np.unique(truth[keep])) < 2:
        return {}
    out = {}
    for name, prob in (("uncalibrated", raw[keep]), ("calibrated", calibrated[keep])):
        out[f"brier_{name}"] = float(brier_score_loss(truth[keep], prob))
        out[f"log_loss_{name}"] = float(log_loss(truth[keep], np.clip(prob, 1e-6, 1 - 1e-6)))
    return out


def _auroc(truth: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    keep = np.isfinite(score)
    truth, score = truth[keep], score[keep]
    return float(roc_auc_score(truth, score)) if len(np.unique(truth)) == 2 else math.nan


def metrics(cells: pd.DataFrame, slides: pd.DataFrame, threshold: float) -> dict[str, Any]:
    """Cell AUROC and balanced accuracy (labelled cells) and slide AUROC (mean probability and
    blast fraction), all out of fold; overall and per annotation source."""
    from sklearn.metrics import balanced_accuracy_score

    out: dict[str, Any] = {}
    for source in ["all", *sorted(slides["source"].unique())]:
        own_cells = cells if source == "all" else cells[cells["source"] == source]
        own_slides = slides if source == "all" else slides[slides["source"] == source]
        labelled = own_cells[(own_cells["label"] != UNLABELLED) & own_cells["prob_all"].notna()]
        truth = (labelled["label"] == BLAST).to_numpy()
        scored = own_slides[own_slides["mean_prob_all"].notna()]
        slide_truth = scored["positive"].to_numpy(bool)
        out[source] = {
            "cells_labelled": int(len(labelled)),
            "blast_cells": int(truth.sum()),
            "cell_auroc": _auroc(truth, labelled["prob_all"].to_numpy()),
            "cell_balanced_accuracy": float(balanced_accuracy_score(truth, labelled["prob_all"] >= threshold))
            if len(np.unique(truth)) == 2
            else math.nan,
            "slides": int(len(scored)),
            "positive_slides": int(slide_truth.sum()),
            "slide_auroc_mean_prob": _auroc(slide_truth, scored["mean_prob_all"].to_numpy()),
            "slide_auroc_blast_fraction": _auroc(slide_truth, scored["blast_fraction"].to_numpy()),
        }
    return out


def slide_table(cells: pd.DataFrame, annotations: dict[str, SlideAnnotation], threshold: float) -> pd.DataFrame:
    """One row per annotated field: its truth and out-of-fold blast fraction (share of its
    cells with prob_all >= threshold) and mean prob_all over every detected cell."""
    records = []
    for key, annotation in sorted(annotations.items()):
        own = cells[(cells["key"] == key) & cells["prob_all"].notna()]
        records.append(
            {
                "slide": key,
                "source": annotation.source,
                "positive": annotation.positive,
                "cells": int((cells["key"] == key).sum()),
                "labelled_blasts": int((cells.loc[cells["key"] == key, "label"] == BLAST).sum()),
                "annotated_blasts": int((annotation.point_labels == BLAST).sum()),
                "blast_fraction": float((own["prob_all"] >= threshold).mean()) if len(own) else math.nan,
                "mean_prob_all": float(own["prob_all"].mean()) if len(own) else math.nan,
            }
        )
    return pd.DataFrame(records)


def fit_smear_stain(
    fields: list[str], screen_cfg: ScreenConfig, preprocess_cfg: PreprocessConfig, cfg: SmearTrainConfig
) -> PreprocessConfig:
    """`preprocess_cfg` with its stain target fitted on the cells detected in a seeded sample
    of `cfg.stain_sample` fields (itself when stain is none or a target is set)."""
    if preprocess_cfg.stain == "none" or preprocess_cfg.stain_target:
        return preprocess_cfg
    pick = np.random.default_rng(cfg.seed).permutation(len(fields))[: cfg.stain_sample]
    plain = dataclasses.replace(preprocess_cfg, stain="none")
    rows, _, images = detect_cells([fields[i] for i in sorted(pick)], screen_cfg, plain, (), keep_images=True)
    ok = (rows["error"].astype(str) == "").to_numpy()
    try:
        target = stain.fit_target(preprocess_cfg.stain, list(images[ok]))
    except stain.StainError as exc:
        raise DataError(
            f"cannot fit a {preprocess_cfg.stain} stain target on the sampled fields' cells: {exc}"
        ) from None
    log(f"{preprocess_cfg.stain} stain target from {int(ok.sum())} cells of {len(pick)} fields")
    return dataclasses.replace(preprocess_cfg, stain_target=stain.format_target(target))


def _annotated_fields(
    fields_root: str, annotation_sources: list[str]
) -> tuple[list[str], dict[str, SlideAnnotation], list[str], list[str]]:
    """(annotated fields, their annotations by key, unannotated fields, annotations without
    a field)."""
    fields = list_slides(fields_root)
    annotations = load_annotations(
        annotation_sources, storage.list_files, lambda p: storage.read_bytes(p).decode("utf-8", "replace")
    )
    keys = [slide_key(f) for f in fields]
    duplicated = sorted({k for k in keys if keys.count(k) > 1} & set(annotations))
    if duplicated:
        raise DataError(
            f"two fields share the name {duplicated[0]} under {fields_root}: annotations would be ambiguous"
        )
    used = [f for f, k in zip(fields, keys, strict=True) if k in annotations]
    if not used:
        raise DataError(f"none of the {len(fields)} fields under {fields_root} has an annotation in the sources given")
    unannotated = [f for f, k in zip(fields, keys, strict=True) if k not in annotations]
    orphans = sorted(set(annotations) - set(keys))
    return used, {k: annotations[k] for k in map(slide_key, used)}, unannotated, orphans


def label_rows(rows: pd.DataFrame, annotations: dict[str, SlideAnnotation]) -> pd.DataFrame:
    """`rows` (detect_cells) with key, source and label; failed rows are UNLABELLED."""
    rows = rows.assign(key=rows["slide"].astype(str).map(slide_key), label=UNLABELLED)
    rows["error"] = rows["error"].astype(str)
    rows["source"] = rows["key"].map(lambda k: annotations[k].source)
    ok = (rows["cell_index"] >= 0) & (rows["error"] == "")
    for key, group in rows[ok].groupby("key"):
        rows.loc[group.index, "label"] = label_cells(group, annotations[key])
    return rows


def _cross_validate(
    rows: pd.DataFrame, features: np.ndarray, ok: np.ndarray, positive: dict[str, bool], cfg: SmearTrainConfig
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Out-of-fold prob_all of every row (NaN on failed rows), uncalibrated and calibrated
    (`calibrated_out_of_fold`), and the final model's calibration: Platt's, fitted on every
    labelled cell's uncalibrated out-of-fold prob_all.

    Raises:
        DataError: the labelled cells hold a single class.
    """
    labels = rows["label"].to_numpy()
    if len(np.unique(labels[ok & (labels != UNLABELLED)])) < 2:
        raise DataError(f"the annotated fields' detected cells hold one class only ({np.unique(labels).tolist()})")
    raw, calibrated = np.full(len(rows), np.nan), np.full(len(rows), np.nan)
    slides = rows["key"].to_numpy()[ok]
    raw[ok] = out_of_fold(features[ok], labels[ok], slides, positive, cfg)
    calibrated[ok] = calibrated_out_of_fold(features[ok], labels[ok], slides, positive, cfg)
    fitted = ok & (labels != UNLABELLED) & np.isfinite(raw)
    calibration = fit_platt(raw[fitted], labels[fitted] == BLAST)
    truth = labels[fitted] == BLAST
    log(
        f"calibration (Platt, on {int(fitted.sum())} out-of-fold cells): slope {calibration['slope']:.3f}, "
        f"intercept {calibration['intercept']:.3f}"
    )
    return raw, calibrated, {**calibration, **calibration_scores(truth, raw[fitted], calibrated[fitted])}


def smear_train(
    fields_root: str,
    annotation_sources: list[str],
    out: str,
    cfg: SmearTrainConfig | None = None,
    screen_cfg: ScreenConfig | None = None,
    preprocess_cfg: PreprocessConfig | None = None,
    start_ray: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train and cross-validate the smear-domain classifier; write `out` (see the module
    docstring). Returns smear_train.json's content.

    Raises:
        ConfigError: no output folder or no annotation source.
        DataError: no fields, no annotations, no annotated field, or a single class of cells.
    """
    cfg, screen_cfg = cfg or SmearTrainConfig(), screen_cfg or ScreenConfig()
    preprocess_cfg = preprocess_cfg or PreprocessConfig()
    if not out:
        raise ConfigError("no output folder: pass --out DIR")
    if not annotation_sources:
        raise ConfigError("no annotations: pass --annotations DIR_OR_FILE (.xyc, VOC .xml, slide,x,y,label .csv)")
    t0 = time.perf_counter()
    fields, annotations, unannotated, orphans = _annotated_fields(fields_root, annotation_sources)
    if start_ray is not None:
        start_ray()
    log(f"smear-train: {len(fields)} annotated fields ({len(unannotated)} without annotation, not used)")
    preprocess_cfg = fit_smear_stain(fields, screen_cfg, preprocess_cfg, cfg)
    rows, features, _ = detect_cells(fields, screen_cfg, preprocess_cfg, cfg.cell_families)
    rows = label_rows(rows, annotations)
    labels = rows["label"].to_numpy()
    ok = ((rows["cell_index"] >= 0) & (rows["error"] == "")).to_numpy()
    positive = {k: a.positive for k, a in annotations.items()}
    rows["prob_all_uncalibrated"], rows["prob_all"], calibration = _cross_validate(rows, features, ok, positive, cfg)
    slides = slide_table(rows[ok], annotations, screen_cfg.cell_threshold())
    scores = metrics(rows[ok], slides, screen_cfg.cell_threshold())
    trained = ok & (labels != UNLABELLED)
    model = build_classifier(cfg).fit(features[trained], labels[trained])
    model_dir = _write_bundle(out, model, cfg, preprocess_cfg, calibration)
    summary = {
        "leukray_version": __version__,
        "caveat": CAVEAT,
        "fields": fields_root,
        "annotations": annotation_sources,
        "model": model_dir,
        "config": {
            name: dataclasses.asdict(c)
            for name, c in (("smear", cfg), ("screen", screen_cfg), ("preprocess", preprocess_cfg))
        },
        "counts": _counts(rows, ok, labels, fields, unannotated, orphans),
        "cv": {
            "folds": len(slide_folds(rows["key"].to_numpy()[ok], positive, cfg.cv_folds, cfg.seed)),
            "groups": "slide",
        },
        "metrics": scores,
        "calibration": calibration,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    _write_outputs(out, rows, slides, summary)
    return summary


def _counts(rows, ok, labels, fields, unannotated, orphans) -> dict[str, Any]:
    return {
        "fields": len(fields),
        "fields_without_annotation": len(unannotated),
        "annotations_without_field": orphans,
        "cells": int(ok.sum()),
        "blast_cells": int((labels[ok] == BLAST).sum()),
        "normal_cells": int((labels[ok] == NORMAL).sum()),
        "unlabelled_cells": int((labels[ok] == UNLABELLED).sum()),
        "errors": sorted(set(rows.loc[~ok, "error"])),
    }


def _write_bundle(
    out: str, model: Any, cfg: SmearTrainConfig, preprocess_cfg: PreprocessConfig, calibration: dict[str, Any]
) -> str:
    model_dir = storage.join(out, "model")
    storage.makedirs(model_dir)
    save_bundle(
        model_dir,
        classes=CLASSES,
        positive_label="all",
        preprocess=preprocess_cfg,
        weights=NO_TRUNK,
        weights_seed=cfg.seed,
        feature_source="+".join(cfg.cell_families),
        classifier_name=type(model).__name__ if cfg.classifier == "random_forest" else "LogisticRegression",
        classifier=model,
        extra={
            "trained_on": "smear fields (leukray smear-train)",
            "smear": dataclasses.asdict(cfg),
            "calibration": {k: calibration[k] for k in ("method", "slope", "intercept", "cells")},
        },
    )
    return model_dir


def _write_outputs(out: str, rows: pd.DataFrame, slides: pd.DataFrame, summary: dict[str, Any]) -> None:
    columns = ["slide", "cell_index", "x0", "y0", "x1", "y1", "cx", "cy", "area", "label", "prob_all"]
    columns += ["prob_all_uncalibrated", "error"]
    write_parquet(storage.join(out, "cells.parquet"), rows[columns], {"model": summary["model"]})
    write_csv(storage.join(out, "slides.csv"), slides)
    write_json(storage.join(out, "smear_train.json"), summary)
    overall = summary["metrics"]["all"]
    log(
        f"wrote {out}: {summary['counts']['cells']} cells; leave-slides-out cell AUROC {overall['cell_auroc']:.3f}, "
        f"slide AUROC {overall['slide_auroc_mean_prob']:.3f} over {overall['slides']} slides"
    )
