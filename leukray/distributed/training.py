"""Train the custom ResNet50's head (the paper's Table II, step 5) with Ray Train.

`TorchTrainer` runs data-parallel workers (GPU when the cluster has them) over the trunk maps
that the Ray Data extractor computed once. Adam, binary cross-entropy, 50 epochs and batch 32
by default (the paper), reshuffled every epoch. Every epoch reports train/validation loss,
accuracy and balanced accuracy with a checkpoint through `ray.train.report`, so a run whose
worker dies (FailureConfig) or that is rerun with the same `--out` resumes from the last
checkpoint. The checkpoint with the best validation balanced accuracy is kept as the model;
the test split is never looked at here.

Input pipeline: each worker reads its own share of the maps' shards (`maps.ShardSource`:
a seeded per-epoch permutation of the shards, split between the ranks), a few shards ahead
in threads, so memory stays flat however many maps there are; it shuffles the rows in
windows of `SHUFFLE_BUFFER_ROWS`, hands them to its device in float16 chunks of
`TRANSFER_ROWS` rows (pinned on a GPU), converts them to float32 there and cuts each chunk
into the optimizer's batches. The optimizer steps on batches of `train.batch_size` (32)
exactly as the paper's schedule says: no gradient accumulation and no larger physical
batch, only fewer, larger hand-overs. With several workers every rank trains on the same
number of full chunks (the ranks agree, chunk by chunk, to stop when one runs out), as
DistributedDataParallel needs. Epoch metrics are summed on the device (one host sync per epoch, not per step) and
Adam is the fused implementation. `python -m leukray.bench` measures an epoch against a
plain torch loop over the same maps in memory (`train_ratio`).

Reproducibility: the shards' order in an epoch is seeded by (train.seed, epoch) and the
rows' shuffle by (train.seed, epoch, rank) (`epoch_seed`); the
checkpoint holds the weights, the optimizer, the epoch and every rank's
torch/CUDA/numpy/python RNG states, so a resumed run ends with the weights and history of an
uninterrupted one (tests/test_training.py).

May import: Ray, torch, numpy, `leukray.config`, `leukray.models.*`, `leukray.ops.allocator`,
`leukray.distributed.maps`, `leukray.distributed.resources`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from leukray.config import TrainConfig
from leukray.distributed.maps import MapsShards, ShardSource
from leukray.distributed.resources import torch_actor_env
from leukray.models.custom import build_custom_model
from leukray.models.trunk import resolve_weights
from leukray.ops import allocator

STATE_FILE = "state.pt"


# The worker hands its device chunks of this many rows (float16, pinned on a GPU); each
# chunk is cut on the device into the optimizer's batches of `train.batch_size`. The
# optimizer therefore steps on batches of 32 exactly as the paper does (no gradient
# accumulation, no larger physical batch), while the per-transfer cost is paid once per
# chunk instead of once per step (at batch 32 it made an epoch launch-bound on a GPU).
TRANSFER_ROWS = 256
SHUFFLE_BUFFER_ROWS = 1024


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one worker's shuffle in one epoch: a function of (seed, epoch, rank) only,
    so that a resumed run shuffles its remaining epochs as the uninterrupted run did."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def shard_order_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's shard order: the same on every rank (they split the shards)."""
    return int(np.random.SeedSequence([seed, epoch, 2**31]).generate_state(1)[0])


class EpochCounts:
    """Per-worker sums of an epoch, kept on the device (no host sync per step) and
    all-reduced into epoch metrics at the end."""

    def __init__(self, num_classes: int, device):
        import torch

        self.num_classes = num_classes
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)

    def add(self, loss, y_true, y_pred) -> None:
        """loss: the batch's mean loss (0-d tensor); y_true, y_pred: (N,) int64 tensors."""
        import torch

        self.loss_sum += loss.detach().double() * len(y_true)
        # index_add_, not bincount: bincount sizes its output from the data (a host sync)
        self.confusion.index_add_(0, y_true * self.num_classes + y_pred, torch.ones_like(y_true))

    def metrics(self, prefix: str) -> dict[str, float]:
        """Loss, accuracy and balanced accuracy (summed over workers when there are several)."""
        import torch

        flat = torch.cat([self.loss_sum.view(1), self.confusion.double()])
        flat = _all_reduce(flat).cpu().numpy()
        confusion = flat[1:].round().astype(np.int64).reshape(self.num_classes, self.num_classes)
        n = int(confusion.sum())
        support = confusion.sum(axis=1)
        recalls = np.diag(confusion)[support > 0] / support[support > 0]
        return {
            f"{prefix}_loss": float(flat[0]) / max(n, 1),
            f"{prefix}_accuracy": float(np.trace(confusion)) / max(n, 1),
            f"{prefix}_balanced_accuracy": float(recalls.mean()) if len(recalls) else float("nan"),
            f"{prefix}_rows": n,
        }


