"""The classifiers of the sweep (the paper's step 4, Tables III and IV) and how they are
scored and chosen, without Ray: Lazy Predict's classifier list and pipeline, one scorer for
every model (ROC AUC from scores), a fit in a child process with a CPU-time limit, the
leaderboard, the choice of the model on validation, subject-grouped cross-validation with
out-of-fold predictions, the soft-voting and stacked ensembles, the decision threshold on
out-of-fold predictions and subject-bootstrap intervals.

Each classifier is Lazy Predict's pipeline (mean imputation, standard scaling, the
classifier with `random_state` set where it takes one), fitted on the training split and
scored on validation (which picks the best model) and test (which reports it). ROC AUC comes
from scores (`predict_proba`, else `decision_function`), never from hard labels: from labels
it equals balanced accuracy, as every row of the paper's tables shows.

A classifier is fitted in a child process (forked from a clean fork server) limited to
`sweep.timeout_s` seconds of CPU time (RLIMIT_CPU), so that one past its limit is ended
by the kernel (its CPU is freed at once) and recorded as `timeout`; one that raises is
recorded as `failed` with its error. Neither stops the sweep. The limit is CPU time, not
wall time, so a machine loaded by other work does not change which classifiers time out (a
wall-time backstop, ten times the limit plus a minute, only catches fits that stop
computing). `leukray.distributed.tuning`
spreads these fits over the cluster as Ray Tune trials.

May import: numpy, pandas, scikit-learn, Lazy Predict, `leukray.errors`, `leukray.data.splits`.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import resource
import signal
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from leukray.data.splits import TEST, TRAIN, VAL
from leukray.errors import ConfigError

LEADERBOARD_COLUMNS = [
    "Model",
    "Accuracy",
    "Balanced Accuracy",
    "ROC AUC",
    "F1 Score",
    "Time Taken",
    "status",
    "Val Balanced Accuracy",
    "detail",
    "node_id",  # the Ray node the trial ran on
]

# Slowest first (measured by `make bench` on 2,048-d ResNet50 features, 2,000 training rows),
# so that on a few CPUs the long fits start at once and the short ones fill in around them.
# The classifiers Lazy Predict lists that cannot be built without arguments fail at once, so
# their place does not matter.
_SLOW_FIRST = [
    "BaggingClassifier",
    "AdaBoostClassifier",
    "LGBMClassifier",
    "XGBClassifier",
    "NuSVC",
    "SVC",
    "LinearDiscriminantAnalysis",
    "RandomForestClassifier",
    "CalibratedClassifierCV",
    "DecisionTreeClassifier",
    "LabelSpreading",
    "LabelPropagation",
    "RidgeClassifierCV",
    "ExtraTreesClassifier",
    "LinearSVC",
    "RidgeClassifier",
    "SGDClassifier",
    "KNeighborsClassifier",
]


# Where each of Lazy Predict's classifiers lives (scikit-learn's public modules, XGBoost,
# LightGBM), so that a fit process builds its classifier without importing Lazy Predict:
# `lazypredict.Supervised` walks every scikit-learn module (`all_estimators`) and imports
# PyTorch and MLflow on the way, ~6 s per process. A name not here (a newer Lazy Predict or
# scikit-learn) is taken from Lazy Predict's list; a test checks the table against it.
CLASSIFIER_HOMES = {
    "sklearn.ensemble": [
        "AdaBoostClassifier", "BaggingClassifier", "ExtraTreesClassifier", "RandomForestClassifier",
        "StackingClassifier",
    ],
    "sklearn.naive_bayes": ["BernoulliNB", "CategoricalNB", "GaussianNB"],
    "sklearn.calibration": ["CalibratedClassifierCV"],
    "sklearn.tree": ["DecisionTreeClassifier", "ExtraTreeClassifier"],
    "sklearn.dummy": ["DummyClassifier"],
    "sklearn.model_selection": ["FixedThresholdClassifier", "TunedThresholdClassifierCV"],
    "sklearn.neighbors": ["KNeighborsClassifier", "NearestCentroid"],
    "sklearn.semi_supervised": ["LabelPropagation", "LabelSpreading", "SelfTrainingClassifier"],
    "sklearn.discriminant_analysis": ["LinearDiscriminantAnalysis", "QuadraticDiscriminantAnalysis"],
    "sklearn.svm": ["LinearSVC", "NuSVC", "SVC"],
    "sklearn.linear_model": [
        "LogisticRegression", "PassiveAggressiveClassifier", "Perceptron", "RidgeClassifier", "RidgeClassifierCV",
        "SGDClassifier",
    ],
    "xgboost": ["XGBClassifier"],
    "lightgbm": ["LGBMClassifier"],
}  # fmt: skip
_HOME_OF = {name: module for module, names in CLASSIFIER_HOMES.items() for name in names}


def classifier_class(name: str) -> type:
    """The class of Lazy Predict's classifier `name`, imported from its own module where
    `CLASSIFIER_HOMES` knows it (no Lazy Predict import), else from Lazy Predict's list.

    Raises:
        KeyError: a name Lazy Predict does not have.
    """
    import importlib

    home = _HOME_OF.get(name)
    if home is not None:
        cls = getattr(importlib.import_module(home), name, None)
        if cls is not None:
            return cls
    return lazypredict_classifiers()[name]


@functools.lru_cache(maxsize=1)
def lazypredict_classifiers() -> dict[str, type]:
    """Name -> class of every classifier that `LazyClassifier(classifiers="all")` fits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lazypredict.Supervised import CLASSIFIERS
    return dict(CLASSIFIERS)


