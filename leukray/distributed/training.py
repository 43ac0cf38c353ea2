"""Train the custom ResNet50's head (the paper's Table II, step 5) with Ray Train.

`TorchTrainer` runs data-parallel workers (GPU when the cluster has them) over the trunk maps
that the Ray Data extractor computed once. Adam, binary cross-entropy, 50 epochs and batch 32
by default (the paper), reshuffled every epoch. Every epoch reports train/validation loss,
accuracy and balanced accuracy with a checkpoint through `ray.train.report`, so a run whose
worker dies (FailureConfig) or that is rerun with the same `--out` resumes from the last
checkpoint. The checkpoint with the best validation balanced accuracy is kept as the model;
the test split is never looked at here.

May import: Ray, torch, numpy, `leukray.config`, `leukray.models.*`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from leukray.config import TrainConfig
from leukray.models.custom import build_custom_model
from leukray.models.trunk import resolve_weights

STATE_FILE = "state.pt"


@dataclass
class EpochCounts:
    """Per-worker sums that all-reduce into epoch metrics."""

    loss_sum: float = 0.0
    n: int = 0
    correct: int = 0
    confusion: np.ndarray | None = None  # (C, C) true x predicted

    def add(self, loss: float, y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> None:
        if self.confusion is None:
            self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.loss_sum += loss * len(y_true)
        self.n += len(y_true)
        self.correct += int((y_true == y_pred).sum())
        np.add.at(self.confusion, (y_true, y_pred), 1)

    def metrics(self, prefix: str) -> dict[str, float]:
        confusion = self.confusion if self.confusion is not None else np.zeros((2, 2), np.int64)
        support = confusion.sum(axis=1)
        recalls = np.diag(confusion)[support > 0] / support[support > 0]
        return {
            f"{prefix}_loss": self.loss_sum / max(self.n, 1),
            f"{prefix}_accuracy": self.correct / max(self.n, 1),
            f"{prefix}_balanced_accuracy": float(recalls.mean()) if len(recalls) else float("nan"),
        }


def _all_reduce(counts: EpochCounts, num_classes: int) -> EpochCounts:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts
    confusion = counts.confusion if counts.confusion is not None else np.zeros((num_classes, num_classes), np.int64)
    flat = torch.tensor([counts.loss_sum, counts.n, counts.correct, *confusion.ravel().tolist()], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat)
    flat = flat.cpu().numpy()
    return EpochCounts(
        float(flat[0]), int(flat[1]), int(flat[2]), flat[3:].astype(np.int64).reshape(num_classes, num_classes)
    )


def build_model(config: dict[str, Any]):
    """The trainable part: unfrozen trunk stages (loaded from the configured weights) + head."""
    trunk_weights = resolve_weights(config["weights"], config["weights_seed"])[0] if config["unfreeze_stages"] else None
    return build_custom_model(config, trunk_weights=trunk_weights, weights_seed=config["weights_seed"])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: trains on the "train" shard, validates on the "val" shard, reports
    every epoch's metrics with a checkpoint."""
    import ray.train
    import ray.train.torch
    import torch

    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(config["seed"] + rank)
    model = build_model(config)
    groups = [{"params": model.head.parameters(), "lr": config["lr"]}]
    if config["unfreeze_stages"]:
        groups.append({"params": model.suffix.parameters(), "lr": config["finetune_lr"]})
    optimizer = torch.optim.Adam(groups)
    start_epoch, history = _restore(model, optimizer, rank)

    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config.get("cpu_threads"):
        # Ray gives the worker one CPU's worth of threads; the maps are already in memory and
        # the head's matrix products are the whole cost, so use the cores the node has.
        torch.set_num_threads(min(int(config["cpu_threads"]), os.cpu_count() or 1))
    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "val")}
    for epoch in range(start_epoch, config["epochs"]):
        metrics = _train_epoch(model, optimizer, shards["train"], config, epoch, rank, device)
        metrics.update(_validate(model, shards["val"], config, device))
        metrics["epoch"] = epoch + 1
        history.append(metrics)
        _report(model, optimizer, metrics, history, epoch, rank)
        if rank == 0:
            print(
                f"[train] epoch {epoch + 1}/{config['epochs']}  "
                f"loss {metrics['train_loss']:.4f}/{metrics['val_loss']:.4f}  "
                f"acc {metrics['train_accuracy']:.3f}/{metrics['val_accuracy']:.3f}  "
                f"bal.acc {metrics['train_balanced_accuracy']:.3f}/{metrics['val_balanced_accuracy']:.3f} (train/val)",
                flush=True,
            )
        if config.get("on_epoch_end") is not None:
            config["on_epoch_end"](epoch + 1, rank)