def _all_reduce(flat):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    return flat


def build_model(config: dict[str, Any]):
    """The trainable part: unfrozen trunk stages (loaded from the configured weights) + head."""
    trunk_weights = resolve_weights(config["weights"], config["weights_seed"])[0] if config["unfreeze_stages"] else None
    return build_custom_model(config, trunk_weights=trunk_weights, weights_seed=config["weights_seed"])


def build_optimizer(model, config: dict[str, Any], device):
    """Adam (the paper) on the head, and on the unfrozen trunk stages at `finetune_lr`.

    The fused implementation updates each parameter in one pass instead of a chain of
    element-wise kernels: the head's first layer has 51 M weights, so at batch 32 the
    optimizer step is a large share of the step on a CPU and most of its kernel launches on
    a GPU.
    """
    import torch

    groups = [{"params": model.head.parameters(), "lr": config["lr"], "weight_decay": config.get("weight_decay", 0.0)}]
    if config["unfreeze_stages"]:
        groups.append({"params": model.suffix.parameters(), "lr": config["finetune_lr"]})
    return torch.optim.Adam(groups, fused=device.type in ("cpu", "cuda"))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: trains on the "train" shard, validates on the "val" shard, reports
    every epoch's metrics with a checkpoint (weights, optimizer, RNG states)."""
    import ray.train
    import ray.train.torch
    import torch

    allocator.keep_freed_memory(*allocator.TENSOR)  # the batches' activations and gradients
    rank = ray.train.get_context().get_world_rank()
    seed_everything(config["seed"] + rank)
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config.get("cpu_threads"):
        # Ray gives the worker one CPU's worth of threads; the maps are already in memory and
        # the head's matrix products are the whole cost, so use the cores the node has.
        torch.set_num_threads(min(int(config["cpu_threads"]), os.cpu_count() or 1))
    model = build_model(config).to(device)
    optimizer = build_optimizer(model, config, device)
    start_epoch, history = restore_checkpoint(model, optimizer, rank)
    model = ray.train.torch.prepare_model(model)
    world = ray.train.get_context().get_world_size()
    sources = config["maps"]
    for epoch in range(start_epoch, config["epochs"]):
        tick = time.perf_counter()
        metrics = _train_epoch(model, optimizer, sources["train"], config, epoch, (rank, world), device)
        metrics["train_s"] = time.perf_counter() - tick
        metrics.update(_validate(model, sources["val"], config, (rank, world), device))
        metrics.update(epoch=epoch + 1, resumed_from=start_epoch)
        history.append(metrics)
        report_epoch(model, optimizer, metrics, history, epoch, rank)
        if rank == 0 and config.get("print_epochs", True):  # a head search prints one line per trial
            print(
                f"[train] epoch {epoch + 1}/{config['epochs']}  "
                f"loss {metrics['train_loss']:.4f}/{metrics['val_loss']:.4f}  "
                f"acc {metrics['train_accuracy']:.3f}/{metrics['val_accuracy']:.3f}  "
                f"bal.acc {metrics['train_balanced_accuracy']:.3f}/{metrics['val_balanced_accuracy']:.3f} (train/val)",
                flush=True,
            )
        if config.get("on_epoch_end") is not None:
            config["on_epoch_end"](epoch + 1, rank)


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def unwrap(model):
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def rng_state() -> dict[str, Any]:
    """The process's torch (CPU and CUDA), numpy and python RNG states, in types that
    `torch.load(weights_only=True)` reads back."""
    import random

    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "internal": list(internal), "gauss": python_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    import random

    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))


