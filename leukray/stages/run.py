"""`leukray run`: the three stages in one job, handing their results over in memory:
extract (discover -> hash/deduplicate -> split -> stream preprocess/augment/extract) ->
train (the custom ResNet50 head, when enabled) -> tune (sweeps, fine-tuning, model choice,
bundle, summary, report). `extract`, `train` and `tune` are also jobs of their own on the
same run folder (`run_stage`).

The run folder (other tools read these names):
  run.json (the journal: which stages finished, their identity and files' sha256),
  config.yaml, manifest.parquet, features.parquet, leaderboard.csv, leaderboard.md,
  errors.csv, summary.json, ... (README: "The run folder")

May import: `leukray.config`, `leukray.io`, `leukray.stages.*`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

from leukray.config import RunConfig
from leukray.io import journal, mapshards, runfolder, storage, tracking
from leukray.io.tables import log, read_json
from leukray.stages.extract import Extracted, extract_stage, load_extracted
from leukray.stages.train import Trained, extract_id, load_trained, train_stage
from leukray.stages.trunktrain import load_trained_trunk, train_trunk_stage
from leukray.stages.tune import tune_stage


def run_pipeline(
    cfg: RunConfig,
    start_ray: Callable[[], None] | None = None,
    on_stage: Callable[..., None] | None = None,
    existing: str = "refuse",
) -> dict[str, Any]:
    """Run everything in one job and write the run folder; returns summary.json's content.

    Args:
        cfg: the resolved configuration.
        start_ray: called once the inputs are checked (so a user mistake is reported
            before Ray starts); without it Ray must already be initialised.
        on_stage: called as `on_stage(stage, "start")` and `on_stage(stage, "end",
            seconds=...)` around extract, train and tune (the CLI's --json events).
        existing: what to do with an earlier run in `cfg.out`: refuse one of other data or
            settings, overwrite it, or resume it (stages whose identity matches are read
            back, the others redone); see `leukray.io.journal`.
    """
    t0 = time.perf_counter()
    tracking.check(cfg.tracking.mlflow)
    with _stage(on_stage, "extract"):
        keep_maps = cfg.train.enabled and not cfg.train.trains_trunk
        extracted = extract_stage(cfg, start_ray, keep_maps=keep_maps, existing=existing)
    cfg, out = extracted.cfg, extracted.cfg.out
    trained = None
    if cfg.train.trains_trunk:
        with _stage(on_stage, "train"):
            extracted = _train_trunk(extracted, existing)
    elif cfg.train.enabled:
        with _stage(on_stage, "train"):
            trained = _train(extracted, existing)
    else:
        journal.discard(out, "train")  # an earlier run's custom model and tables are not this run's
    mapshards.remove_maps(out)  # the custom features are written: nothing reads the maps again
    identity = runfolder.tune_identity(cfg, _upstream(extracted, trained))
    if existing == "resume" and journal.committed(out, "tune", identity):
        log(f"resuming: the sweeps, model choice and bundle in {out} are already this run's")
        return read_json(storage.join(out, "summary.json"))
    with _stage(on_stage, "tune"):
        summary = _tune(extracted, trained, identity, total_start=t0, write_config=False)
    if cfg.tracking.mlflow:
        with _stage(on_stage, "track"):
            track_run(cfg)
    return summary


def _train(extracted: Extracted, existing: str) -> Trained:
    """The train stage, or its committed result when resuming with the same identity."""
    cfg, out = extracted.cfg, extracted.cfg.out
    identity = runfolder.train_identity(cfg, extract_id(extracted.record))
    if existing == "resume" and journal.committed(out, "train", identity):
        log(f"resuming: the custom model in {out} was trained on the same maps with the same settings")
        return load_trained(out, extracted.record["fingerprint"], extracted.weights.name)
    return train_stage(extracted, write_config=False)


def _train_trunk(extracted: Extracted, existing: str) -> Extracted:
    """The trunk trained on the cells, or the committed one when resuming with the same identity."""
    cfg, out = extracted.cfg, extracted.cfg.out
    identity = runfolder.train_identity(cfg, extract_id(extracted.record))
    if existing == "resume" and journal.committed(out, "train", identity):
        log(f"resuming: the trunk in {out} was trained on the same images with the same settings")
        return load_trained_trunk(extracted)
    return train_trunk_stage(extracted, write_config=False)


def _upstream(extracted: Extracted, trained: Trained | None) -> str:
    """The identity the tune stage's results depend on: the train stage's when it ran."""
    if trained is not None:
        return trained.record.get("identity", "")
    if extracted.trunk_record is not None:
        return extracted.trunk_record["identity"]
    return extract_id(extracted.record)


@contextlib.contextmanager
def _stage(on_stage: Callable[..., None] | None, name: str) -> Iterator[None]:
    tick = time.perf_counter()
    if on_stage is not None:
        on_stage(name, "start")
    yield
    if on_stage is not None:
        on_stage(name, "end", seconds=round(time.perf_counter() - tick, 2))


def _tune(extracted: Extracted, trained: Trained | None, identity: str, **kwargs: Any) -> dict[str, Any]:
    """The tune stage between its journal entries: its tables count only once it finished."""
    journal.begin(extracted.cfg.out, "tune", identity)
    summary = tune_stage(extracted, trained, **kwargs)
    journal.commit(extracted.cfg.out, "tune")
    return summary


def run_train_job(cfg: RunConfig, start_ray: Callable[[], None] | None = None) -> dict[str, Any]:
    """`leukray train` on a run folder that `leukray extract` wrote; returns train.json's content."""
    if cfg.train.trains_trunk:  # its features must be of features.parquet's rows: read them
        return train_trunk_stage(load_extracted(cfg, "train"), start_ray).trunk_record
    extracted = load_extracted(cfg, "train", with_features=False)
    record = train_stage(extracted, start_ray).record
    mapshards.remove_maps(cfg.out)  # kept until now so that a failed train job resumes from them
    return record


def run_tune_job(cfg: RunConfig, start_ray: Callable[[], None] | None = None) -> dict[str, Any]:
    """`leukray tune` on a run folder that `leukray extract` (and `train`) wrote; returns
    summary.json's content."""
    tracking.check(cfg.tracking.mlflow)
    extracted = load_extracted(cfg, "tune")
    trained = None
    if cfg.train.trains_trunk:
        extracted = load_trained_trunk(extracted)
    elif cfg.train.enabled:
        trained = load_trained(cfg.out, extracted.record["fingerprint"], extracted.weights.name)
    summary = _tune(
        extracted, trained, runfolder.tune_identity(cfg, _upstream(extracted, trained)), start_ray=start_ray
    )
    track_run(cfg)
    return summary


def track_run(cfg: RunConfig) -> dict[str, Any] | None:
    """Log the finished run to MLflow when `tracking.mlflow` asks for it. The run's results
    are already written, so a tracking failure is a warning, not a lost run."""
    uri = tracking.resolve_uri(cfg.tracking.mlflow)
    if not uri:
        return None
    try:
        return tracking.log_run_folder(cfg.out, uri, cfg.tracking.experiment)
    except Exception as exc:  # noqa: BLE001 - the run is complete; tracking must not undo it
        log(f"WARNING: the run could not be logged to MLflow {uri}: {type(exc).__name__}: {exc}")
        return None