def select_classifiers(spec: str) -> list[str]:
    """`all` or a comma-separated list -> names ordered slowest first.

    Raises:
        ConfigError: an unknown name (the message lists the known ones).
    """
    known = lazypredict_classifiers()
    if spec.strip().lower() == "all":
        names = list(known)
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        lower = {k.lower(): k for k in known}
        unknown = [n for n in names if n.lower() not in lower]
        if unknown:
            raise ConfigError(f"unknown classifier(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        names = list(dict.fromkeys(lower[n.lower()] for n in names))
    rank = {n: i for i, n in enumerate(_SLOW_FIRST)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


# Keys of a parameter set that configure the pipeline's preprocessing rather than the
# classifier (from a hyperparameter search): `prep_scaler` standard | robust; `prep_reduce`
# none | pca | kbest (ANOVA F), applied to the first `prep_block` columns (the 2,048-d
# trunk block; 0 = every column) and keeping `prep_dim` of them.
PREP_KEYS = ("prep_scaler", "prep_reduce", "prep_dim", "prep_block")


def _reducer(params: dict[str, Any], seed: int):
    """The block reduction a parameter set asks for, or None."""
    from sklearn.compose import ColumnTransformer
    from sklearn.decomposition import PCA
    from sklearn.feature_selection import SelectKBest

    kind, block = params.get("prep_reduce", "none"), int(params.get("prep_block", 0))
    if kind in (None, "none") or block <= 0:
        return None
    if kind not in ("pca", "kbest"):
        raise ConfigError(f"prep_reduce must be none, pca or kbest, got {kind!r}")
    dim = min(int(params.get("prep_dim", 64)), block)
    reduce = PCA(n_components=dim, random_state=seed) if kind == "pca" else SelectKBest(k=dim)
    return ColumnTransformer([("block", reduce, list(range(block)))], remainder="passthrough")


def make_pipeline(name: str, seed: int, n_jobs: int = 1, params: dict[str, Any] | None = None):
    """Lazy Predict's pipeline for one classifier: imputer + scaler + classifier, with
    `params` (from a hyperparameter search) given to the classifier; its `PREP_KEYS` choose
    the scaler and an optional reduction of a column block before the classifier."""
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import RobustScaler, StandardScaler

    params = dict(params or {})
    prep = {k: params.pop(k) for k in PREP_KEYS if k in params}
    cls = classifier_class(name)
    defaults = cls().get_params()
    kwargs: dict[str, Any] = {}
    if "random_state" in defaults:
        kwargs["random_state"] = seed
    module = getattr(cls, "__module__", "") or ""
    if "lightgbm" in module:
        kwargs.update(verbose=-1, n_jobs=n_jobs)
    if "xgboost" in module:
        kwargs.update(verbosity=0, n_jobs=n_jobs)
    scaler = RobustScaler() if prep.get("prep_scaler") == "robust" else StandardScaler()
    steps = [("imputer", SimpleImputer(strategy="mean")), ("scaler", scaler)]
    reducer = _reducer(prep, seed)
    if reducer is not None:
        steps.append(("reduce", reducer))
    return Pipeline([*steps, ("classifier", cls(**{**kwargs, **params}))])


def soft_voting(members: list[dict[str, Any]], seed: int, n_jobs: int = 1):
    """A soft-voting ensemble (mean of the members' class probabilities) of pipelines
    `make_pipeline(m["model"], seed, n_jobs, m["params"])`, all on one feature set."""
    from sklearn.ensemble import VotingClassifier

    estimators = [(f"m{i}", make_pipeline(m["model"], seed, n_jobs, m.get("params"))) for i, m in enumerate(members)]
    return VotingClassifier(estimators, voting="soft")


# The `base_model` of a stacked ensemble in the model choice's table; its `params` are
# {"members": [{"model", "params"}, ...], "folds": inner folds}.
STACKING = "stacking"


def inner_group_folds(groups: np.ndarray, y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """StratifiedGroupKFold splits of every row (augmented copies go with their subject, so
    the test sets partition the rows, as `cross_val_predict` needs): at most `folds`, at
    most the subjects of the rarest class (every fold's fit must see every class).

    Raises:
        ValueError: a class has fewer than two subjects."""
    from sklearn.model_selection import StratifiedGroupKFold

    per_class = [len(set(groups[y == c])) for c in np.unique(y)]
    k = min([folds, *per_class])
    if len(per_class) < 2 or k < 2:
        raise ValueError("a stacked ensemble's inner folds need two subjects of every class")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(train, test) for train, test in cv.split(np.zeros(len(y)), y, groups)]


def stacking(
    members: list[dict[str, Any]], seed: int, groups: np.ndarray, y: np.ndarray, folds: int = 5, n_jobs: int = 1
):
    """A stacked ensemble (Wolpert 1992) of pipelines `make_pipeline(m["model"], seed,
    n_jobs, m["params"])`: a logistic regression on their class probabilities, fitted on
    out-of-fold probabilities of inner subject-grouped folds of the rows it will be fitted
    on (`groups`, `y`: those rows' subjects and labels), so no subject's own probabilities
    teach the meta-learner."""
    from sklearn.ensemble import StackingClassifier
    from sklearn.linear_model import LogisticRegression

    estimators = [(f"m{i}", make_pipeline(m["model"], seed, n_jobs, m.get("params"))) for i, m in enumerate(members)]
    return StackingClassifier(
        estimators,
        final_estimator=LogisticRegression(max_iter=1000),
        cv=inner_group_folds(np.asarray(groups), np.asarray(y), folds, seed),
        stack_method="predict_proba",
    )


def build_model(
    name: str,
    seed: int,
    n_jobs: int = 1,
    params: dict[str, Any] | None = None,
    groups: np.ndarray | None = None,
    y: np.ndarray | None = None,
):
    """The estimator of a candidate: `make_pipeline`, or for `STACKING` a stacked ensemble
    whose inner folds follow `groups` (the subjects of the rows it will be fitted on)."""
    if name == STACKING:
        if groups is None or y is None:
            raise ValueError("a stacked ensemble needs the subjects and labels of its training rows")
        return stacking(params["members"], seed, groups, y, int(params.get("folds", 5)), n_jobs)
    return make_pipeline(name, seed, n_jobs, params)


def positive_scores(model, X: np.ndarray) -> np.ndarray | None:
    """Continuous scores for ROC AUC: P(positive) for binary (N,), class probabilities
    (N, C) for multi-class; `decision_function` where there are no probabilities; None if
    the model has neither."""
    for method in ("predict_proba", "decision_function"):
        if hasattr(model, method):
            try:
                scores = np.asarray(getattr(model, method)(X), dtype=np.float64)
            except (AttributeError, NotImplementedError, ValueError):
                continue
            if method == "predict_proba" and scores.ndim == 2 and scores.shape[1] == 2:
                return scores[:, 1]
            return scores
    return None


def roc_auc_from_scores(y_true: np.ndarray, scores: np.ndarray | None, classes: np.ndarray) -> float:
    """ROC AUC from continuous scores (one-vs-rest weighted for >2 classes); NaN when there
    are no scores or the truth holds a single class."""
    from sklearn.metrics import roc_auc_score

    if scores is None or len(np.unique(y_true)) < 2 or not np.isfinite(scores).all():
        return math.nan
    if scores.ndim == 1:
        return float(roc_auc_score(y_true == classes[1], scores))
    if scores.shape[1] == len(classes):
        return float(roc_auc_score(y_true, scores, multi_class="ovr", average="weighted", labels=classes))
    return math.nan


def classification_metrics(
    y: np.ndarray, pred: np.ndarray, scores: np.ndarray | None, classes: np.ndarray
) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC AUC (from `scores`, see `roc_auc_from_scores`) and
    weighted F1 of predictions `pred` against the truth `y` (both integer codes, (N,))."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    return {
        "Accuracy": float(accuracy_score(y, pred)),
        "Balanced Accuracy": float(balanced_accuracy_score(y, pred)),
        "ROC AUC": roc_auc_from_scores(y, scores, classes),
        "F1 Score": float(f1_score(y, pred, average="weighted")),
    }


def score_split(model, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The leaderboard metrics of a fitted model on one split."""
    classes = np.asarray(model.classes_) if hasattr(model, "classes_") else np.unique(y)
    return classification_metrics(y, model.predict(X), positive_scores(model, X), classes)


def score_probabilities(y: np.ndarray, probs: np.ndarray, pred: np.ndarray | None = None) -> dict[str, float]:
    """The leaderboard metrics of class probabilities `probs` (N x C, columns in code order),
    the labels being `pred` (codes, e.g. at a decision threshold) or else the most probable."""
    if len(y) == 0:
        return {"Accuracy": math.nan, "Balanced Accuracy": math.nan, "ROC AUC": math.nan, "F1 Score": math.nan}
    scores = probs[:, 1] if probs.shape[1] == 2 else probs
    return classification_metrics(y, probs.argmax(axis=1) if pred is None else pred, scores, np.arange(probs.shape[1]))


@dataclass
class SweepData:
    """Feature matrices (N x D float32) and integer labels (N,) for each split;
    `classes[k]` names code k (binary: the positive class, ALL, is code 1)."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: list[str] = field(default_factory=list)


def class_order(labels: np.ndarray, positive: str) -> list[str]:
    """Label names in code order: the positive class (ALL) last, so it is code 1 when binary."""
    names = sorted(set(map(str, labels)))
    if positive in names:
        names = [n for n in names if n != positive] + [positive]
    return names


def label_codes(labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """Each label's index in `classes` (int64), vectorised.

    Raises:
        ValueError: a label outside `classes`.
    """
    labels = np.asarray(labels).astype(str)
    codes = np.full(len(labels), -1, dtype=np.int64)
    for code, name in enumerate(classes):
        codes[labels == name] = code
    if (codes < 0).any():
        raise ValueError(f"labels outside {list(classes)}: {sorted(set(labels[codes < 0]))}")
    return codes


def positive_index(classes: list[str], positive: str) -> int:
    """The column of P(positive) in a probability matrix (the last class when it is absent)."""
    return classes.index(positive) if positive in classes else len(classes) - 1


def sweep_data(meta: pd.DataFrame, matrix: np.ndarray, positive: str = "all") -> SweepData:
    """Train on the training split including its augmented copies; validate and test on
    original images only. Labels are encoded as integers (XGBoost needs 0..C-1)."""
    original = meta["aug_index"].to_numpy() == 0
    pick = {
        TRAIN: (meta["split"] == TRAIN).to_numpy(),
        VAL: (meta["split"] == VAL).to_numpy() & original,
        TEST: (meta["split"] == TEST).to_numpy() & original,
    }
    labels = meta["label"].to_numpy().astype(str)
    classes = class_order(labels, positive)
    code = {name: i for i, name in enumerate(classes)}
    codes = np.fromiter((code[v] for v in labels), dtype=np.int64, count=len(labels))
    return SweepData(
        matrix[pick[TRAIN]], codes[pick[TRAIN]],
        matrix[pick[VAL]], codes[pick[VAL]],
        matrix[pick[TEST]], codes[pick[TEST]],
        classes=classes,
    )  # fmt: skip


def fit_and_score(
    name: str, data: SweepData, seed: int, n_jobs: int = 1, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fit one classifier on train, score it on val and test. Raises what the fit raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_pipeline(name, seed, n_jobs, params).fit(data.X_train, data.y_train)
        row = score_split(model, data.X_test, data.y_test)
        row["Val Balanced Accuracy"] = (
            score_split(model, data.X_val, data.y_val)["Balanced Accuracy"] if len(data.y_val) else math.nan
        )
    return row


def _child(conn, cpu_limit_s: float, fn: Callable[..., Any], args: tuple) -> None:
    """Run `fn(*args)` under a CPU-time limit and send ("ok", result) or ("failed", error)."""
    # RLIMIT_CPU counts this process's CPU seconds over all its threads, in whole seconds: the
    # kernel sends SIGXCPU at the soft limit (its default action ends the process) and
    # SIGKILL one second later, should SIGXCPU be caught.
    limit = max(1, math.ceil(cpu_limit_s))
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CPU, (limit, limit + 1))
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # everything a classifier can raise is a result here
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        conn.send(("failed", last[:500]))
    finally:
        conn.close()


def wall_backstop_s(cpu_limit_s: float) -> float:
    """Wall seconds after which a fit that is not using its CPU time (blocked, sleeping) is
    stopped anyway: far beyond what a loaded machine stretches a CPU-bound fit to."""
    return 10.0 * max(1.0, math.ceil(cpu_limit_s)) + 60.0


def run_limited(fn: Callable[..., Any], args: tuple, cpu_limit_s: float) -> tuple[str, Any, float]:
    """`fn(*args)` in a child process limited to `cpu_limit_s` seconds of CPU time.

    The child is forked from a fork server (`_fit_context`), not from this process: a fork
    of a process whose OpenMP runtime has started its thread pool (PyTorch, XGBoost or
    LightGBM used here before) deadlocks in the child's first parallel region (measured:
    XGBClassifier blocked in libgomp until the wall-time backstop). `fn` and `args` are
    pickled to the child.

    The limit is CPU time, not wall time, so that a loaded machine (other jobs sharing the
    cores) does not change which fits finish: a fit is stopped when it has computed for
    its limit, however long that took on the clock (see `wall_backstop_s` for fits that
    never compute).

    Returns:
        (status, payload, wall seconds): ("ok", result), ("failed", error text) or
        ("timeout", what stopped it).
    """
    ctx = _fit_context()
    receive, send = ctx.Pipe(duplex=False)
    start = time.perf_counter()
    child = ctx.Process(target=_child, args=(send, cpu_limit_s, fn, args), daemon=True)
    child.start()
    send.close()
    status, payload = "timeout", f"still running after the wall-time backstop of {wall_backstop_s(cpu_limit_s):g}s"
    if receive.poll(wall_backstop_s(cpu_limit_s)):
        try:
            status, payload = receive.recv()
        except EOFError:
            child.join(5)
            if child.exitcode == -signal.SIGXCPU:
                status, payload = "timeout", f"used its {max(1, math.ceil(cpu_limit_s))} s of CPU time"
            else:
                status, payload = "failed", f"the fit process died (exit code {child.exitcode})"
    elapsed = time.perf_counter() - start
    if child.is_alive():
        child.kill()
    child.join(5)
    receive.close()
    return status, payload, elapsed


# What the fork server imports once (its children inherit them), so that `Time Taken`
# measures the fit, not the imports; a module that does not import is skipped. Lazy Predict
# itself is not one (see `CLASSIFIER_HOMES`). The caller itself need not import them (a Ray
# Tune trial's process then pays the imports once, in its fork server).
FIT_MODULES = [
    "leukray.models.classifiers", "sklearn.metrics", "sklearn.model_selection", "sklearn.pipeline",
    "sklearn.preprocessing", "sklearn.impute", *CLASSIFIER_HOMES,
]  # fmt: skip


@functools.lru_cache(maxsize=1)
def _fit_context():
    """The multiprocessing context fits run in: children of a fork server, a fresh
    interpreter started once per process that has imported FIT_MODULES and never ran a
    fit, so no OpenMP or other thread state is inherited. The server is started (and its
    imports done) here, by one empty child, so no fit's `Time Taken` includes them."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FIT_MODULES)
    warm = ctx.Process(target=_no_op, daemon=True)
    warm.start()
    warm.join()
    return ctx


def _no_op() -> None:
    """The child that starts the fork server."""


def run_one(
    name: str, data: SweepData, seed: int, timeout_s: float, n_jobs: int = 1, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fit and score `name` in a child process limited to `timeout_s` CPU seconds (see
    `run_limited`).

    Returns:
        A leaderboard row: the metrics, `Time Taken` (wall seconds), `status` (ok | failed |
        timeout) and `detail` (the error, or the limit that was hit).
    """
    status, payload, elapsed = run_limited(fit_and_score, (name, data, seed, n_jobs, params), timeout_s)
    row: dict[str, Any] = {"Model": name, "Time Taken": round(elapsed, 3), "status": status, "detail": ""}
    metric_names = ["Accuracy", "Balanced Accuracy", "ROC AUC", "F1 Score", "Val Balanced Accuracy"]
    if status == "ok":
        row.update(payload)
        if math.isnan(row["ROC AUC"]):
            row["detail"] = "ROC AUC not computed: no finite predict_proba or decision_function scores"
    else:
        row.update({m: math.nan for m in metric_names})
        row["detail"] = payload if status == "failed" else f"exceeded sweep.timeout_s={timeout_s:g} CPU s: {payload}"
    return row


def leaderboard_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> the leaderboard, best balanced accuracy first; failed and timed-out last."""
    frame = pd.DataFrame(rows).reindex(columns=LEADERBOARD_COLUMNS)
    frame["_ok"] = frame["status"] == "ok"
    frame = frame.sort_values(["_ok", "Balanced Accuracy", "ROC AUC", "Model"], ascending=[False, False, False, True])
    return frame.drop(columns="_ok").reset_index(drop=True)


def has_probabilities(name: str, seed: int = 0) -> bool:
    """Whether the classifier's pipeline gives predict_proba (a screening needs P(ALL))."""
    return hasattr(make_pipeline(name, seed), "predict_proba")


def best_row(board: pd.DataFrame, has_val: bool, seed: int = 0) -> pd.Series | None:
    """The classifier to report: best validation balanced accuracy among those that give
    probabilities (the test split is only reported, never used to choose)."""
    ok = board[board["status"] == "ok"]
    ok = ok[[has_probabilities(n, seed) for n in ok["Model"]]]
    if ok.empty:
        return None
    key = "Val Balanced Accuracy" if has_val else "Balanced Accuracy"
    return ok.sort_values([key, "Model"], ascending=[False, True]).iloc[0]


@dataclass
class GroupedData:
    """Training and validation rows for cross-validation grouped by subject: `X` (N x D),
    integer labels `y`, `groups` (subject, or the image itself without one) and `original`
    (False for augmented copies, which train but are never scored)."""

    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    original: np.ndarray


def subject_groups(meta: pd.DataFrame) -> np.ndarray:
    """Each row's group: its subject, or the image itself when it has none."""
    subject = meta["subject"].astype(str).to_numpy()
    return np.where(subject != "", subject, meta["path"].astype(str).to_numpy())


def grouped_data(meta: pd.DataFrame, matrix: np.ndarray, classes: list[str]) -> GroupedData:
    """train (with its augmented copies) + validation originals of a feature table."""
    split, aug = meta["split"].to_numpy(), meta["aug_index"].to_numpy()
    pick = (split == TRAIN) | ((split == VAL) & (aug == 0))
    code = {name: i for i, name in enumerate(classes)}
    groups = subject_groups(meta)
    y = np.fromiter((code[v] for v in meta["label"].astype(str)), dtype=np.int64, count=len(meta))
    return GroupedData(matrix[pick], y[pick], groups[pick], aug[pick] == 0)


def grouped_folds(data: GroupedData, folds: int) -> int:
    """How many folds the data allows: at most `folds`, at most the subjects of the rarest class."""
    orig = data.original
    per_class = [len(set(data.groups[orig & (data.y == c)])) for c in np.unique(data.y[orig])]
    return min([folds, *per_class]) if len(per_class) > 1 else 0


def fold_ids(data: GroupedData, seed: int, folds: int) -> np.ndarray:
    """The StratifiedGroupKFold fold (0..k-1) of each original row of `data` (subjects never
    straddle folds); -1 for augmented copies, which only ever train."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = grouped_folds(data, folds)
    if k < 2:
        raise ValueError("too few subjects per class for grouped cross-validation")
    orig = np.flatnonzero(data.original)
    fold = np.full(len(data.y), -1, dtype=np.int64)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, test) in enumerate(cv.split(orig, data.y[orig], data.groups[orig])):
        fold[orig[test]] = i
    return fold


def fold_scores(y: np.ndarray, probs: np.ndarray, fold: np.ndarray) -> dict[str, Any]:
    """Balanced accuracy per fold of out-of-fold probabilities (N x C; rows with fold -1
    ignored): the mean, the standard deviation and the folds, as `grouped_cv` reports them."""
    from sklearn.metrics import balanced_accuracy_score

    k = int(fold.max()) + 1
    pred = probs.argmax(axis=1)
    scores = [balanced_accuracy_score(y[fold == i], pred[fold == i]) for i in range(k)]
    return {"CV Balanced Accuracy": float(np.mean(scores)), "CV sd": float(np.std(scores)), "cv_folds": k}


def grouped_cv(
    name: str,
    data: GroupedData,
    seed: int,
    folds: int,
    params: dict[str, Any] | None = None,
    n_jobs: int = 1,
    oof: bool = False,
) -> dict[str, Any]:
    """Balanced accuracy of `name` by StratifiedGroupKFold over subjects: each fold trains
    on the other subjects' rows (with their augmented copies) and scores this fold's
    originals. Returns the mean, the standard deviation and the folds used; with `oof`,
    also `oof` (N x C out-of-fold class probabilities, NaN for augmented rows) and `fold`
    (`fold_ids`), from which an ensemble of models with the same folds is scored exactly."""
    fold = fold_ids(data, seed, folds)
    k = int(fold.max()) + 1
    n_classes = int(data.y.max()) + 1
    probs = np.full((len(data.y), n_classes), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(k):
            held_out = np.isin(data.groups, np.unique(data.groups[fold == i]))
            train_groups, train_y = data.groups[~held_out], data.y[~held_out]
            model = build_model(name, seed, n_jobs, params, train_groups, train_y).fit(data.X[~held_out], train_y)
            rows = fold == i
            if hasattr(model, "predict_proba"):
                probs[np.ix_(rows, model.classes_)] = model.predict_proba(data.X[rows])
            else:  # hard labels as one-hot probabilities: balanced accuracy is still exact
                probs[rows] = np.eye(n_classes)[model.predict(data.X[rows])]
    result = fold_scores(data.y, np.nan_to_num(probs, nan=0.0), fold)
    if oof:
        result.update(oof=probs, fold=fold)
    return result


def run_grouped_cv(
    name: str,
    data: GroupedData,
    seed: int,
    folds: int,
    timeout_s: float,
    params: dict[str, Any] | None = None,
    n_jobs: int = 1,
    oof: bool = False,
) -> dict[str, Any]:
    """`grouped_cv` in a forked child limited to `timeout_s` CPU seconds per fold (see
    `run_limited`): the CV's result plus `status`, `detail` and `Time Taken`."""
    k = max(grouped_folds(data, folds), 1)
    status, payload, elapsed = run_limited(grouped_cv, (name, data, seed, folds, params, n_jobs, oof), timeout_s * k)
    row: dict[str, Any] = {"status": status, "detail": "", "Time Taken": round(elapsed, 3)}
    if status == "ok":
        row.update(payload)
    else:
        row.update({"CV Balanced Accuracy": math.nan, "CV sd": math.nan, "cv_folds": k})
        limit = f"exceeded {k} x sweep.timeout_s={timeout_s:g} CPU s"
        row["detail"] = payload if status == "failed" else f"{limit}: {payload}"
    return row


def subject_bootstrap(
    y: np.ndarray,
    probs: np.ndarray,
    subjects: np.ndarray,
    n_boot: int,
    seed: int,
    alpha: float = 0.05,
    pred: np.ndarray | None = None,
) -> dict[str, Any]:
    """Percentile intervals of balanced accuracy and ROC AUC by resampling subjects with
    replacement (all cells of a drawn subject come along: cells of one patient share a
    smear and a stain, so they are not independent). Resamples that lack a class are
    discarded and counted.

    A resample is a vector of subject multiplicities `w`, so both metrics come from
    per-subject tables computed once: balanced accuracy from cells and correct cells per
    subject and class, binary ROC AUC (Mann-Whitney) as `w @ M @ w / (pos(w) * neg(w))`
    with M[a, b] the positive cells of subject a scored above the negative cells of
    subject b (ties count half).

    Args:
        y: (N,) integer labels; probs: (N, C) class probabilities; subjects: (N,) groups;
            pred: (N,) predicted codes (default: the most probable class).

    Returns:
        {"Balanced Accuracy": [lo, hi], "ROC AUC": [lo, hi] (None for more than two
        classes), "level", "resamples" (used), "subjects"}; an interval is None when no
        resample was usable.
    """
    _, code = np.unique(np.asarray(subjects).astype(str), return_inverse=True)
    n_subjects, n_classes = (int(code.max()) + 1 if len(code) else 0), probs.shape[1]
    totals, correct = np.zeros((n_subjects, n_classes)), np.zeros((n_subjects, n_classes))
    np.add.at(totals, (code, y), 1.0)
    np.add.at(correct, (code, y), ((probs.argmax(axis=1) if pred is None else pred) == y).astype(float))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, max(n_subjects, 1), size=(n_boot if n_subjects else 0, n_subjects))
    w = np.stack([np.bincount(d, minlength=n_subjects) for d in draws]).astype(float) if len(draws) else draws
    support = w @ totals if len(draws) else np.zeros((0, n_classes))
    usable = (support > 0).all(axis=1)
    w, support = w[usable], support[usable]
    bacc = ((w @ correct) / np.where(support > 0, support, 1.0)).mean(axis=1)
    auc = None
    if n_classes == 2:
        pairs = _pair_wins(y, probs[:, 1], code, n_subjects)
        auc = np.einsum("ra,ab,rb->r", w, pairs, w) / (support[:, 1] * support[:, 0])

    def interval(values: np.ndarray | None) -> list[float] | None:
        if values is None or not len(values):
            return None
        return [float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))]

    return {
        "Balanced Accuracy": interval(bacc),
        "ROC AUC": interval(auc),
        "level": 1 - alpha,
        "resamples": int(usable.sum()),
        "subjects": n_subjects,
    }


