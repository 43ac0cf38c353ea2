"""The classifier sweep, the hyperparameter search and the model choice's cross-validation
as Ray Tune trials, one per classifier or setting, spread over every CPU of every node (the
paper's steps 4 and 6). Each trial fits in a forked child with a CPU-time limit
(`leukray.models.classifiers.run_limited`).

The search is Optuna's TPE (seeded) through Ray Tune's `OptunaSearch`, over a define-by-run
space: a candidate classifier of the sweeps' best, then its hyperparameters, class weights,
scaler and trunk-block reduction. Every trial is scored by subject-grouped cross-validation
over train+val; the test split never reaches it. The experiment is named by a fingerprint of
everything it depends on and resumes with `Tuner.restore`. There is no ASHA scheduler: a
trial is one cross-validation whose folds are fitted in a child process and reported once,
so there are no intermediate results (boosting rounds, epochs) to stop early on.

May import: Ray, Optuna, numpy, pandas, `leukray.models.classifiers`, `leukray.errors`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import numpy as np
import pandas as pd

from leukray.errors import ConfigError
from leukray.models.classifiers import (
    LEADERBOARD_COLUMNS,
    GroupedData,
    SweepData,
    best_row,
    leaderboard_frame,
    plain_json_value,
    run_grouped_cv,
    run_one,
)


def _run_trials(
    data: Any,
    fit_row: Callable[[dict[str, Any], Any], dict[str, Any]],
    param_space: dict[str, Any],
    tune_config: Any,
    *,
    run_name: str,
    storage_path: str,
    cpus_per_trial: float,
    on_result: Callable[[dict[str, Any]], None] | None,
    columns: list[str],
    failed_row: Callable[[dict[str, Any], str], dict[str, Any]],
    restore: bool = False,
) -> list[dict[str, Any]]:
    """The Ray Tune plumbing of the sweep and the search: each trial reports
    `fit_row(config, data)` and the node it ran on; returns one row (`columns`) per trial,
    a trial that reported nothing as `failed_row(config, detail)`. With `restore`, an
    experiment of this name already in `storage_path` is resumed (`Tuner.restore`):
    finished trials are kept, unfinished ones run.

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
    path = storage_path.rstrip("/") + "/" + run_name
    if restore and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
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
        failed_row=lambda config, detail: {
            "Model": config.get("classifier", "?"), "status": "failed", "detail": detail,
        },
    )  # fmt: skip
    return leaderboard_frame(rows)


# A search space is a dict of hyperparameter -> spec: ("choice", [values]), ("int", lo, hi),
# ("log", lo, hi) (log-uniform float), ("float", lo, hi), or a constant. `suggest` turns it
# into Optuna suggestions; keeping it plain data lets tests and docs read it.
_TREES: dict[str, Any] = {
    "n_estimators": ("choice", [100, 200, 400]),
    "max_depth": ("choice", [None, 8, 16, 32]),
    "min_samples_leaf": ("choice", [1, 2, 4]),
    "max_features": ("choice", ["sqrt", "log2", 0.1]),
}
_SINGLE_TREE: dict[str, Any] = {
    "max_depth": ("choice", [None, 4, 8, 16]),
    "min_samples_leaf": ("choice", [1, 2, 4, 8]),
    "criterion": ("choice", ["gini", "entropy"]),
}
_SPACES: dict[str, dict[str, Any]] = {
    "LogisticRegression": {"C": ("log", 1e-4, 1e2), "max_iter": 2000},
    "RandomForestClassifier": _TREES,
    "ExtraTreesClassifier": _TREES,
    "DecisionTreeClassifier": _SINGLE_TREE,
    "ExtraTreeClassifier": _SINGLE_TREE,
    "XGBClassifier": {
        "n_estimators": ("choice", [100, 200, 400]),
        "max_depth": ("int", 2, 8),
        "learning_rate": ("log", 0.01, 0.3),
        "subsample": ("float", 0.6, 1.0),
        "colsample_bytree": ("float", 0.3, 1.0),
    },
    "LGBMClassifier": {
        "n_estimators": ("choice", [100, 200, 400]),
        "num_leaves": ("choice", [15, 31, 63]),
        "learning_rate": ("log", 0.01, 0.3),
        "subsample": ("float", 0.6, 1.0),
        "subsample_freq": 1,
        "colsample_bytree": ("float", 0.3, 1.0),
    },
    "KNeighborsClassifier": {"n_neighbors": ("int", 3, 31), "weights": ("choice", ["uniform", "distance"])},
    "LinearDiscriminantAnalysis": {"solver": "lsqr", "shrinkage": ("float", 0.0, 1.0)},
    "QuadraticDiscriminantAnalysis": {"reg_param": ("float", 0.0, 1.0)},
    "GaussianNB": {"var_smoothing": ("log", 1e-12, 1e-3)},
    "BernoulliNB": {"alpha": ("log", 1e-3, 10.0), "binarize": ("float", 0.0, 1.0)},
    "AdaBoostClassifier": {"n_estimators": ("choice", [50, 100, 200]), "learning_rate": ("log", 0.01, 2.0)},
    "BaggingClassifier": {
        "n_estimators": ("choice", [10, 20, 50]),
        "max_samples": ("float", 0.5, 1.0),
        "max_features": ("float", 0.3, 1.0),
    },
}


