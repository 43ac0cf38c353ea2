"""The classifier sweep (the paper's step 4, Table III): every classifier Lazy Predict's
`LazyClassifier` evaluates, one Ray Tune trial each, so the sweep spreads over every CPU of
every node.

Each classifier is Lazy Predict's pipeline (mean imputation, standard scaling, the
classifier with `random_state` set where it takes one), fitted on the training split and
scored on validation (which picks the best model) and test (which reports it). ROC AUC comes
from scores (`predict_proba`, else `decision_function`), never from hard labels: from labels
it equals balanced accuracy, as every row of the paper's tables shows.

A classifier is fitted in a forked child process, so that one past its wall-time limit is
killed outright (its CPU is freed at once) and recorded as `timeout`; one that raises is
recorded as `failed` with its error. Neither stops the sweep.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import time
import traceback
import warnings
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

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
    "BaggingClassifier", "AdaBoostClassifier", "LGBMClassifier", "XGBClassifier", "NuSVC", "SVC",
    "LinearDiscriminantAnalysis", "RandomForestClassifier", "CalibratedClassifierCV", "DecisionTreeClassifier",
    "LabelSpreading", "LabelPropagation", "RidgeClassifierCV", "ExtraTreesClassifier", "LinearSVC",
    "RidgeClassifier", "SGDClassifier", "KNeighborsClassifier",
]


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


def make_pipeline(name: str, seed: int, n_jobs: int = 1, params: dict[str, Any] | None = None):
    """Lazy Predict's pipeline for one classifier: imputer + scaler + classifier, with
    `params` (from a hyperparameter search) given to the classifier."""
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    cls = lazypredict_classifiers()[name]
    defaults = cls().get_params()
    kwargs: dict[str, Any] = {}
    if "random_state" in defaults:
        kwargs["random_state"] = seed
    module = getattr(cls, "__module__", "") or ""
    if "lightgbm" in module:
        kwargs.update(verbose=-1, n_jobs=n_jobs)
    if "xgboost" in module:
        kwargs.update(verbosity=0, n_jobs=n_jobs)
    return Pipeline(
        [
            ("imputer", SimpleImputer(strategy="mean")),
            ("scaler", StandardScaler()),
            ("classifier", cls(**{**kwargs, **(params or {})})),
        ]
    )


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


def score_split(model, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    pred = model.predict(X)
    classes = np.asarray(model.classes_) if hasattr(model, "classes_") else np.unique(y)
    return {
        "Accuracy": float(accuracy_score(y, pred)),
        "Balanced Accuracy": float(balanced_accuracy_score(y, pred)),
        "ROC AUC": roc_auc_from_scores(y, positive_scores(model, X), classes),
        "F1 Score": float(f1_score(y, pred, average="weighted")),
    }


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
    classes: list[str] = dataclasses.field(default_factory=list)


def fit_and_score(name: str, data: SweepData, seed: int, n_jobs: int = 1, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit one classifier on train, score it on val and test. Raises what the fit raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_pipeline(name, seed, n_jobs, params).fit(data.X_train, data.y_train)
        row = score_split(model, data.X_test, data.y_test)
        row["Val Balanced Accuracy"] = (
            score_split(model, data.X_val, data.y_val)["Balanced Accuracy"] if len(data.y_val) else math.nan
        )
    return row


def _child(conn, name: str, data: SweepData, seed: int, n_jobs: int, params: dict[str, Any] | None) -> None:
    try:
        conn.send(("ok", fit_and_score(name, data, seed, n_jobs, params)))
    except BaseException as exc:  # everything a classifier can raise is a result here
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        conn.send(("failed", last[:500]))
    finally:
        conn.close()


def run_one(
    name: str, data: SweepData, seed: int, timeout_s: float, n_jobs: int = 1, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fit and score `name` in a forked child with a wall-time limit.

    Returns:
        A leaderboard row: the metrics, `Time Taken`, `status` (ok | failed | timeout) and
        `detail` (the error, or the limit that was hit).
    """
    # Import Lazy Predict and scikit-learn here, once per process, so that the forked child
    # inherits them and `Time Taken` measures the fit, not the imports.
    lazypredict_classifiers()
    import sklearn.metrics  # noqa: F401
    import sklearn.pipeline  # noqa: F401

    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    start = time.perf_counter()
    child = ctx.Process(target=_child, args=(send, name, data, seed, n_jobs, params), daemon=True)
    child.start()
    send.close()
    status, payload = "timeout", None
    if receive.poll(timeout_s):
        try:
            status, payload = receive.recv()
        except EOFError:
            status, payload = "failed", f"the fit process died (exit code {child.exitcode})"
    elapsed = time.perf_counter() - start
    if child.is_alive():
        child.kill()
    child.join(5)
    row: dict[str, Any] = {"Model": name, "Time Taken": round(elapsed, 3), "status": status, "detail": ""}
    metric_names = ["Accuracy", "Balanced Accuracy", "ROC AUC", "F1 Score", "Val Balanced Accuracy"]
    if status == "ok":
        row.update(payload)
        if math.isnan(row["ROC AUC"]):
            row["detail"] = "ROC AUC not computed: no finite predict_proba or decision_function scores"
    else:
        row.update({m: math.nan for m in metric_names})
        row["detail"] = payload if status == "failed" else f"exceeded sweep.timeout_s={timeout_s:g}s"
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