def _core(model):
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def _restore(model, optimizer, rank: int) -> tuple[int, list[dict[str, float]]]:
    """Load the last reported checkpoint (a restarted worker or a rerun); returns the epoch
    to start at and the history so far."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if rank == 0:
        print(f"[train] resuming from the checkpoint of epoch {state['epoch'] + 1}", flush=True)
    return state["epoch"] + 1, state["history"]


def _train_epoch(model, optimizer, shard, config: dict[str, Any], epoch: int, rank: int, device) -> dict[str, float]:
    import torch

    head, num_classes, batch_size = _core(model).head, config["num_classes"], config["batch_size"]
    model.train()
    counts = EpochCounts()
    for batch in shard.iter_torch_batches(
        batch_size=batch_size,
        local_shuffle_buffer_size=max(8 * batch_size, 256),
        local_shuffle_seed=config["seed"] * 1000 + epoch * 10 + rank,
        device=device,
        dtypes={"maps": torch.float32, "label_code": torch.int64},
    ):
        maps, target = batch["maps"], batch["label_code"]
        if len(target) < 2:
            continue  # BatchNorm cannot train on a single sample
        logits = model(maps)
        loss = head.loss(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pred = head.probabilities(logits.detach()).argmax(dim=1)
        counts.add(float(loss.detach()), target.cpu().numpy(), pred.cpu().numpy(), num_classes)
    return _all_reduce(counts, num_classes).metrics("train")


def _validate(model, shard, config: dict[str, Any], device) -> dict[str, float]:
    import torch

    head, num_classes = _core(model).head, config["num_classes"]
    model.eval()
    counts = EpochCounts()
    dtypes = {"maps": torch.float32, "label_code": torch.int64}
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=max(config["batch_size"], 64), device=device, dtypes=dtypes):
            logits = model(batch["maps"])
            loss = head.loss(logits, batch["label_code"])
            pred = head.probabilities(logits).argmax(dim=1)
            counts.add(float(loss), batch["label_code"].cpu().numpy(), pred.cpu().numpy(), num_classes)
    return _all_reduce(counts, num_classes).metrics("val")


def _report(
    model, optimizer, metrics: dict[str, float], history: list[dict[str, float]], epoch: int, rank: int
) -> None:
    """The epoch's metrics to Ray Train, with rank 0's checkpoint (model, optimizer, history)."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as directory:
        if rank == 0:
            state = {
                "model": _core(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "history": history,
            }
            torch.save(state, os.path.join(directory, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_val_balanced_accuracy: float
    state_dict: dict[str, Any]  # the best epoch's CustomResNet50 state
    config: dict[str, Any]


def run_name(cfg: TrainConfig, fingerprint: str, weights: str, in_features: int, num_classes: int) -> str:
    """A run name tied to the data and training settings: a rerun with the same `--out`
    and settings resumes; changed settings train afresh."""
    key = json.dumps([dataclasses.asdict(cfg), fingerprint, weights, in_features, num_classes], sort_keys=True)
    return "custom_resnet50-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def train_head(
    train_ds,
    val_ds,
    cfg: TrainConfig,
    *,
    in_features: int,
    num_classes: int,
    weights: str,
    weights_seed: int,
    storage_path: str,
    name: str,
    use_gpu: bool,
    on_epoch_end: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Run the TorchTrainer and load the best checkpoint.

    Args:
        train_ds, val_ds: Ray datasets with columns `maps` (C x H x W float16) and `label_code`.
        on_epoch_end: called on every worker as (epoch, rank) once the epoch's checkpoint is
            reported (picklable; e.g. `leukray.testing.KillWorkerOnce`).
    """
    import ray.data

    from leukray.distributed.resources import cluster_cpus

    loop_config = {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "finetune_lr": cfg.finetune_lr,
        "dropout": cfg.dropout,
        "unfreeze_stages": cfg.unfreeze_stages,
        "seed": cfg.seed,
        "in_features": in_features,
        "num_classes": num_classes,
        "weights": weights,
        "weights_seed": weights_seed,
        "on_epoch_end": on_epoch_end,
        "cpu_threads": max(1, int(cluster_cpus()) // max(cfg.workers, 1)),
    }
    trainer = _trainer(loop_config, cfg, train_ds, val_ds, storage_path=storage_path, name=name, use_gpu=use_gpu)
    # Ray Data's per-epoch progress bars inside the trainer would drown the epoch lines.
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        result = trainer.fit()
    finally:
        context.enable_progress_bars = saved
    if result.error is not None:
        raise result.error
    return _best_result(result, loop_config)


def _trainer(
    loop_config: dict[str, Any], cfg: TrainConfig, train_ds, val_ds, *, storage_path: str, name: str, use_gpu: bool
):
    """A TorchTrainer that keeps the best epoch's checkpoint (by validation balanced
    accuracy) under storage_path/name, and restarts dead workers up to train.max_failures."""
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1,
                checkpoint_score_attribute="val_balanced_accuracy",
                checkpoint_score_order="max",
            ),
        ),
        datasets={"train": train_ds, "val": val_ds},
    )


def _best_result(result, loop_config: dict[str, Any]) -> TrainResult:
    """The best epoch's model (by validation balanced accuracy) and the full history."""
    import torch

    best_ckpt, best_metrics = max(
        result.best_checkpoints, key=lambda cm: (cm[1].get("val_balanced_accuracy", -1), -cm[1].get("epoch", 0))
    )
    with best_ckpt.as_directory() as directory:
        best_state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    with result.checkpoint.as_directory() as directory:
        latest = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    return TrainResult(
        history=latest["history"],
        best_epoch=int(best_metrics["epoch"]),
        best_val_balanced_accuracy=float(best_metrics["val_balanced_accuracy"]),
        state_dict=best_state["model"],
        config=loop_config,
    )


def _with_codes(
    batch: dict[str, np.ndarray], codes: dict[str, int], split: str, originals_only: bool
) -> dict[str, np.ndarray]:
    keep = (batch["split"] == split) & np.asarray([not e for e in batch["error"]], dtype=bool)
    if originals_only:
        keep &= batch["aug_index"] == 0
    return {
        "maps": batch["maps"][keep],
        "label_code": np.asarray([codes[str(v)] for v in batch["label"][keep]], dtype=np.int64),
    }


def split_maps(maps_ds: Any, classes: list[str]) -> tuple[Any, Any]:
    """(train, val) datasets of `maps` + `label_code` from the extractor's maps: the training
    split with its augmented copies, validation originals only."""
    from leukray.data.splits import TRAIN, VAL

    codes = {name: i for i, name in enumerate(classes)}
    # Blocks come in path order (all ALL cells, then all normal ones): reshuffle the block
    # order every epoch, and rows within the trainer's local shuffle buffer.
    train_ds = maps_ds.map_batches(
        _with_codes, batch_format="numpy", fn_kwargs={"codes": codes, "split": TRAIN, "originals_only": False}
    ).randomize_block_order()
    val_kwargs = {"codes": codes, "split": VAL, "originals_only": True}
    val_ds = maps_ds.map_batches(_with_codes, batch_format="numpy", fn_kwargs=val_kwargs)
    return train_ds, val_ds