def search_space(name: str, block: int = 0, rows: int = 1_000_000) -> dict[str, Any] | None:
    """The search space of a classifier, or None when leukray has none for it. Ranges centre
    on each library's defaults. Beside the classifier's own hyperparameters: class weights
    (none or balanced) where the classifier takes them, the scaler, and with a column
    `block` (the 2,048-d trunk features) its reduction (none, PCA or the k best by ANOVA F)
    to fewer dimensions than the block and than a quarter of the `rows` cross-validated (a
    fold trains on about half of them at the least; PCA needs more rows than components)
    (see `leukray.models.classifiers.PREP_KEYS`)."""
    from leukray.models.classifiers import classifier_class

    if name not in _SPACES:
        return None
    space = dict(_SPACES[name])
    if "class_weight" in classifier_class(name)().get_params():
        space["class_weight"] = ("choice", [None, "balanced"])
    space["prep_scaler"] = ("choice", ["standard", "robust"])
    dims = [d for d in (8, 32, 64, 128, 256) if d < block and d <= rows // 4]
    if dims:
        space.update(prep_block=block, prep_reduce=("choice", ["none", "pca", "kbest"]), prep_dim=("choice", dims))
    return space


def suggest(trial: Any, space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Draw one setting of `space` from an Optuna trial (parameters named `prefix + key`);
    returns the setting (unprefixed), constants included."""
    drawn: dict[str, Any] = {}
    for key, spec in space.items():
        name = prefix + key
        if not isinstance(spec, tuple):
            drawn[key] = spec
        elif spec[0] == "choice":
            drawn[key] = trial.suggest_categorical(name, spec[1])
        elif spec[0] == "int":
            drawn[key] = trial.suggest_int(name, spec[1], spec[2])
        elif spec[0] in ("log", "float"):
            drawn[key] = trial.suggest_float(name, spec[1], spec[2], log=spec[0] == "log")
        else:
            raise ValueError(f"unknown search-space spec {spec!r} for {key}")
    return drawn


def tunable(name: str) -> bool:
    """Whether `name` has a search space."""
    return name in _SPACES


def best_tunable_row(board: pd.DataFrame, has_val: bool, seed: int = 0) -> pd.Series | None:
    """The best classifier of a leaderboard (by validation balanced accuracy) that gives
    probabilities and has a search space."""
    ok = board[(board["status"] == "ok") & board["Model"].map(tunable)]
    return best_row(ok, has_val, seed) if not ok.empty else None


class _DefineByRun:
    """Optuna's define-by-run space of a search: a candidate classifier, then its own
    hyperparameters (named `c<index>__<key>`, as Optuna wants one distribution per name).
    A class, not a closure: Tune pickles the searcher's state to resume it."""

    def __init__(self, labels: list[str], spaces: list[dict[str, Any]]):
        self.labels, self.spaces = labels, spaces

    def __call__(self, trial: Any) -> dict[str, Any]:
        i = self.labels.index(trial.suggest_categorical("candidate", self.labels))
        suggest(trial, self.spaces[i], prefix=f"c{i}__")
        return {"index": i}


SEARCH_COLUMNS = [
    "source", "Model", "params", "CV Balanced Accuracy", "CV sd", "cv_folds", "Time Taken", "status", "detail",
    "node_id", "trial_id",
]  # fmt: skip


def search_fingerprint(candidates: list[dict[str, Any]], data: dict[str, GroupedData], settings: dict) -> str:
    """A short hash of what a search depends on (candidates, settings, every feature, label
    and group), so that a resumed search is only ever this very search."""
    h = hashlib.sha256(json.dumps([candidates, settings], sort_keys=True, default=str).encode())
    for source in sorted(data):
        for array in (data[source].X, data[source].y, data[source].groups.astype(str), data[source].original):
            h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:12]


def _search_trial(
    candidates: list[dict[str, Any]], spaces: list[dict[str, Any]], seed: int, folds: int, timeout_s: float, n_jobs: int
) -> tuple[Callable[..., dict[str, Any]], Callable[..., dict[str, Any]]]:
    """The trial function of `run_search_tune` (one setting scored by subject-grouped CV,
    folds shuffled with `seed + 1`) and the row of a trial that failed."""

    def setting(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        i = config["index"]
        drawn = {k[len(f"c{i}__") :]: v for k, v in config.items() if k.startswith(f"c{i}__")}
        constants = {k: v for k, v in spaces[i].items() if not isinstance(v, tuple)}
        return candidates[i], {**drawn, **constants}

    def fit_row(config: dict[str, Any], data_ref: dict[str, GroupedData]) -> dict[str, Any]:
        candidate, params = setting(config)
        row = run_grouped_cv(
            candidate["Model"], data_ref[candidate["source"]], seed + 1, folds, timeout_s, params, n_jobs
        )
        ok = row["status"] == "ok"
        return {
            **row, "source": candidate["source"], "Model": candidate["Model"],
            "params": json.dumps(params, sort_keys=True, default=plain_json_value),
            "objective": row["CV Balanced Accuracy"] if ok else 0.0,  # what Optuna maximises
        }  # fmt: skip

    def failed_row(config: dict[str, Any], detail: str) -> dict[str, Any]:
        candidate, params = setting(config) if "index" in config else ({"source": "?", "Model": "?"}, {})
        return {"source": candidate["source"], "Model": candidate["Model"], "status": "failed", "detail": detail,
                "params": json.dumps(params, sort_keys=True, default=str)}  # fmt: skip

    return fit_row, failed_row


def run_search_tune(
    candidates: list[dict[str, Any]],
    data: dict[str, GroupedData],
    trials: int,
    seed: int,
    folds: int,
    timeout_s: float,
    cpus_per_trial: float,
    storage_path: str,
    run_name: str = "tuning",
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Optuna's TPE (through Ray Tune's `OptunaSearch`, seeded) over the classifiers
    `candidates` (`source`, `Model`, `block`: the trunk columns of its features) and their
    `search_space`s: `trials` Ray Tune trials in all, one per setting, as many at once as the
    cluster has CPUs. Each trial is scored by subject-grouped cross-validation
    (StratifiedGroupKFold over train+val, shuffled with `seed + 1` so that the model choice,
    which uses `seed`, re-scores the winner on other folds); the test split is never seen.
    The experiment (RUN/tune/<run_name>-<fingerprint>) resumes with `Tuner.restore` when
    the same search is run again.

    Returns:
        One row per trial (`SEARCH_COLUMNS`; `params` JSON with the preprocessing keys),
        best CV balanced accuracy first.
    """
    import optuna
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    labels = [f"{c['Model']} on {c['source']}" for c in candidates]
    spaces = [search_space(c["Model"], c.get("block", 0), len(data[c["source"]].y)) for c in candidates]
    if not candidates or any(space is None for space in spaces):
        raise ConfigError(f"no hyperparameter search space for {[c['Model'] for c in candidates]}")
    n_jobs = max(1, int(cpus_per_trial))
    settings = {"trials": trials, "seed": seed, "folds": folds, "timeout_s": timeout_s, "n_jobs": n_jobs}

    fit_row, failed_row = _search_trial(candidates, spaces, seed, folds, timeout_s, n_jobs)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, trials // 3)))
    parallel = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_trial))
    # Batches of `parallel` trials, each batch asked only once the previous one has finished:
    # TPE then always conditions on the same finished trials, so the same search on the same
    # cluster size suggests the same settings however the trials happen to finish.
    searcher = OptunaSearch(_DefineByRun(labels, spaces), metric="objective", mode="max", sampler=sampler)
    tune_config = tune.TuneConfig(
        num_samples=trials, reuse_actors=True,
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=parallel, batch=True),
    )  # fmt: skip
    rows = _run_trials(
        data, fit_row, {}, tune_config,
        run_name=f"{run_name}-{search_fingerprint(labels, data, settings)}", storage_path=storage_path,
        cpus_per_trial=cpus_per_trial, on_result=on_result, columns=SEARCH_COLUMNS, failed_row=failed_row,
        restore=True,
    )  # fmt: skip
    frame = pd.DataFrame(rows).reindex(columns=SEARCH_COLUMNS)
    frame["_ok"] = frame["status"] == "ok"
    frame = frame.sort_values(["_ok", "CV Balanced Accuracy", "params"], ascending=[False, False, True])
    return frame.drop(columns="_ok").reset_index(drop=True)


CV_COLUMNS = ["source", "Model", "params", "CV Balanced Accuracy", "CV sd", "cv_folds", "status", "detail", "node_id"]


def run_cv_tune(
    candidates: list[dict[str, Any]],
    data: dict[str, GroupedData],
    seed: int,
    folds: int,
    cpus_per_trial: float,
    storage_path: str,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float = 600.0,
    run_name: str = "model_choice",
) -> pd.DataFrame:
    """Subject-grouped cross-validation of each candidate (`source`, `Model`, `base_model`,
    `params` JSON or None; `base_model` `STACKING` is a stacked ensemble, see
    `leukray.models.classifiers.build_model`), one Ray Tune trial each, limited to
    `timeout_s` CPU seconds per fold; best CV balanced accuracy first. Beside `CV_COLUMNS`,
    `oof` and `fold` hold each candidate's out-of-fold probabilities and folds over the
    original rows (for ensembles and the decision threshold)."""
    from ray import tune

    n_jobs = max(1, int(cpus_per_trial))

    def fit_row(config: dict[str, Any], data_ref: dict[str, GroupedData]) -> dict[str, Any]:
        candidate = candidates[config["candidate"]]
        params = json.loads(candidate["params"]) if candidate["params"] else None
        grouped = data_ref[candidate["source"]]
        row = run_grouped_cv(candidate["base_model"], grouped, seed, folds, timeout_s, params, n_jobs, oof=True)
        if row["status"] == "ok":
            row["oof"] = row["oof"][grouped.original].tolist()
            row["fold"] = row["fold"][grouped.original].tolist()
        return {**candidate, **row}

    def failed_row(config: dict[str, Any], detail: str) -> dict[str, Any]:
        return {**candidates[config.get("candidate", 0)], "status": "failed", "detail": detail}

    space = {"candidate": tune.grid_search(list(range(len(candidates))))}
    columns = [*CV_COLUMNS, "base_model", "oof", "fold"]
    rows = _run_trials(
        data, fit_row, space, tune.TuneConfig(reuse_actors=True),
        run_name=run_name, storage_path=storage_path, cpus_per_trial=cpus_per_trial, on_result=on_result,
        columns=columns, failed_row=failed_row,
    )  # fmt: skip
    frame = pd.DataFrame(rows).reindex(columns=columns)
    frame["_ok"] = frame["status"] == "ok"
    frame = frame.sort_values(["_ok", "CV Balanced Accuracy", "Model"], ascending=[False, False, True])
    return frame.drop(columns="_ok").reset_index(drop=True)