def restore_checkpoint(model, optimizer, rank: int) -> tuple[int, list[dict[str, float]]]:
    """Load the last reported checkpoint (a restarted worker or a rerun): weights, optimizer,
    this rank's RNG states; returns the epoch to start at and the history so far."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng = state.get("rng", {})
    if rank in rng:
        set_rng_state(rng[rank])
    if rank == 0:
        print(f"[train] resuming from the checkpoint of epoch {state['epoch'] + 1}", flush=True)
    return state["epoch"] + 1, state["history"]


def _chunks(source: ShardSource, config: dict[str, Any], device, ranks: tuple[int, int], epoch: int | None):
    """This rank's rows of `source` as (maps float32, label_code int64) chunks of
    `TRANSFER_ROWS` (a multiple of the batch size) on `device`: float16 until the device,
    pinned on a GPU. With `epoch` (training) the shard order and the rows are shuffled
    (seeded, in windows of `SHUFFLE_BUFFER_ROWS`) and, with several ranks, the ranks' chunks
    are cut to take the same steps (`_in_step`); without (validation) the rows come in
    stream order. The last chunk may be short."""
    import torch

    rank, world = ranks
    rows = max(TRANSFER_ROWS // config["batch_size"], 1) * config["batch_size"]
    shuffle = epoch is not None
    order = shard_order_seed(config["seed"], epoch) if shuffle else None
    rng = np.random.default_rng(epoch_seed(config["seed"], epoch, rank)) if shuffle else None
    window = max(SHUFFLE_BUFFER_ROWS, rows) if shuffle else rows
    equal = shuffle and world > 1

    def windows():
        parts, held = [], 0
        for part in source.stream(rank, world, order):
            parts.append(part)
            held += len(part["label_code"])
            if held >= window:
                yield parts
                parts, held = [], 0
        if parts:
            yield parts

    def host_chunks():
        carry: list[dict[str, np.ndarray]] = []
        for parts in windows():
            maps = np.concatenate([p["maps"] for p in carry + parts])
            codes = np.concatenate([p["label_code"] for p in carry + parts])
            if rng is not None:
                permutation = rng.permutation(len(codes))
                maps, codes = maps[permutation], codes[permutation]
            full = len(codes) - len(codes) % rows
            for start in range(0, full, rows):
                yield maps[start : start + rows], codes[start : start + rows]
            carry = [{"maps": maps[full:], "label_code": codes[full:]}] if full < len(codes) else []
        if carry:
            yield carry[0]["maps"], carry[0]["label_code"]

    for maps, codes in _in_step(host_chunks(), device, config["batch_size"]) if equal else host_chunks():
        x = torch.from_numpy(np.ascontiguousarray(maps))
        if device.type == "cuda":
            x = x.pin_memory()
        yield x.to(device, non_blocking=True).float(), torch.from_numpy(codes).to(device, non_blocking=True)


def _in_step(chunks, device, batch_size: int):
    """`chunks` cut so that every rank takes the same steps: each chunk is cut to the
    smallest of the ranks' chunks (in whole batches; one all-reduce per chunk), and the
    epoch ends when any rank has run out. DistributedDataParallel's ranks must take the same
    number of steps; this drops less than a batch per rank, plus what one rank holds more
    than the others."""
    for maps, codes in chunks:
        n = _smallest_over_ranks(len(codes) - len(codes) % batch_size, device)
        if n == 0:
            return
        yield maps[:n], codes[:n]
    _smallest_over_ranks(0, device)


def _smallest_over_ranks(mine: int, device) -> int:
    import torch
    import torch.distributed as dist

    value = torch.tensor([mine], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def _train_epoch(model, optimizer, source, config: dict[str, Any], epoch: int, ranks, device) -> dict[str, float]:
    head, batch_size = unwrap(model).head, config["batch_size"]
    model.train()
    counts = EpochCounts(config["num_classes"], device)
    for maps, labels in _chunks(source, config, device, ranks, epoch):
        for start in range(0, len(labels), batch_size):
            x, target = maps[start : start + batch_size], labels[start : start + batch_size]
            if len(target) < 2:
                continue  # BatchNorm cannot train on a single sample
            logits = model(x)
            loss = head.loss(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            counts.add(loss, target, head.probabilities(logits.detach()).argmax(dim=1))
    return counts.metrics("train")


def _validate(model, source, config: dict[str, Any], ranks, device) -> dict[str, float]:
    """Validation metrics; every rank runs the unwrapped model on its own shards (no
    collective per batch, so the ranks need not hold the same number of rows)."""
    import torch

    core = unwrap(model)
    core.eval()
    counts = EpochCounts(config["num_classes"], device)
    with torch.no_grad():
        for maps, target in _chunks(source, config, device, ranks, None):
            logits = core(maps)
            counts.add(core.head.loss(logits, target), target, core.head.probabilities(logits).argmax(dim=1))
    return counts.metrics("val")


def report_epoch(
    model, optimizer, metrics: dict[str, float], history: list[dict[str, float]], epoch: int, rank: int
) -> None:
    """The epoch's metrics to Ray Train, with rank 0's checkpoint: model, optimizer,
    history, the epoch (which also keys every later epoch's shuffle) and every rank's RNG
    states, so that a resumed run continues as the uninterrupted one would have."""
    import ray.train
    import torch
    import torch.distributed as dist

    rng = {rank: rng_state()}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rng[rank])
        rng = dict(enumerate(gathered))
    with tempfile.TemporaryDirectory() as directory:
        if rank == 0:
            state = {
                "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "history": history,
                "rng": rng,
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


def fit_quietly(fittable: Any) -> Any:
    """`fittable.fit()` (a Ray trainer or tuner) with Ray Data's progress bars off: its
    per-epoch bars inside the workers would drown the epoch lines."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        return fittable.fit()
    finally:
        context.enable_progress_bars = saved


def train_head(
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
    on_epoch_end: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Run the TorchTrainer and load the best checkpoint.

    Args:
        train, val: the maps' rows of each split (`split_maps`).
        on_epoch_end: called on every worker as (epoch, rank) once the epoch's checkpoint is
            reported (picklable; e.g. `leukray.testing.KillWorkerOnce`).
    """

    loop_config = head_loop_config(cfg, in_features, num_classes, weights, weights_seed, on_epoch_end)
    loop_config["maps"] = {"train": train, "val": val}
    trainer = make_trainer(loop_config, cfg, storage_path=storage_path, name=name, use_gpu=use_gpu)
    result = fit_quietly(trainer)
    if result.error is not None:
        raise result.error
    return best_result(result, loop_config)


def head_loop_config(
    cfg: TrainConfig,
    in_features: int,
    num_classes: int,
    weights: str,
    weights_seed: int,
    on_epoch_end: Callable[[int, int], None] | None = None,
    concurrent_runs: int = 1,
) -> dict[str, Any]:
    """`train_loop_per_worker`'s config from the train settings; the node's cores are shared
    among the workers of `concurrent_runs` trainers (a head search's parallel trials)."""
    from leukray.distributed.resources import cluster_cpus

    return {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "finetune_lr": cfg.finetune_lr,
        "dropout": cfg.dropout,
        "weight_decay": cfg.weight_decay,
        "unfreeze_stages": cfg.unfreeze_stages,
        "seed": cfg.seed,
        "in_features": in_features,
        "num_classes": num_classes,
        "weights": weights,
        "weights_seed": weights_seed,
        "on_epoch_end": on_epoch_end,
        "cpu_threads": max(1, int(cluster_cpus()) // max(cfg.workers * concurrent_runs, 1)),
    }


def make_trainer(
    loop_config: dict[str, Any],
    cfg: TrainConfig,
    *,
    storage_path: str,
    name: str,
    use_gpu: bool,
    datasets: dict[str, Any] | None = None,
    loop: Callable[[dict[str, Any]], None] | None = None,
    callbacks: list[Any] | None = None,
    keep_checkpoints: int = 1,
):
    """A TorchTrainer running `loop` (default `train_loop_per_worker`, which reads the maps
    named in `loop_config["maps"]`; the trunk's is `trunktraining.trunk_loop_per_worker`
    over Ray `datasets`) that keeps the best epoch's checkpoint (by validation balanced
    accuracy) under storage_path/name, and restarts dead workers up to train.max_failures.
    `callbacks`: Ray Train callbacks (a head search's epoch forwarder); `keep_checkpoints`:
    how many of the best epochs' checkpoints are kept."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    # Rows of `datasets` reach the worker in the dataset's own (deterministic) order: the
    # shuffle is the worker's seeded one, so that two runs, or a run and its resumption, see
    # the same batches.
    ingest = ray.data.ExecutionOptions(preserve_order=True)
    return TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # the loop runs in Ray Train's training thread: one malloc arena (allocator.worker_env)
            worker_runtime_env=torch_actor_env().get("runtime_env"),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=keep_checkpoints,
                checkpoint_score_attribute="val_balanced_accuracy",
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )


def best_result(result, loop_config: dict[str, Any]) -> TrainResult:
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


def split_maps(maps: MapsShards, classes: list[str]) -> tuple[ShardSource, ShardSource]:
    """(train, val) rows of the extractor's maps for the workers to read: the training split
    with its augmented copies, validation originals only, labels coded by their index in
    `classes`. The extractor writes the shards in a seeded random row order
    (`streaming.extract_features`), so neighbouring rows are not all of one class."""
    from leukray.data.splits import TRAIN, VAL

    return maps.source(classes, TRAIN, originals_only=False), maps.source(classes, VAL, originals_only=True)
