"""A Ray Tune search over the Table II head's training settings (beyond the paper).

Each trial is a real Ray Train run of the head (`training.train_loop_per_worker` in a
`TorchTrainer`). Ray 2.60's Train V2 trainer is no longer a Tune trainable; Ray documents a
Tune function that calls `trainer.fit()` with `TuneReportCallback`, but when ASHA stops such
a trial Tune drops its actor while the Train run is still going, and the run's placement
group is left to a watchdog actor (measured here: the watchdog failed, the placement group
kept its CPU, and the next trial's workers never started). So a trial here is a Tune class
trainable (no CPU of its own): `setup` starts the trainer in a thread, a Ray Train callback
hands each epoch's report to a queue, `step` returns it to Tune, and `cleanup` (a stopped
trial) aborts the Train run, which releases its workers and placement group. The worker does
not wait for Tune's verdict on an epoch, so a stopped trial may train part of an epoch or
one more (not reported) before the abort reaches it.

Optuna's TPE (seeded by `train.seed`, through `OptunaSearch`) draws the learning rate (log),
dropout and weight decay (log); ASHA (`AsyncHyperBandScheduler`, time in epochs, `max_t` =
`train.epochs`, first rung at `train.search_grace_epochs`) stops the weaker trials at each
rung on the validation loss (a continuous signal: balanced accuracy on a few validation
subjects ties often, and a tie never stops anything). The number of epochs is ASHA's and the
checkpoints': a trial runs until ASHA stops it or `max_t`, and its best epoch by validation
balanced accuracy (the head's own rule) is its model. The best trial is the one whose best
epoch scored highest (ties: the lower validation loss there, then the earlier trial), and
its best checkpoint is the head: no retraining. The test split never reaches the search: the
trials see the train and validation datasets only.

The experiment (storage_path/<name>) is named by what it depends on (the caller's run name:
maps, weights and every train setting) and resumes with `Tuner.restore`: finished trials are
kept, an unfinished one reruns and its Ray Train run (named by the trial) resumes from its
last checkpoint.

May import: Ray, Optuna, numpy, pandas, `leukray.config`, `leukray.distributed.training`,
`leukray.distributed.maps`, `leukray.distributed.resources`.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from leukray.config import TrainConfig
from leukray.distributed.maps import ShardSource
from leukray.distributed.training import STATE_FILE, TrainResult, fit_quietly, head_loop_config, make_trainer

# What the search draws (plain data: the docs and the record show it). Ranges bracket the
# paper's setting (Adam 1e-3, dropout 0.5, no weight decay) by two decades either way.
HEAD_SPACE: dict[str, tuple[str, float, float]] = {
    "lr": ("log", 1e-5, 1e-2),
    "dropout": ("float", 0.0, 0.7),
    "weight_decay": ("log", 1e-6, 1e-2),
}
ASHA_METRIC = "val_loss"
DRIVER_MEMORY = 64 * 2**20  # bytes a trial's actor reserves (it holds no data)
SEARCH_COLUMNS = [
    "trial", "trial_id", "lr", "dropout", "weight_decay", "epochs_run", "stop_reason", "best_epoch",
    "best_val_balanced_accuracy", "val_loss_at_best", "min_val_loss", "status", "detail",
]  # fmt: skip
HISTORY_KEYS = [
    "epoch", "train_loss", "train_accuracy", "train_balanced_accuracy", "val_loss", "val_accuracy",
    "val_balanced_accuracy", "train_s", "resumed_from",
]  # fmt: skip


@dataclass
class HeadSearch:
    """The search's trials (one row each, `SEARCH_COLUMNS`, in trial order) and the best
    trial's head (its best epoch's weights and its history)."""

    trials: pd.DataFrame
    best: dict[str, Any]  # the best trial's row
    result: TrainResult


def parallel_trials(cfg: TrainConfig, use_gpu: bool, cluster: dict[str, float]) -> int:
    """How many trials run at once: on GPUs one trainer per `workers` GPUs; on CPUs one per
    `workers` + 1 CPUs (the one for Ray Data's ingest tasks, which need a free CPU)."""
    if use_gpu:
        return max(1, int(cluster.get("GPU", 0) // cfg.workers))
    return max(1, int(cluster.get("CPU", 1) // (cfg.workers + 1)))


def _param_space() -> dict[str, Any]:
    from ray import tune

    kinds = {"log": tune.loguniform, "float": tune.uniform}
    return {key: kinds[kind](low, high) for key, (kind, low, high) in HEAD_SPACE.items()}


def _epoch_forwarder(epochs_queue: Any):
    """A Ray Train callback (it runs in the trial's Train controller) that hands every
    epoch's report to the trial's queue, with the checkpoint's path and the controller's
    handle (so that a stopped trial can end its Train run)."""
    import ray
    import ray.train

    class ForwardEpochs(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            item = {**metrics[0], "checkpoint_path": checkpoint.path if checkpoint else None}
            epochs_queue.put({**item, "controller": ray.get_runtime_context().current_actor})

    return ForwardEpochs()


def _head_trial_class():
    """The Tune trainable of one trial: `setup` starts a Ray Train run of the head with the
    drawn settings (in a thread of the trial's actor), `step` returns its next epoch's
    report, `cleanup` aborts the run when Tune stopped the trial early (ASHA), so its
    workers and placement group are released before the next trial asks for them."""
    import threading

    import ray
    import ray.data
    from ray import tune
    from ray.util.queue import Queue

    class HeadTrial(tune.Trainable):
        def setup(self, config, *, loop_config, cfg, storage_path, name, use_gpu):
            self.max_t, self.controller, self.error = cfg.epochs, None, None
            self.epochs = Queue(actor_options={"num_cpus": 0})
            drawn = {key: float(config[key]) for key in HEAD_SPACE}
            trainer = make_trainer(
                {**loop_config, **drawn, "print_epochs": False}, cfg, storage_path=storage_path,
                # named by the trial: a restored experiment resumes it from its checkpoint
                name=f"{name}-{self.trial_id}", use_gpu=use_gpu, callbacks=[_epoch_forwarder(self.epochs)],
                # two: an epoch a stopped trial trains past its last report cannot push out
                # the best reported epoch's checkpoint
                keep_checkpoints=2,
            )  # fmt: skip
            ray.data.DataContext.get_current().enable_progress_bars = False
            self.fit = threading.Thread(target=self._fit, args=(trainer,), daemon=True)
            self.fit.start()

        def _fit(self, trainer):
            try:
                trainer.fit()
            except Exception as exc:  # reported by `step`
                self.error = exc
            self.epochs.put({"end": True})

        def step(self):
            item = self.epochs.get()
            if "end" in item:  # a resumed run that had nothing left to train
                if self.error is not None:
                    raise self.error
                return {"done": True, "epoch": self.max_t, ASHA_METRIC: float("nan")}
            self.controller = item.pop("controller")
            if item["epoch"] >= self.max_t:
                self.fit.join()
            return {**item, "done": item["epoch"] >= self.max_t}

        def save_checkpoint(self, checkpoint_dir):
            return None  # the trial's state is its Ray Train run's checkpoints

        def load_checkpoint(self, checkpoint):
            pass  # the Ray Train run (named by the trial) resumes itself

        def cleanup(self):
            if self.fit.is_alive() and self.controller is not None:
                try:
                    ray.get(self.controller.abort.remote())
                except ray.exceptions.RayActorError:
                    pass  # the controller exits as it aborts
                self.fit.join(timeout=60)

    return HeadTrial


def _tuner(trainable, cfg: TrainConfig, storage_path: str, name: str, parallel: int, on_trial: Callable | None):
    """A new Tuner, or the experiment of this name restored (`Tuner.restore`)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import AsyncHyperBandScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    path = storage_path.rstrip("/") + "/" + name
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=max(2, min(10, cfg.search_trials // 3)))
    searcher = OptunaSearch(metric=ASHA_METRIC, mode="min", sampler=sampler)
    asha = AsyncHyperBandScheduler(
        time_attr="epoch", metric=ASHA_METRIC, mode="min", max_t=cfg.epochs,
        grace_period=cfg.search_grace_epochs, reduction_factor=cfg.search_reduction_factor,
    )  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space=_param_space(),
        tune_config=tune.TuneConfig(
            num_samples=cfg.search_trials,
            scheduler=asha,
            # batches of `parallel`, each asked once the previous one has finished: the same
            # search on the same cluster draws the same settings however trials finish
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=parallel, batch=True),
        ),  # fmt: skip
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            verbose=0,
            callbacks=[_print_callback(cfg.epochs, on_trial)] if on_trial is not None else [],
        ),  # fmt: skip
    )


def _print_callback(max_t: int, on_trial: Callable[[dict[str, Any]], None]):
    """A Tune callback handing one row per finished trial (completed or stopped by ASHA) to
    `on_trial`."""
    from ray import tune

    class PrintTrial(tune.Callback):
        def __init__(self):
            self.history: dict[str, list[dict[str, Any]]] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.history.setdefault(trial.trial_id, []).append({k: result.get(k) for k in HISTORY_KEYS})

        def on_trial_complete(self, iteration, trials, trial, **info):
            frame = pd.DataFrame(self.history.get(trial.trial_id, []))
            on_trial(_trial_row(trial.trial_id, trial.config, frame, None, max_t))

    return PrintTrial()


def _trial_number(path: str, trial_id: str) -> float:
    """The trial's place in the search: Tune names a trial's folder
    `<trainable>_<trial id>_<n>_<settings>` (its results come back in no fixed order)."""
    found = re.search(rf"_{re.escape(trial_id)}_(\d+)", os.path.basename(path.rstrip("/")))
    return float(found.group(1)) if found else float("inf")


def _epochs(frame: pd.DataFrame) -> pd.DataFrame:
    """A trial's reported epochs, one row each (a resumed trial may report one again)."""
    frame = frame.dropna(subset=[c for c in ("epoch", ASHA_METRIC) if c in frame])
    return frame.drop_duplicates("epoch", keep="last").sort_values("epoch")


def _trial_row(trial_id: str, config: dict[str, Any], frame: pd.DataFrame | None, error: Any, max_t: int) -> dict:
    """A trial's row of head_search.csv from its reported epochs."""
    row: dict[str, Any] = {"trial_id": trial_id, **{key: config.get(key) for key in HEAD_SPACE}}
    if frame is None or frame.empty or "epoch" not in frame or _epochs(frame).empty:
        detail = str(error).splitlines()[0][:300] if error else "no epoch reported"
        return {**row, "epochs_run": 0, "stop_reason": "failed", "status": "failed", "detail": detail}
    frame = _epochs(frame)
    best = frame.sort_values(["val_balanced_accuracy", "epoch"], ascending=[False, True]).iloc[0]
    epochs_run = int(frame["epoch"].max())
    if error:
        reason, status = "failed", "failed"
    else:
        reason, status = ("completed" if epochs_run >= max_t else "stopped by ASHA"), "ok"
    return {
        **row, "epochs_run": epochs_run, "stop_reason": reason, "best_epoch": int(best["epoch"]),
        "best_val_balanced_accuracy": float(best["val_balanced_accuracy"]),
        "val_loss_at_best": float(best["val_loss"]), "min_val_loss": float(frame["val_loss"].min()),
        "status": status, "detail": str(error).splitlines()[0][:300] if error else "",
    }  # fmt: skip


def best_trial(trials: pd.DataFrame) -> dict[str, Any]:
    """The trial whose best epoch has the highest validation balanced accuracy; ties: the
    lower validation loss at that epoch, then the earlier trial."""
    ok = trials[trials["epochs_run"] > 0]
    if ok.empty:
        raise RuntimeError(f"every head-search trial failed: {trials['detail'].iloc[0] if len(trials) else 'none ran'}")
    ranked = ok.sort_values(["best_val_balanced_accuracy", "val_loss_at_best", "trial"], ascending=[False, True, True])
    return ranked.iloc[0].to_dict()


def run_head_search(
    train: ShardSource,
    val: ShardSource,
    cfg: TrainConfig,
    *,
    in_features: int,
    num_classes: int,
    weights: str,
    weights_seed: int,
    storage_path: str,
    name: str,
    use_gpu: bool,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    on_epoch_end: Callable[[int, int], None] | None = None,
) -> HeadSearch:
    """`cfg.search_trials` Ray Tune trials of head training (see the module docstring) in the
    experiment storage_path/name (resumed when it is there); returns every trial and the best
    trial's head. Needs a running Ray.

    Args:
        train, val: the maps' rows of each split (`training.split_maps`).
        on_trial: called in the driver with each finished trial's row (`SEARCH_COLUMNS`).
        on_epoch_end: as `training.train_head`'s, on every worker of every trial.
    """
    import ray
    import ray.data
    from ray import tune

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's console would interleave with ours
    parallel = min(parallel_trials(cfg, use_gpu, ray.cluster_resources()), cfg.search_trials)
    loop_config = head_loop_config(cfg, in_features, num_classes, weights, weights_seed, on_epoch_end, parallel)
    loop_config["maps"] = {"train": train, "val": val}
    trial = tune.with_parameters(
        _head_trial_class(), loop_config=loop_config, cfg=cfg,
        storage_path=storage_path, name=name, use_gpu=use_gpu,
    )  # fmt: skip
    # A trial's actor only waits on its trainer, whose workers ask for their own CPUs/GPUs; a
    # CPU (even a fraction) held by it would starve the workers' and other trials' tasks.
    # Tune wants some resource per trial: a token of memory.
    tuner = _tuner(
        tune.with_resources(trial, {"cpu": 0, "memory": DRIVER_MEMORY}), cfg, storage_path, name, parallel, on_trial
    )
    rows, frames = [], {}
    results = fit_quietly(tuner)
    for result in results:
        trial_id = str((result.metrics or {}).get("trial_id") or os.path.basename(str(result.path).rstrip("/")))
        frames[trial_id] = result.metrics_dataframe
        row = _trial_row(trial_id, result.config or {}, result.metrics_dataframe, result.error, cfg.epochs)
        rows.append({**row, "trial": _trial_number(str(result.path), trial_id)})
    trials = pd.DataFrame(rows).sort_values(["trial", "trial_id"]).reset_index(drop=True)
    trials["trial"] = np.arange(1, len(trials) + 1)
    trials = trials.reindex(columns=SEARCH_COLUMNS)
    best = best_trial(trials)
    _drop_checkpoints(storage_path, [f"{name}-{t}" for t in trials["trial_id"] if t != best["trial_id"]])
    return HeadSearch(trials, best, _best_head(frames[best["trial_id"]], best, loop_config))


def _drop_checkpoints(storage_path: str, run_names: list[str]) -> None:
    """Delete the Ray Train runs of the trials that were not chosen: a head checkpoint is
    ~600 MB at 224 px, and a finished trial is not run again (the Tune experiment keeps its
    record)."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_path) if "://" in storage_path else (
        pyarrow.fs.LocalFileSystem(), os.path.abspath(storage_path))  # fmt: skip
    for run in run_names:
        path = root.rstrip("/") + "/" + run
        if filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            filesystem.delete_dir(path)


def _best_head(frame: pd.DataFrame, best: dict[str, Any], loop_config: dict[str, Any]) -> TrainResult:
    """The best trial's best epoch's weights (its kept checkpoint) and its history."""
    import pyarrow.fs
    import torch

    frame = _epochs(frame)
    path = frame.loc[frame["epoch"] == best["best_epoch"], "checkpoint_path"].iloc[0]
    filesystem, _ = pyarrow.fs.FileSystem.from_uri(path) if "://" in str(path) else (pyarrow.fs.LocalFileSystem(), "")
    with filesystem.open_input_stream(str(path).split("://", 1)[-1].rstrip("/") + "/" + STATE_FILE) as handle:
        state = torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
    if int(state["epoch"]) + 1 != int(best["best_epoch"]):
        raise RuntimeError(f"head search: the checkpoint at {path} is of epoch {state['epoch'] + 1}, not the best")
    history = frame.reindex(columns=HISTORY_KEYS).to_dict("records")
    drawn = {key: float(best[key]) for key in HEAD_SPACE}
    return TrainResult(
        history=history,
        best_epoch=int(best["best_epoch"]),
        best_val_balanced_accuracy=float(best["best_val_balanced_accuracy"]),
        state_dict=state["model"],
        config={**loop_config, **drawn, "epochs": int(best["epochs_run"])},
    )


def search_record(search: HeadSearch, cfg: TrainConfig) -> dict[str, Any]:
    """What train.json, the summary and the bundle say of the search."""
    trials = search.trials
    best = {k: search.best[k] for k in ("trial", "trial_id", *HEAD_SPACE, "epochs_run", "best_epoch")}
    return {
        "trials": int(len(trials)),
        "completed": int((trials["stop_reason"] == "completed").sum()),
        "stopped_by_asha": int((trials["stop_reason"] == "stopped by ASHA").sum()),
        "failed": int((trials["status"] == "failed").sum()),
        "space": {k: list(v) for k, v in HEAD_SPACE.items()},
        "asha": {
            "metric": ASHA_METRIC,
            "max_t": cfg.epochs,
            "grace_epochs": cfg.search_grace_epochs,
            "reduction_factor": cfg.search_reduction_factor,
        },  # fmt: skip
        "chosen_by": "best epoch's validation balanced accuracy",
        "best": {key: value.item() if hasattr(value, "item") else value for key, value in best.items()},
        "best_val_balanced_accuracy": float(search.best["best_val_balanced_accuracy"]),
    }
