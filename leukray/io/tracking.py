"""Experiment tracking: a finished run folder logged to MLflow.

One MLflow run per leukray run, named after the run folder: the resolved config as params;
the weights, data fingerprint, positive label and chosen model as tags; the chosen model's
test metrics, its cross-validated score and the timings as metrics; the head's training
curve (history.csv) as per-epoch metrics; one nested run per classifier of every sweep
(leaderboard*.csv, custom_leaderboard.csv) and per fine-tuning trial (tuning.csv); the
tables, summary, config, bundle description and report as artifacts.

It reads what the stages wrote (local or URI, through `leukray.io.storage`), so the same
call logs a run that just finished (`leukray run --tracking.mlflow URI`) or any earlier
one (`leukray track RUN --tracking.mlflow URI`), including runs whose stages ran as
separate jobs on a cluster. The model weights themselves are not uploaded (the trunk is
~100 MB); `model/bundle.json` records their sha256.

MLflow's file store (``file:`` URIs and plain paths) is in maintenance mode and refuses to
open unless ``MLFLOW_ALLOW_FILE_STORE=true``; asking for one explicitly sets that flag for
this process. A server URI (``http://…``) or a database URI works as MLflow documents.

May import: pandas, yaml, mlflow (lazily: an optional dependency),
`leukray.errors`, `leukray.io.*`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pandas as pd
import yaml

from leukray.errors import ConfigError, DataError
from leukray.io import storage
from leukray.io.tables import log, read_csv, read_json

# Sweep tables: the leaderboard file name -> the feature set it was scored on comes from
# summary.json's `feature_sets`; the custom head's table is always this file.
CUSTOM_BOARD = "custom_leaderboard.csv"
BOARD_METRICS = (
    "Accuracy",
    "Balanced Accuracy",
    "ROC AUC",
    "F1 Score",
    "Val Balanced Accuracy",
    "Time Taken",
)
ARTIFACTS = (
    "summary.json",
    "config.yaml",
    "leaderboard.md",
    "model_choice.csv",
    "tuning.csv",
    "history.csv",
    "errors.csv",
    "report.html",
    "report.md",
    "model/bundle.json",
)
MAX_PARAM_CHARS = 500  # MLflow refuses longer param values (6,000 chars) on some stores


def resolve_uri(setting: str) -> str:
    """`tracking.mlflow` -> the tracking URI, or "" when tracking is off.

    "" is off; "env" takes MLFLOW_TRACKING_URI (a one-line error when unset); anything
    else is the URI (a plain path becomes a ``file:`` URI).
    """
    setting = setting.strip()
    if not setting:
        return ""
    if setting == "env":
        uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if not uri:
            raise ConfigError("tracking.mlflow is 'env' but MLFLOW_TRACKING_URI is not set")
        return uri
    if "://" not in setting and not setting.startswith("file:"):
        return "file:" + os.path.abspath(setting)
    return setting


def _import_mlflow():
    try:
        import mlflow
    except ImportError as exc:
        raise ConfigError("tracking.mlflow needs MLflow: pip install 'leukray[tracking]' (or mlflow-skinny)") from exc
    return mlflow


def check(setting: str) -> None:
    """Before a run starts: a tracking URI that resolves and an importable MLflow, so a
    missing package is said in one line now rather than after an hour of work."""
    if resolve_uri(setting):
        _import_mlflow()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"epochs": 50}} -> {"train.epochs": "50"} (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_CHARS]
    return flat


def _read_optional_csv(out: str, name: str) -> pd.DataFrame | None:
    path = storage.join(out, name)
    return read_csv(path) if storage.exists(path) else None


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None


def run_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The parent run's metrics from summary.json: the chosen model's test metrics, its
    validation and CV scores, inference time per image and the stage timings."""
    chosen = summary.get("chosen_model") or {}
    metrics: dict[str, Any] = {f"test_{k}": v for k, v in (chosen.get("test") or {}).items()}
    metrics["val_balanced_accuracy"] = chosen.get("val_balanced_accuracy")
    metrics["cv_balanced_accuracy"] = chosen.get("cv_balanced_accuracy")
    metrics["cv_sd"] = chosen.get("cv_sd")
    for key, value in (summary.get("inference_seconds_per_image") or {}).items():
        metrics[f"inference_s_per_image_{key}"] = value
    for key, value in (summary.get("seconds") or {}).items():
        metrics[f"seconds_{key}"] = value
    clean = {_metric_key(k): _finite(v) for k, v in metrics.items()}
    return {k: v for k, v in clean.items() if v is not None}


def _metric_key(name: str) -> str:
    """ "Balanced Accuracy" -> "balanced_accuracy" (MLflow keys allow alphanumerics and _ - . /)."""
    return "".join(c if c.isalnum() or c in "_-./" else "_" for c in str(name).strip().lower())