def _pair_wins(y: np.ndarray, score: np.ndarray, code: np.ndarray, n_subjects: int) -> np.ndarray:
    """M[a, b]: pairs (positive cell of subject a, negative cell of subject b) where the
    positive scores higher, ties counting half."""
    wins = np.zeros((n_subjects, n_subjects))
    pos = y == 1
    for b in range(n_subjects):
        neg = np.sort(score[(code == b) & ~pos])
        if not len(neg):
            continue
        below = np.searchsorted(neg, score[pos], side="left")
        ties = np.searchsorted(neg, score[pos], side="right") - below
        np.add.at(wins[:, b], code[pos], below + 0.5 * ties)
    return wins


def _rates(positive: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of `score >= threshold` against the boolean truth."""
    called = score >= threshold
    sens = float(called[positive].mean()) if positive.any() else math.nan
    spec = float((~called[~positive]).mean()) if (~positive).any() else math.nan
    return sens, spec


def oof_threshold(positive: np.ndarray, score: np.ndarray, rule: tuple[str, float]) -> float:
    """The decision threshold on P(positive) a rule picks on out-of-fold predictions.

    Args:
        positive: (N,) bool truth; score: (N,) P(positive) of each row.
        rule: `leukray.config.parse_threshold_rule`'s (kind, value): `balanced` maximises
            balanced accuracy (ties: the threshold nearest 0.5); `sensitivity` keeps the
            sensitivity >= value with the highest threshold (the best specificity); `fixed`
            is the value itself.

    Returns:
        A threshold in [0, 1] half-way between two neighbouring scores, so the rows it splits
        are split the same way by any threshold in that gap.
    """
    kind, value = rule
    if kind == "fixed":
        return float(value)
    positive, score = np.asarray(positive, bool), np.asarray(score, np.float64)
    if not positive.any() or positive.all():
        raise ValueError("a threshold needs out-of-fold predictions of both classes")
    levels = np.unique(score)  # ascending; "called positive" = score >= level
    cuts = np.concatenate([[0.0], (levels[:-1] + levels[1:]) / 2, [min(1.0, levels[-1] + 1e-9)]])
    # positives/negatives at or above each cut, from sorted scores
    pos_sorted, neg_sorted = np.sort(score[positive]), np.sort(score[~positive])
    sens = 1.0 - np.searchsorted(pos_sorted, cuts, side="left") / len(pos_sorted)
    spec = np.searchsorted(neg_sorted, cuts, side="left") / len(neg_sorted)
    if kind == "sensitivity":
        ok = np.flatnonzero(sens >= value - 1e-12)
        return float(cuts[ok[-1]])
    bacc = (sens + spec) / 2
    best = np.flatnonzero(bacc >= bacc.max() - 1e-12)
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def threshold_record(
    y: np.ndarray, probs: np.ndarray, fold: np.ndarray, rule: tuple[str, float], positive_code: int
) -> dict[str, Any]:
    """The decision threshold of a rule on out-of-fold probabilities (N x C, rows of fold -1
    ignored), with what it gives there: pooled balanced accuracy, sensitivity and
    specificity at it and at 0.5, the per-fold mean ± sd at it, and an honest estimate of
    the choice (`crossfit`: each fold scored at the threshold chosen on the other folds;
    the in-sample figures are optimistic, the threshold was chosen on them)."""
    keep = fold >= 0
    positive, score, fold = y[keep] == positive_code, probs[keep, positive_code], fold[keep]
    threshold = oof_threshold(positive, score, rule)

    def at(t: float) -> dict[str, float]:
        sens, spec = _rates(positive, score, t)
        return {"balanced_accuracy": (sens + spec) / 2, "sensitivity": sens, "specificity": spec}

    k = int(fold.max()) + 1
    per_fold = [sum(_rates(positive[fold == i], score[fold == i], threshold)) / 2 for i in range(k)]
    crossfit = []
    for i in range(k):
        t = oof_threshold(positive[fold != i], score[fold != i], rule)
        crossfit.append(sum(_rates(positive[fold == i], score[fold == i], t)) / 2)
    return {
        "value": threshold,
        "rule": rule[0] if rule[0] != "sensitivity" else f"sensitivity:{rule[1]:g}",
        "oof": at(threshold),
        "oof_at_0.5": at(0.5),
        "cv_balanced_accuracy": float(np.mean(per_fold)),
        "cv_sd": float(np.std(per_fold)),
        "crossfit_cv_balanced_accuracy": float(np.mean(crossfit)),
        "crossfit_cv_sd": float(np.std(crossfit)),
    }


def threshold_labels(probs: np.ndarray, classes: list[str], positive_code: int, threshold: float | None) -> np.ndarray:
    """Predicted label names (N,) of probabilities (N x C): with two classes and a
    threshold, the positive class where P(positive) >= threshold; else the most probable."""
    names = np.asarray(classes, dtype=object)
    if threshold is None or probs.shape[1] != 2:
        return names[probs.argmax(axis=1)]
    return np.where(probs[:, positive_code] >= threshold, names[positive_code], names[1 - positive_code])


def choose_model(candidates: list[tuple[str, pd.Series | None]]) -> tuple[str, pd.Series] | None:
    """The (feature source, row) with the best validation balanced accuracy; the test split
    is not used."""
    scored = [(src, row) for src, row in candidates if row is not None and pd.notna(row["Val Balanced Accuracy"])]
    if not scored:
        return None
    return max(scored, key=lambda item: item[1]["Val Balanced Accuracy"])


def format_row(row: dict[str, Any]) -> str:
    def f(v):
        return "  -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    # The model is chosen on validation (or CV), so that score comes first; test is for the record.
    detail = str(row.get("detail") or "").strip().splitlines()
    tail = f"  ({detail[0][:120]})" if detail else ""
    return (
        f"[sweep] {row['Model']:<32} {row['status']:<7} val bal.acc {f(row.get('Val Balanced Accuracy'))}  "
        f"test bal.acc {f(row.get('Balanced Accuracy'))}  test roc auc {f(row.get('ROC AUC'))}  "
        f"{row.get('Time Taken') or 0:7.1f}s{tail}"
    )


def plain_json_value(value: Any) -> Any:
    """numpy scalars (Tune's samplers may return them) as Python numbers for JSON."""
    return value.item() if hasattr(value, "item") else str(value)
