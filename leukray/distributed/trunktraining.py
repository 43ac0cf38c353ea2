"""Train the ResNet50 itself on the cells with Ray Train (`train.unfreeze_stages` >= 1).

The head path (`leukray.distributed.training`) trains on trunk maps computed once; here the
crops themselves stream through the trunk every epoch. The training and validation crops
are decoded and Otsu-cropped once (Ray Data, CPU tasks) and kept in Ray's object store as
uint8; each epoch every training crop is augmented afresh (rotation, scale, flips:
`leukray.ops.augment.augment_epoch`, seeded by (seed, content, draw, epoch)) in the data
iterator's threads, so the trunk never sees the same fixed copies twice. A minority image
is drawn 1 + n_aug times per epoch (the manifest's oversampling plan), each draw augmented
differently. `TorchTrainer` runs the data-parallel workers (GPUs when the cluster has them;
bf16 autocast and channels_last there), Adam at `train.lr` on the linear classifier and at
`train.lr` (random init) or `train.finetune_lr` (pretrained weights) on the trunk.

Checkpoints, resumption and reproducibility are the head's (`training.report_epoch`,
`training.restore_checkpoint`): every epoch reports its metrics with a checkpoint holding the model,
the optimizer, the epoch, the history and every rank's RNG states; the shuffle is seeded by
(train.seed, epoch, rank) and the augmentation by the epoch, so a resumed run draws what the
uninterrupted one drew. The best epoch by validation balanced accuracy is the trained trunk.

May import: Ray, torch, numpy, `leukray.config`, `leukray.models.*`, `leukray.ops.allocator`, `leukray.ops.augment`,
`leukray.distributed.actors`, `leukray.distributed.resources`, `leukray.distributed.streaming`,
`leukray.distributed.training`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np
import pandas as pd

from leukray.config import AugmentConfig, PreprocessConfig, TrainConfig
from leukray.distributed.actors import preprocess_batch
from leukray.distributed.resources import cluster_cpus, whole_output_pass
from leukray.distributed.streaming import row_blocks, stream_block_rows
from leukray.distributed.training import (
    EpochCounts,
    TrainResult,
    best_result,
    epoch_seed,
    fit_quietly,
    make_trainer,
    report_epoch,
    restore_checkpoint,
    seed_everything,
    unwrap,
)
from leukray.models.classifiers import label_codes
from leukray.models.trained import build_trunk_classifier, normalised_images
from leukray.models.trunk import resolve_weights
from leukray.ops import allocator
from leukray.ops.augment import augment_epoch

SHUFFLE_BUFFER_ROWS = 512


def trunk_rows(batch: dict[str, np.ndarray], classes: list[str], split: str, oversample: bool) -> dict[str, np.ndarray]:
    """The preprocessed crops of `split` without errors, as training rows: `image`,
    `label_code` (index in `classes`), `sha256` and `draw`; with `oversample`, each image
    repeated 1 + `copies` times (draw 0, 1, ...: the manifest's oversampling plan)."""
    keep = (batch["split"].astype(str) == split) & np.asarray([not e for e in batch["error"]], dtype=bool)
    repeats = (1 + batch["copies"][keep].astype(np.int64)) if oversample else np.ones(int(keep.sum()), np.int64)
    take = np.repeat(np.flatnonzero(keep), repeats)
    draws = np.concatenate([np.arange(r) for r in repeats]) if len(repeats) else np.zeros(0, np.int64)
    return {
        "image": batch["image"][take],
        "label_code": label_codes(batch["label"][take], classes),
        "sha256": batch["sha256"][take].astype(str).astype(object),
        "draw": draws.astype(np.int64),
    }


def crop_datasets(
    rows: pd.DataFrame, preprocess: PreprocessConfig, classes: list[str], train: str, val: str
) -> tuple[Any, Any]:
    """(train, val) Ray datasets of crops for `train_trunk`: `rows` (the manifest's usable
    training and validation rows: path, label, subject, split, sha256, n_aug) decoded and
    cropped once, kept in the object store; the training split with its oversampling draws.
    The rows are put in a seeded order first (the workers shuffle them further), so that
    neighbouring rows are not all one class. The pass is cut as the streaming stage's
    (`streaming.stream_block_rows`: about four tasks per CPU, in whole waves); in 32-row
    tasks Ray Data's dispatch between tasks, not the CPUs, set its pace: 6,400 synthetic
    cells on 2 cores took 6.5-9.1 s, and 3.0-4.3 s in these blocks (docs/measurements.md,
    "The trunk-training crop pass"). The blocks depend on the row count and the cluster's
    CPUs, as the number of training workers does: the same run on the same cluster draws the
    same batches."""
    import ray

    table = rows[rows["split"].isin([train, val])][["path", "label", "subject", "split", "sha256", "n_aug"]]
    table = table.sample(frac=1.0, random_state=0).rename(columns={"n_aug": "copies"}).assign(n_aug=0)
    rows_per_block = stream_block_rows(len(table), cluster_cpus())
    crops = ray.data.from_pandas(row_blocks(table, rows_per_block)).map_batches(
        preprocess_batch,
        batch_format="numpy",
        batch_size=rows_per_block,
        fn_kwargs={"cfg": preprocess, "augment": AugmentConfig(oversample=0.0), "seed": 0, "cell_families": ()},
    )
    crops.context.execution_options.preserve_order = True
    crops = whole_output_pass(crops).materialize()
    # Materialised: the workers' shards then need no CPU task while training, so as many
    # workers as the cluster has CPUs (or GPUs) can hold them all.
    train_ds = crops.map_batches(
        trunk_rows, batch_format="numpy", fn_kwargs={"classes": classes, "split": train, "oversample": True}
    ).materialize()
    val_ds = crops.map_batches(
        trunk_rows, batch_format="numpy", fn_kwargs={"classes": classes, "split": val, "oversample": False}
    )
    return train_ds, val_ds.select_columns(["image", "label_code"]).materialize()


class EpochAugment:
    """`collate_fn` of one epoch's training batches: augments the crops for that epoch
    (in Ray's iterator threads, overlapping the model's step) and makes torch tensors."""

    def __init__(self, seed: int, epoch: int, augment: AugmentConfig | None):
        self.seed, self.epoch, self.augment = seed, epoch, augment

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        images = batch["image"]
        if self.augment is not None:
            images = augment_epoch(images, batch["sha256"], batch["draw"], self.seed, self.epoch, self.augment)
        return {"image": torch.from_numpy(np.ascontiguousarray(images)), "label": torch.from_numpy(batch["label_code"])}


def _batches(shard, config: dict[str, Any], epoch: int | None, rank: int):
    """(images uint8 NHWC tensor, labels) batches of a shard: augmented and shuffled for a
    training epoch (`epoch` given), as they are for validation (None)."""
    shuffle = {}
    if epoch is not None:
        seed = epoch_seed(config["seed"], epoch, rank)
        shuffle = {"local_shuffle_buffer_size": SHUFFLE_BUFFER_ROWS, "local_shuffle_seed": seed}
    collate = EpochAugment(config["seed"], epoch or 0, config["augment"] if epoch is not None else None)
    for batch in shard.iter_torch_batches(
        batch_size=config["batch_size"], prefetch_batches=2, collate_fn=collate, **shuffle
    ):
        yield batch["image"], batch["label"]


def _step(model, images, labels, device):
    import torch

    x = normalised_images(images, device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(x)
    return logits, unwrap(model).loss(logits, labels.to(device))


def _train_epoch(model, optimizer, shard, config: dict[str, Any], epoch: int, rank: int, device) -> dict[str, float]:
    core = unwrap(model)
    model.train()
    counts = EpochCounts(config["num_classes"], device)
    for images, labels in _batches(shard, config, epoch, rank):
        if len(labels) < 2:
            continue  # BatchNorm cannot train on a single sample
        logits, loss = _step(model, images, labels, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        target = labels.to(device)
        counts.add(loss, target, core.probabilities(logits.detach()).argmax(dim=1))
    return counts.metrics("train")


def _validate(model, shard, config: dict[str, Any], device) -> dict[str, float]:
    import torch

    core = unwrap(model)
    model.eval()
    counts = EpochCounts(config["num_classes"], device)
    with torch.no_grad():
        for images, labels in _batches(shard, config, None, 0):
            logits, loss = _step(model, images, labels, device)
            counts.add(loss, labels.to(device), core.probabilities(logits).argmax(dim=1))
    return counts.metrics("val")


def _build(config: dict[str, Any], device):
    """The model and its optimizer: Adam on the classifier at lr, on the trunk's trained
    layers at lr (random init) or finetune_lr (pretrained weights)."""
    import torch

    state, info = resolve_weights(config["weights"], config["weights_seed"])
    model = build_trunk_classifier(
        state, config["weights_seed"], config["num_classes"], config["stages"], config["seed"]
    ).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    trunk_lr = config["finetune_lr"] if info.is_pretrained else config["lr"]
    groups = [
        {"params": model.fc.parameters(), "lr": config["lr"]},
        {"params": model.trunk_parameters(), "lr": trunk_lr},
    ]
    return model, torch.optim.Adam(groups, fused=device.type in ("cpu", "cuda"))


def trunk_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: trains the trunk on the "train" shard's crops (augmented anew each
    epoch), validates on the "val" shard, reports every epoch with a checkpoint."""
    import ray.train
    import ray.train.torch
    import torch

    allocator.keep_freed_memory(*allocator.TENSOR)  # the batches' activations and gradients
    rank = ray.train.get_context().get_world_rank()
    seed_everything(config["seed"] + rank)
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config.get("cpu_threads"):
        torch.set_num_threads(min(int(config["cpu_threads"]), os.cpu_count() or 1))
    model, optimizer = _build(config, device)
    start_epoch, history = restore_checkpoint(model, optimizer, rank)
    model = ray.train.torch.prepare_model(model)
    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "val")}
    for epoch in range(start_epoch, config["epochs"]):
        tick = time.perf_counter()
        metrics = _train_epoch(model, optimizer, shards["train"], config, epoch, rank, device)
        metrics["train_s"] = time.perf_counter() - tick
        metrics.update(_validate(model, shards["val"], config, device))
        metrics.update(epoch=epoch + 1, resumed_from=start_epoch)
        history.append(metrics)
        report_epoch(model, optimizer, metrics, history, epoch, rank)
        if rank == 0:
            print(
                f"[trunk] epoch {epoch + 1}/{config['epochs']}  "
                f"loss {metrics['train_loss']:.4f}/{metrics['val_loss']:.4f}  "
                f"bal.acc {metrics['train_balanced_accuracy']:.3f}/{metrics['val_balanced_accuracy']:.3f} (train/val)",
                flush=True,
            )
        if config.get("on_epoch_end") is not None:
            config["on_epoch_end"](epoch + 1, rank)


def train_trunk(
    train_ds,
    val_ds,
    cfg: TrainConfig,
    augment: AugmentConfig,
    *,
    num_classes: int,
    weights: str,
    weights_seed: int,
    storage_path: str,
    name: str,
    use_gpu: bool,
    on_epoch_end: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Run the TorchTrainer (`cfg.workers` data-parallel workers) and load the best epoch.

    Args:
        train_ds, val_ds: from `crop_datasets`.
        weights, weights_seed: where the trunk starts (`leukray.models.trunk.resolve_weights`).
        on_epoch_end: called on every worker as (epoch, rank) after the epoch's checkpoint.

    Returns:
        The history and the best epoch's `TrunkClassifier` state (`trunk_state` gives its trunk).
    """
    loop_config = {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "finetune_lr": cfg.finetune_lr,
        "stages": cfg.unfreeze_stages,
        "seed": cfg.seed,
        "num_classes": num_classes,
        "weights": weights,
        "weights_seed": weights_seed,
        "augment": augment,
        "on_epoch_end": on_epoch_end,
        "cpu_threads": max(1, int(cluster_cpus()) // max(cfg.workers, 1)),
    }
    trainer = make_trainer(
        loop_config, cfg, storage_path=storage_path, name=name, use_gpu=use_gpu,
        datasets={"train": train_ds, "val": val_ds}, loop=trunk_loop_per_worker,
    )  # fmt: skip
    result = fit_quietly(trainer)
    if result.error is not None:
        raise result.error
    return best_result(result, loop_config)