def sweep_boards(out: str, summary: dict[str, Any]) -> list[tuple[str, pd.DataFrame]]:
    """(feature set, leaderboard) for every sweep the run wrote."""
    boards = []
    for table in summary.get("feature_sets") or []:
        frame = _read_optional_csv(out, table["file"])
        if frame is not None:
            boards.append((str(table["features"]), frame))
    custom = _read_optional_csv(out, CUSTOM_BOARD) if summary.get("custom_model") else None
    if custom is not None:
        boards.append(("custom", custom))
    return boards


def _log_board(mlflow, features: str, board: pd.DataFrame) -> int:
    for _, row in board.iterrows():
        with mlflow.start_run(run_name=f"sweep/{features}/{row['Model']}", nested=True):
            mlflow.set_tags({"leukray.kind": "sweep", "leukray.features": features})
            mlflow.log_params({"classifier": row["Model"], "status": row.get("status", "")})
            values = {_metric_key(m): _finite(row.get(m)) for m in BOARD_METRICS}
            mlflow.log_metrics({k: v for k, v in values.items() if v is not None})
    return len(board)


def _log_tuning(mlflow, trials: pd.DataFrame) -> int:
    for i, row in trials.reset_index(drop=True).iterrows():
        with mlflow.start_run(run_name=f"tune/{i}", nested=True):
            mlflow.set_tag("leukray.kind", "tuning")
            numeric = {_metric_key(k): _finite(v) for k, v in row.items()}
            mlflow.log_metrics({k: v for k, v in numeric.items() if v is not None})
            mlflow.log_params({str(k)[:250]: str(v)[:MAX_PARAM_CHARS] for k, v in row.items() if _finite(v) is None})
    return len(trials)


def _log_history(mlflow, history: pd.DataFrame) -> None:
    for _, row in history.iterrows():
        step = int(row["epoch"])
        values = {f"head_{k}": _finite(v) for k, v in row.items() if k != "epoch"}
        mlflow.log_metrics({k: v for k, v in values.items() if v is not None}, step=step)


def _log_artifacts(mlflow, out: str) -> list[str]:
    logged = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ARTIFACTS:
            source = storage.join(out, name)
            if not storage.exists(source):
                continue
            local = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as fh:
                fh.write(storage.read_bytes(source))
            mlflow.log_artifact(local, artifact_path=os.path.dirname(name) or None)
            logged.append(name)
    return logged


def _run_tags(out: str, summary: dict[str, Any]) -> dict[str, str]:
    weights = summary.get("weights") or {}
    chosen = summary.get("chosen_model") or {}
    return {
        "leukray.out": out,
        "leukray.version": str(summary.get("leukray_version", "")),
        "leukray.weights": str(weights.get("name", "")),
        "leukray.weights_sha256": str(weights.get("sha256", "")),
        "leukray.data_fingerprint": str((summary.get("data") or {}).get("fingerprint", "")),
        "leukray.positive_label": str(summary.get("positive_label", "")),
        "leukray.chosen_model": str(chosen.get("name", "")),
        "leukray.chosen_features": str(chosen.get("feature_source", "")),
    }


def log_run_folder(out: str, uri: str, experiment: str = "leukray") -> dict[str, Any]:
    """Log the finished run folder `out` to MLflow at `uri`; returns what was logged
    (run id, experiment id, counts of nested runs, artifact names).

    Raises:
        DataError: `out` holds no summary.json (the run did not finish its tune stage).
        ConfigError: MLflow is not installed or `uri` is unusable.
    """
    summary_path = storage.join(out, "summary.json")
    if not storage.exists(summary_path):
        raise DataError(f"{summary_path} not found: only a finished run (its tune stage done) can be tracked")
    summary = read_json(summary_path)
    mlflow = _import_mlflow()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # asked for explicitly
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = mlflow.set_experiment(experiment).experiment_id
    except Exception as exc:  # noqa: BLE001 - any store problem is one line for the user
        raise ConfigError(f"tracking.mlflow: cannot open {uri!r}: {type(exc).__name__}: {exc}") from exc
    config_path = storage.join(out, "config.yaml")
    config = yaml.safe_load(storage.read_bytes(config_path)) if storage.exists(config_path) else {}
    name = out.rstrip("/").rsplit("/", 1)[-1]
    with mlflow.start_run(run_name=name) as parent:
        mlflow.set_tags(_run_tags(out, summary))
        mlflow.log_params(flatten(config or {}))
        mlflow.log_metrics(run_metrics(summary))
        history = _read_optional_csv(out, "history.csv") if summary.get("custom_model") else None
        if history is not None:
            _log_history(mlflow, history)
        n_sweep = sum(_log_board(mlflow, features, board) for features, board in sweep_boards(out, summary))
        trials = _read_optional_csv(out, "tuning.csv")
        n_tuning = _log_tuning(mlflow, trials) if trials is not None else 0
        artifacts = _log_artifacts(mlflow, out)
    log(f"tracking: logged {out} to MLflow {uri} (experiment {experiment!r}, run {parent.info.run_id})")
    return {
        "run_id": parent.info.run_id,
        "experiment_id": experiment_id,
        "sweep_runs": n_sweep,
        "tuning_runs": n_tuning,
        "artifacts": artifacts,
    }