def _run_trials(
    data: SweepData,
    fit_row: Callable[[dict[str, Any], SweepData], dict[str, Any]],
    param_space: dict[str, Any],
    tune_config: Any,
    *,
    run_name: str,
    storage_path: str,
    cpus_per_trial: float,
    on_result: Callable[[dict[str, Any]], None] | None,
    columns: list[str],
    failed_row: Callable[[dict[str, Any], str], dict[str, Any]],
) -> list[dict[str, Any]]:
    """The Ray Tune plumbing of the sweep and the search: each trial reports
    `fit_row(config, data)` and the node it ran on; returns one row (`columns`) per trial,
    a trial that reported nothing as `failed_row(config, detail)`.

    Needs a running Ray (`ray.init` or a cluster). Trial actors are reused: the fit itself
    runs in a child process, so nothing lingers in the actor.
    """
    from ray import tune

    # Tune's rich console output would interleave with our one line per finished trial.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

    def trial(config: dict[str, Any], data_ref=None) -> None:
        import ray

        tune.report({**fit_row(config, data_ref), "node_id": ray.get_runtime_context().get_node_id()})

    class PrintFinished(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if on_result is not None:
                on_result({k: result.get(k) for k in columns})

    trainable = tune.with_resources(tune.with_parameters(trial, data_ref=data), {"cpu": cpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=storage_path,
            verbose=0,
            callbacks=[PrintFinished()],
            # The trial function reports once and returns; checkpoints are not needed.
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )
    rows = []
    for result in tuner.fit():
        metrics = result.metrics or {}
        if "status" in metrics:
            rows.append({k: metrics.get(k) for k in columns})
        else:
            err = str(result.error).splitlines()[0][:300] if result.error else "no result reported"
            rows.append(failed_row(result.config or {}, f"trial error: {err}"))
    return rows


def run_sweep_tune(
    data: SweepData,
    names: list[str],
    seed: int,
    timeout_s: float,
    cpus_per_trial: float,
    storage_path: str,
    name: str = "sweep",
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """One Ray Tune trial per classifier (see `_run_trials`); returns the leaderboard."""
    from ray import tune

    n_jobs = max(1, int(cpus_per_trial))

    def fit_row(config: dict[str, Any], data_ref: SweepData) -> dict[str, Any]:
        return run_one(config["classifier"], data_ref, seed, timeout_s, n_jobs)

    rows = _run_trials(
        data, fit_row, {"classifier": tune.grid_search(names)}, tune.TuneConfig(reuse_actors=True),
        run_name=name, storage_path=storage_path, cpus_per_trial=cpus_per_trial, on_result=on_result,
        columns=LEADERBOARD_COLUMNS,
        failed_row=lambda config, detail: {"Model": config.get("classifier", "?"), "status": "failed", "detail": detail},
    )  # fmt: skip
    return leaderboard_frame(rows)


def format_row(row: dict[str, Any]) -> str:
    def f(v):
        return "  -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    tail = f"  ({row['detail']})" if row.get("detail") else ""
    return (
        f"[sweep] {row['Model']:<32} {row['status']:<7} bal.acc {f(row.get('Balanced Accuracy'))}  "
        f"roc auc {f(row.get('ROC AUC'))}  {row.get('Time Taken') or 0:7.1f}s{tail}"
    )


# -- fine-tuning the best classifier (the paper's step 6) -----------------------------------


def search_space(name: str) -> dict[str, Any] | None:
    """Ray Tune search space of a classifier's hyperparameters, or None when leukray has none
    for it. Ranges centre on each library's defaults; features arrive standardised."""
    from ray import tune

    trees = {
        "n_estimators": tune.choice([100, 200, 400]),
        "max_depth": tune.choice([None, 8, 16, 32]),
        "min_samples_leaf": tune.choice([1, 2, 4]),
        "max_features": tune.choice(["sqrt", "log2", 0.1]),
    }
    single_tree = {
        "max_depth": tune.choice([None, 4, 8, 16]),
        "min_samples_leaf": tune.choice([1, 2, 4, 8]),
        "criterion": tune.choice(["gini", "entropy"]),
    }
    spaces: dict[str, dict[str, Any]] = {
        "LogisticRegression": {"C": tune.loguniform(1e-4, 1e2)},
        "RandomForestClassifier": trees,
        "ExtraTreesClassifier": trees,
        "DecisionTreeClassifier": single_tree,
        "ExtraTreeClassifier": single_tree,
        "XGBClassifier": {
            "n_estimators": tune.choice([100, 200, 400]),
            "max_depth": tune.randint(2, 9),
            "learning_rate": tune.loguniform(0.01, 0.3),
            "subsample": tune.uniform(0.6, 1.0),
            "colsample_bytree": tune.uniform(0.3, 1.0),
        },
        "LGBMClassifier": {
            "n_estimators": tune.choice([100, 200, 400]),
            "num_leaves": tune.choice([15, 31, 63]),
            "learning_rate": tune.loguniform(0.01, 0.3),
            "subsample": tune.uniform(0.6, 1.0),
            "subsample_freq": 1,
            "colsample_bytree": tune.uniform(0.3, 1.0),
        },
        "KNeighborsClassifier": {"n_neighbors": tune.randint(3, 32), "weights": tune.choice(["uniform", "distance"])},
        "LinearDiscriminantAnalysis": {"solver": "lsqr", "shrinkage": tune.uniform(0.0, 1.0)},
        "QuadraticDiscriminantAnalysis": {"reg_param": tune.uniform(0.0, 1.0)},
        "GaussianNB": {"var_smoothing": tune.loguniform(1e-12, 1e-3)},
        "BernoulliNB": {"alpha": tune.loguniform(1e-3, 10.0), "binarize": tune.uniform(0.0, 1.0)},
        "AdaBoostClassifier": {"n_estimators": tune.choice([50, 100, 200]), "learning_rate": tune.loguniform(0.01, 2.0)},
        "BaggingClassifier": {
            "n_estimators": tune.choice([10, 20, 50]),
            "max_samples": tune.uniform(0.5, 1.0),
            "max_features": tune.uniform(0.3, 1.0),
        },
    }
    return spaces.get(name)


def best_tunable_row(board: pd.DataFrame, has_val: bool, seed: int = 0) -> pd.Series | None:
    """The best classifier of a leaderboard (by validation balanced accuracy) that gives
    probabilities and has a search space."""
    ok = board[(board["status"] == "ok") & board["Model"].map(lambda n: search_space(n) is not None)]
    return best_row(ok, has_val, seed) if not ok.empty else None


def run_search_tune(
    data: SweepData,
    name: str,
    trials: int,
    seed: int,
    timeout_s: float,
    cpus_per_trial: float,
    storage_path: str,
    run_name: str = "tuning",
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Random search (seeded) over `search_space(name)`, one Ray Tune trial per setting,
    each fitted on train and scored on validation and test like the sweep.

    Returns:
        One row per trial: the leaderboard columns plus `params` (JSON), best validation
        balanced accuracy first. The test columns are reported, never used to choose.
    """
    import json

    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    space = search_space(name)
    if space is None:
        raise ConfigError(f"no hyperparameter search space for {name}")
    n_jobs = max(1, int(cpus_per_trial))

    def fit_row(config: dict[str, Any], data_ref: SweepData) -> dict[str, Any]:
        row = run_one(name, data_ref, seed, timeout_s, n_jobs, params=config)
        return {**row, "params": json.dumps(config, sort_keys=True, default=_plain)}

    rows = _run_trials(
        data, fit_row, space,
        tune.TuneConfig(num_samples=trials, reuse_actors=True, search_alg=BasicVariantGenerator(random_state=seed)),
        run_name=run_name, storage_path=storage_path, cpus_per_trial=cpus_per_trial, on_result=on_result,
        columns=[*LEADERBOARD_COLUMNS, "params"],
        failed_row=lambda config, detail: {
            "Model": name, "status": "failed", "detail": detail, "params": json.dumps(config, sort_keys=True, default=str),
        },
    )  # fmt: skip
    frame = pd.DataFrame(rows).reindex(columns=[*LEADERBOARD_COLUMNS, "params"])
    frame["_ok"] = frame["status"] == "ok"
    frame = frame.sort_values(["_ok", "Val Balanced Accuracy", "params"], ascending=[False, False, True])
    return frame.drop(columns="_ok").reset_index(drop=True)


def _plain(value: Any) -> Any:
    """numpy scalars (Tune's samplers may return them) as Python numbers for JSON."""
    return value.item() if hasattr(value, "item") else str(value)
