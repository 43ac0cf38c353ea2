"""The classifier sweep and the hyperparameter search as Ray Tune trials, one per
classifier or setting, spread over every CPU of every node (the paper's steps 4 and 6).
Each trial fits in a forked child with a wall-time limit (`leukray.models.classifiers`).

May import: Ray, `leukray.models.classifiers`, `leukray.errors`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import pandas as pd

from leukray.errors import ConfigError
from leukray.models.classifiers import (
    LEADERBOARD_COLUMNS,
    GroupedData,
    SweepData,
    best_row,
    grouped_cv,
    leaderboard_frame,
    plain_json_value,
    run_one,
)


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
        failed_row=lambda config, detail: {
            "Model": config.get("classifier", "?"), "status": "failed", "detail": detail,
        },
    )  # fmt: skip
    return leaderboard_frame(rows)


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
        "AdaBoostClassifier": {
            "n_estimators": tune.choice([50, 100, 200]),
            "learning_rate": tune.loguniform(0.01, 2.0),
        },
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
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    space = search_space(name)
    if space is None:
        raise ConfigError(f"no hyperparameter search space for {name}")
    n_jobs = max(1, int(cpus_per_trial))

    def fit_row(config: dict[str, Any], data_ref: SweepData) -> dict[str, Any]:
        row = run_one(name, data_ref, seed, timeout_s, n_jobs, params=config)
        return {**row, "params": json.dumps(config, sort_keys=True, default=plain_json_value)}

    rows = _run_trials(
        data, fit_row, space,
        tune.TuneConfig(num_samples=trials, reuse_actors=True, search_alg=BasicVariantGenerator(random_state=seed)),
        run_name=run_name, storage_path=storage_path, cpus_per_trial=cpus_per_trial, on_result=on_result,
        columns=[*LEADERBOARD_COLUMNS, "params"],
        failed_row=lambda config, detail: {
            "Model": name, "status": "failed", "detail": detail,
            "params": json.dumps(config, sort_keys=True, default=str),
        },
    )  # fmt: skip
    frame = pd.DataFrame(rows).reindex(columns=[*LEADERBOARD_COLUMNS, "params"])
    frame["_ok"] = frame["status"] == "ok"
    frame = frame.sort_values(["_ok", "Val Balanced Accuracy", "params"], ascending=[False, False, True])
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
) -> pd.DataFrame:
    """Subject-grouped cross-validation of each candidate (`source`, `Model`, `params` JSON
    or None), one Ray Tune trial each; best CV balanced accuracy first."""
    from ray import tune

    n_jobs = max(1, int(cpus_per_trial))

    def fit_row(config: dict[str, Any], data_ref: dict[str, GroupedData]) -> dict[str, Any]:
        candidate = candidates[config["candidate"]]
        params = json.loads(candidate["params"]) if candidate["params"] else None
        row = {**candidate, "status": "ok", "detail": ""}
        try:
            row.update(grouped_cv(candidate["base_model"], data_ref[candidate["source"]], seed, folds, params, n_jobs))
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot be cross-validated is a result
            row.update(status="failed", detail=f"{type(exc).__name__}: {str(exc)[:200]}")
        return row

    def failed_row(config: dict[str, Any], detail: str) -> dict[str, Any]:
        return {**candidates[config.get("candidate", 0)], "status": "failed", "detail": detail}

    space = {"candidate": tune.grid_search(list(range(len(candidates))))}
    rows = _run_trials(
        data, fit_row, space, tune.TuneConfig(reuse_actors=True),
        run_name="model_choice", storage_path=storage_path, cpus_per_trial=cpus_per_trial, on_result=on_result,
        columns=[*CV_COLUMNS, "base_model"], failed_row=failed_row,
    )  # fmt: skip
    frame = pd.DataFrame(rows).reindex(columns=[*CV_COLUMNS, "base_model"])
    frame["_ok"] = frame["status"] == "ok"
    frame = frame.sort_values(["_ok", "CV Balanced Accuracy", "Model"], ascending=[False, False, True])
    return frame.drop(columns="_ok").reset_index(drop=True)
