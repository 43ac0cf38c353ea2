"""`make bench` (``python -m leukray.bench``): what Ray buys on this machine, as ratios.

Four stages of the pipeline are timed against a plain baseline in the same run, on the
same data, and reported as ratios (these machines are shared and noisy, so absolute numbers
move; ratios measured side by side move much less):

1. ``preprocess_speedup``: decode + Otsu-crop + resize through Ray Data
   (`leukray.distributed.actors.preprocess_batch` in ``map_batches`` over
   ``from_pandas(row_blocks(...))``, 1-CPU tasks on every local CPU, every crop kept in
   the object store: a materialised `whole_output_pass`, as the trunk-training crops are
   cut) over a plain single-process loop of `decode_image` + `preprocess_image` into one
   array. Target >= 1.6x on 2 cores.
   The streaming stage, with the extractor behind preprocessing, is section 5's.
2. ``extract_ratio``: ResNet50 features through the `FeatureExtractor` actor in Ray Data
   over a plain torch loop (same trunk, batches of 32, `torch.inference_mode`, one torch
   thread per core), on the same crops. images/s ratio; target >= 0.8. Model loading and a
   first forward pass are left out of both and reported separately.
3. ``sweep_time_ratio``: `run_sweep_tune` over all of Lazy Predict's classifiers, seconds
   divided by Lazy Predict's own sequential ``LazyClassifier.fit`` on the same features
   and the same integer labels. Target <= 0.65 on 2 cores.
4. ``train_ratio``: an epoch of the Table II head (100,352 inputs, batch 32) through
   `leukray`'s Ray Train path (`training.split_maps` + `training.train_head` over float16
   maps written as shards and read back, as `leukray run` does; the epoch timed inside the worker) over a plain
   torch loop with the same model, optimizer and batch size over the same maps held in
   memory (run as one Ray task holding every CPU, so both sides are worker processes with
   the same niceness and torch threads). maps/s ratio; target >= 0.7. Each run trains a
   few epochs; the first of each run is warm-up and the fastest later epoch counts.

5. ``e2e`` (`leukray.tools.bench_e2e`; alone with ``--e2e``): `leukray extract` end to end
   against the CPU ceiling (a plain ``multiprocessing.Pool``) and the extractor ceiling (crops
   in memory) on the same images, and its peak memory at N and 10 x N images:
   ``stage_ratio`` (target >= 0.8 on a CPU machine, >= 0.9 with a GPU), ``command_ratio``
   (>= 0.75 of that), ``memory_growth`` (<= 1.5), ``gpu_busy``.

6. ``screen`` (`leukray.tools.bench_screen`; alone with ``--screen``, not part of a full run): `leukray screen` over
synthetic pyramidal TIFF slides, fields/s and cells/s, and peak driver RSS and object-store
use at N and 10 x N slides (``memory_growth``, target <= 1.3).

Preprocessing and extraction run several times, baseline and Ray interleaved (alternating
which goes first), and the fastest run of each side counts (other load on a shared machine can only slow a run down).
The sweep runs once per side. Ray's workers are started at niceness 0 like the baselines
(Ray's default is 15, which on a shared machine hands the CPUs to everyone else first).

The table goes to stdout (PASS/MISS per target) and everything to ``bench.json`` in the
working directory. The exit status is 0 even when a target is missed: this is a report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import numpy as np
import pandas as pd

from leukray.config import AugmentConfig, PreprocessConfig
from leukray.data.discovery import IMAGE_EXTENSIONS
from leukray.distributed.actors import FeatureExtractor, preprocess_batch
from leukray.distributed.resources import torch_actor_env, whole_output_pass
from leukray.distributed.streaming import row_blocks, stream_block_rows
from leukray.distributed.tuning import run_sweep_tune
from leukray.io import storage
from leukray.models.classifiers import SweepData, class_order, select_classifiers
from leukray.models.trunk import build_trunk, images_to_tensor, resolve_weights
from leukray.ops import allocator
from leukray.ops.preprocess import decode_image, preprocess_image
from leukray.tools.bench_e2e import ready_out

TARGETS = {
    "preprocess_speedup": (">=", 1.6),
    "extract_ratio": (">=", 0.8),
    "sweep_time_ratio": ("<=", 0.65),
    "train_ratio": (">=", 0.7),
}
SECTIONS = ("preprocess", "extract", "sweep", "train", "e2e")
E2E_TARGETS = {"memory_growth": ("<=", 1.5), "maps_memory_growth": ("<=", 1.3)}
E2E_LABELS = {"memory_growth": "peak memory scale x N / N", "maps_memory_growth": "train (maps) peak x N / N"}
EXTRACT_SETUPS = ("one-actor-all-cpus", "fixed-pool-1cpu", "autoscaling-pool-1cpu")


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def machine_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under ``taskset``), else
    `os.cpu_count()`."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# -- data -----------------------------------------------------------------------------------


def synthetic_images(out_dir: str, cells: int, seed: int = 0) -> pd.DataFrame:
    """Write `cells` synthetic C-NMC-style images (`generate_dataset`, 12 subjects).

    Returns:
        Columns path, label.
    """
    from leukray.tools.synth import generate_dataset

    frame = generate_dataset(out_dir, cells=cells, subjects=min(12, cells), seed=seed, workers=machine_cpus())
    return frame[["path", "label"]].reset_index(drop=True)


def folder_images(root: str, limit: int) -> pd.DataFrame:
    """Images under a class-per-folder tree such as C-NMC's ``fold_0/{all,hem}``, read in
    place (never copied).

    Returns:
        Columns path, label (the parent folder's name): at most `limit` rows, spread
        evenly over the sorted file list when there are more.
    """
    paths = [p for p in storage.list_files(root) if p.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
        raise SystemExit(f"bench: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    if limit and len(paths) > limit:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    labels = [os.path.basename(os.path.dirname(p)).lower() for p in paths]
    return pd.DataFrame({"path": paths, "label": labels})


# -- 1. preprocessing -----------------------------------------------------------------------


def preprocess_loop_seconds(paths: list[str], cfg: PreprocessConfig) -> tuple[float, np.ndarray]:
    """The baseline: one process, one image after another, `decode_image` +
    `preprocess_image` (reading with `storage.read_bytes`, as the Ray path does).

    Returns:
        (seconds, N x size x size x 3 crops).
    """
    start = time.perf_counter()
    crops = [preprocess_image(decode_image(storage.read_bytes(p)), cfg) for p in paths]
    seconds = time.perf_counter() - start
    return seconds, np.stack(crops)


def _stamped_preprocess_batch(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    """`preprocess_batch` plus the wall-clock span of the call (columns t_begin, t_end),
    from which the benchmark tells how many tasks Ray Data kept busy at once."""
    begin = time.time()
    out = preprocess_batch(batch, **kwargs)
    n = len(out["path"])
    out["t_begin"] = np.full(n, begin)
    out["t_end"] = np.full(n, time.time())
    return out


def preprocess_ray_seconds(
    frame: pd.DataFrame, cfg: PreprocessConfig, rows_per_block: int, batch_size: int
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Ray Data's preprocessing pass: ``from_pandas(row_blocks(...))`` ->
    ``map_batches(preprocess_batch)`` in 1-CPU tasks, every crop kept (`whole_output_pass`),
    materialised in the object store as `leukray.distributed.trunktraining.crop_datasets`
    keeps the trunk's crops for the next stage. The clock stops there: the crops are then
    all in memory, as the loop's are when it stops. Reading them back into this process
    (for the check against the loop's, and the busy figure) is not timed; gathered into one
    array here instead, they cost the driver 0.7-1.8 s more on 2 cores, with every worker
    already done (docs/measurements.md, "A full `make bench` on this machine, and the
    preprocessing pass's gather").

    Returns:
        (seconds, mean number of batches being preprocessed at once, crops, labels), rows
        in input order.
    """
    import ray

    rows = frame[["path", "label"]].assign(n_aug=0, row=np.arange(len(frame)))
    start = time.perf_counter()
    ds = whole_output_pass(
        ray.data.from_pandas(row_blocks(rows, rows_per_block)).map_batches(
            _stamped_preprocess_batch,
            batch_format="numpy",
            batch_size=batch_size,
            fn_kwargs={"cfg": cfg, "augment": AugmentConfig(), "seed": 0},
        )
    ).materialize()
    seconds = time.perf_counter() - start
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("row", "image", "label", "error", "path", "t_begin", "t_end")}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for key, values in parts.items():
            values.append(batch[key])
    got = {k: np.concatenate(v) for k, v in parts.items()}
    del ds
    failed = [f"{p}: {e}" for p, e in zip(got["path"], got["error"]) if e]
    if failed:
        raise SystemExit(f"bench: preprocessing failed for {len(failed)} image(s), e.g. {failed[:3]}")
    spans = np.unique(np.stack([got["t_begin"], got["t_end"]], axis=1), axis=0)
    busy_at_once = float((spans[:, 1] - spans[:, 0]).sum() / seconds)
    order = np.argsort(got["row"])
    return seconds, busy_at_once, got["image"][order], got["label"].astype(str)[order]


def measure_preprocess(
    frame: pd.DataFrame, cfg: PreprocessConfig, repeats: int, rows_per_block: int, batch_size: int
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Ray Data preprocessing vs the plain loop, and the machine's own ceiling for the same
    work (`bench_e2e.cpu_ceiling`: a ``multiprocessing.Pool`` over every CPU), best of
    `repeats` interleaved runs each.

    Untimed first: every file is read once (both sides then find it in the page cache), a
    small Ray Data run starts the workers and imports leukray in them, and the loop
    preprocesses a few images.

    Returns:
        (results, crops, labels).
    """
    from leukray.tools.bench_e2e import cpu_ceiling

    paths = frame["path"].tolist()
    for p in paths:
        storage.read_bytes(p)
    preprocess_ray_seconds(frame.iloc[: 2 * rows_per_block], cfg, rows_per_block, batch_size)
    preprocess_loop_seconds(paths[:8], cfg)
    runs: dict[str, list[float]] = {"loop": [], "ray": [], "pool": []}
    busy: list[float] = []
    loop_crops = crops = labels = None
    for i in range(repeats):
        for side in ("loop", "ray", "pool") if i % 2 == 0 else ("pool", "ray", "loop"):  # alternate the order
            if side == "loop":
                seconds, loop_crops = preprocess_loop_seconds(paths, cfg)
            elif side == "ray":
                seconds, at_once, crops, labels = preprocess_ray_seconds(frame, cfg, rows_per_block, batch_size)
                busy.append(at_once)
            else:
                seconds = cpu_ceiling(paths, machine_cpus())["seconds"]
            runs[side].append(seconds)
        log(
            f"preprocess run {i + 1}/{repeats}: loop {runs['loop'][-1]:.2f}s, ray {runs['ray'][-1]:.2f}s, "
            f"pool {runs['pool'][-1]:.2f}s ({len(paths)} images; Ray tasks busy at once: {at_once:.2f} on average)"
        )
    if not np.array_equal(loop_crops, crops):
        raise SystemExit("bench: the Ray Data crops differ from the loop's crops")
    n = len(paths)
    loop_s, ray_s, pool_s = min(runs["loop"]), min(runs["ray"]), min(runs["pool"])
    results = {
        "preprocess_images": n,
        "preprocess_loop_s": round(loop_s, 5),  # to 10 us: a small run's pool side takes milliseconds
        "preprocess_ray_s": round(ray_s, 5),
        "preprocess_pool_s": round(pool_s, 5),
        "preprocess_loop_images_per_s": round(n / loop_s, 1),
        "preprocess_ray_images_per_s": round(n / ray_s, 1),
        "preprocess_pool_images_per_s": round(n / pool_s, 1),
        "preprocess_speedup": round(loop_s / ray_s, 3),
        # What this machine's CPUs allow at all: a plain multiprocessing.Pool over every CPU
        # (no crops shipped back) against the loop; and Ray Data against that ceiling.
        "preprocess_pool_speedup": round(loop_s / pool_s, 3),
        "preprocess_ray_vs_pool": round(pool_s / ray_s, 3),
        "preprocess_runs_s": {side: [round(s, 3) for s in values] for side, values in runs.items()},
        "preprocess_ray_tasks_busy_at_once": round(busy[int(np.argmin(runs["ray"]))], 2),
        "preprocess_ray_setup": {
            "rows_per_block": rows_per_block,
            "batch_size": batch_size,
            "num_cpus_per_task": 1,
            "consumed_with": "materialize (the crops in the object store; read back untimed)",
            "op_resource_reservation": False,
            "warm_up": (
                "one untimed Ray Data run (workers started, leukray imported); files pre-read into the page cache"
            ),
        },
    }
    return results, crops, labels


# -- 2. feature extraction ------------------------------------------------------------------


def warm_up(extract: Callable[[np.ndarray], Any], size: int) -> None:
    """One forward pass of two blank crops (allocator, kernels, thread pool)."""
    extract(np.zeros((2, size, size, 3), dtype=np.uint8))


def extract_loop_seconds(
    crops: np.ndarray, weights: str, seed: int, batch_size: int, threads: int
) -> tuple[float, float, np.ndarray]:
    """The baseline: `build_trunk` + `images_to_tensor` in a plain torch loop, batches of
    `batch_size`, `torch.inference_mode`, `threads` torch threads, under the allocator
    setting the extraction actors run with (`allocator.TENSOR`, for this call only), so the
    ratio is Ray's cost alone.

    Returns:
        (seconds for the crops, seconds to load the model and warm it up, N x 2048 features).
    """
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    state, _ = resolve_weights(weights, seed)
    model = build_trunk(state, seed)

    def extract(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(images_to_tensor(images, torch.device("cpu"), channels_last=False)).numpy()

    with allocator.kept_freed_memory(*allocator.TENSOR):
        warm_up(extract, crops.shape[1])
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        out = [extract(crops[i : i + batch_size]) for i in range(0, len(crops), batch_size)]
        return time.perf_counter() - start, load_s, np.concatenate(out)


class TimedFeatureExtractor(FeatureExtractor):
    """`FeatureExtractor` unchanged, plus a warm-up forward pass in the constructor and
    per-batch wall-clock stamps, so that the benchmark can leave model loading out."""

    def __init__(self, weights: str, seed: int = 0, threads: int = 0):
        start = time.perf_counter()
        if threads:  # FeatureExtractor takes its torch thread count from OMP_NUM_THREADS
            os.environ["OMP_NUM_THREADS"] = str(threads)
        super().__init__(weights, seed, device="cpu")
        warm_up(self.extract, 224)
        self.load_s = time.perf_counter() - start

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        begin = time.time()
        out = super().__call__(batch)
        n = len(out["features"])
        out["t_begin"] = np.full(n, begin)
        out["load_s"] = np.full(n, self.load_s)
        out["actor_pid"] = np.full(n, os.getpid())
        out["torch_threads"] = np.full(n, torch.get_num_threads())
        return out


def crops_dataset(crops: np.ndarray, blocks: int):
    """The crops as a materialised Ray dataset (columns row, image, error) of `blocks`
    blocks, so that extraction starts from data already in the object store."""
    import ray

    items = [{"row": i, "image": crop, "error": ""} for i, crop in enumerate(crops)]
    return ray.data.from_items(items, override_num_blocks=max(1, min(blocks, len(crops)))).materialize()


def extract_ray_seconds(crops_ds, weights: str, seed: int, batch_size: int, setup: str, cpus: int) -> dict[str, Any]:
    """Feature extraction through `FeatureExtractor` in ``map_batches`` with an actor pool,
    over a dataset of crops already in the object store.

    Args:
        setup: ``one-actor-all-cpus``: one actor holding every CPU, torch using as many
            threads (the loop's shape, and `leukray run`'s on a one-node CPU machine, which
            holds one slot fewer: `resources.cpu_pool`); ``fixed-pool-1cpu``: one 1-CPU,
            1-thread actor per CPU, all started up front; ``autoscaling-pool-1cpu``: 1 to
            `cpus` such actors (what `leukray run` did before, and stayed at one).

    Returns:
        seconds (from the first batch an actor starts to the last row reaching the driver:
        model loading is left out), wall_s (everything, actor start-up included), load_s
        (the slowest actor's load + warm-up), actors, torch_threads, features.
    """
    import ray

    if setup == "one-actor-all-cpus":
        pool, num_cpus, threads = ray.data.ActorPoolStrategy(size=1), cpus, cpus
    elif setup == "fixed-pool-1cpu":
        pool, num_cpus, threads = ray.data.ActorPoolStrategy(size=cpus), 1, 1
    elif setup == "autoscaling-pool-1cpu":
        pool, num_cpus, threads = ray.data.ActorPoolStrategy(min_size=1, max_size=cpus), 1, 1
    else:
        raise ValueError(f"unknown extract setup {setup!r}; choose from {', '.join(EXTRACT_SETUPS)}")
    ds = crops_ds.map_batches(
        TimedFeatureExtractor,
        batch_format="numpy",
        batch_size=batch_size,
        fn_constructor_kwargs={"weights": weights, "seed": seed, "threads": threads},
        compute=pool,
        num_cpus=num_cpus,
        **torch_actor_env(),  # as `leukray run` starts its extraction actors
    )
    start = time.perf_counter()
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("row", "features", "t_begin", "load_s", "actor_pid", "torch_threads")
    }
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for key, values in parts.items():
            values.append(batch[key])
    end_wall, end_clock = time.perf_counter(), time.time()
    got = {k: np.concatenate(v) for k, v in parts.items()}
    return {
        "seconds": end_clock - float(got["t_begin"].min()),
        "wall_s": end_wall - start,
        "load_s": float(got["load_s"].max()),
        "actors": int(len(np.unique(got["actor_pid"]))),
        "torch_threads": int(got["torch_threads"].max()),
        "features": got["features"][np.argsort(got["row"])],
    }


def measure_extract(
    crops: np.ndarray, weights: str, seed: int, batch_size: int, setups: list[str], repeats: int, cpus: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Ray Data actor extraction vs the plain torch loop, best of `repeats` interleaved runs.

    With several `setups`, each runs in every round and the fastest is the headline (all
    are listed under ``extract_setups_compared``).

    Returns:
        (results, N x 2048 features from the actor path).
    """
    crops_ds = crops_dataset(crops, blocks=max(2 * cpus, math.ceil(len(crops) / batch_size)))
    loop_runs, loop_loads = [], []
    runs: dict[str, list[dict[str, Any]]] = {setup: [] for setup in setups}
    loop_features = None
    for i in range(repeats):
        done = []
        order = ["loop", *setups] if i % 2 == 0 else [*setups, "loop"]  # alternate who goes first
        for side in order:
            if side == "loop":
                seconds, load_s, loop_features = extract_loop_seconds(crops, weights, seed, batch_size, cpus)
                loop_runs.append(seconds)
                loop_loads.append(load_s)
                done.append(f"loop {seconds:.2f}s")
            else:
                got = extract_ray_seconds(crops_ds, weights, seed, batch_size, side, cpus)
                runs[side].append(got)
                done.append(
                    f"{side} {got['seconds']:.2f}s "
                    f"(wall {got['wall_s']:.2f}s with actor start-up, {got['actors']} actor(s))"
                )
        log(f"extract run {i + 1}/{repeats} ({len(crops)} crops): " + "; ".join(done))
    best = {setup: min(r, key=lambda g: g["seconds"]) for setup, r in runs.items()}
    setup = min(best, key=lambda k: best[k]["seconds"])
    features = best[setup]["features"]
    scale = max(1e-6, float(np.nanmax(np.abs(loop_features))))
    gap = float(np.nanmax(np.abs(features - loop_features))) / scale
    if not gap < 1e-3:
        raise SystemExit(f"bench: actor features differ from the loop's (max relative difference {gap:.2e})")
    return _extract_results(
        len(crops), weights, batch_size, cpus, setups, setup, best, runs, loop_runs, loop_loads
    ), features


def _extract_results(
    n: int,
    weights: str,
    batch_size: int,
    cpus: int,
    setups: list[str],
    setup: str,
    best: dict[str, dict[str, Any]],
    runs: dict[str, list[dict[str, Any]]],
    loop_runs: list[float],
    loop_loads: list[float],
) -> dict[str, Any]:
    """bench.json's extraction figures from the timed runs."""
    chosen = best[setup]
    loop_s, ray_s = min(loop_runs), chosen["seconds"]
    results: dict[str, Any] = {
        "extract_images": n,
        "extract_loop_s": round(loop_s, 3),
        "extract_ray_s": round(ray_s, 3),
        "extract_loop_images_per_s": round(n / loop_s, 2),
        "extract_ray_images_per_s": round(n / ray_s, 2),
        "extract_ratio": round(loop_s / ray_s, 3),
        "extract_ray_wall_s": round(chosen["wall_s"], 3),
        "extract_loop_model_load_s": round(min(loop_loads), 3),
        "extract_ray_model_load_s": round(chosen["load_s"], 3),
        "extract_runs_s": {
            "loop": [round(s, 3) for s in loop_runs],
            setup: [round(g["seconds"], 3) for g in runs[setup]],
        },
        "extract_actor_setup": {
            "setup": setup,
            "actors": chosen["actors"],
            "num_cpus_per_actor": cpus if setup == "one-actor-all-cpus" else 1,
            "torch_threads_per_actor": chosen["torch_threads"],
            "batch_size": batch_size,
            "loop_torch_threads": cpus,
            "timed_from": (
                "first batch an actor starts (model load and warm-up pass excluded) to the last row in the driver"
            ),
            "model_load_note": (
                "the actor's load time includes importing torch/torchvision in a fresh process; the loop's does not"
            ),
            "chosen": "the only setup run" if len(setups) == 1 else "fastest of the setups compared",
        },
        "extract_weights": weights,
    }
    if len(setups) > 1:
        results["extract_setups_compared"] = {
            name: {
                "ray_s": round(g["seconds"], 3),
                "images_per_s": round(n / g["seconds"], 2),
                "ratio": round(loop_s / g["seconds"], 3),
                "wall_s": round(g["wall_s"], 3),
                "runs_s": [round(r["seconds"], 3) for r in runs[name]],
            }
            for name, g in best.items()
        }
    return results


# -- 3. classifier sweep --------------------------------------------------------------------


def derive_sweep_features(
    features: np.ndarray, labels: np.ndarray, rows: int, test_fraction: float, seed: int
) -> tuple[SweepData, str]:
    """A sweep-sized train/test set grown from a few hundred extracted feature vectors.

    The extracted rows are split (stratified) into a train pool and a test pool; every new
    row is a random convex combination of two same-class rows of its pool times
    element-wise log-normal noise (sigma 0.1), so rows stay non-negative (like post-ReLU
    average-pooled ResNet features), keep the class structure and the class balance, and
    no test row is made from a training row. Labels are integer codes as in
    `leukray.models.classifiers.sweep_data` (ALL, the positive class, is code 1).

    Returns:
        (SweepData with no validation split, a one-line description).
    """
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    classes = class_order(labels, "all")
    code = {name: i for i, name in enumerate(classes)}
    codes = np.fromiter((code[str(v)] for v in labels), dtype=np.int64, count=len(labels))
    train_idx, test_idx = train_test_split(
        np.arange(len(features)), test_size=test_fraction, random_state=seed, stratify=codes
    )
    n_test = int(round(rows * test_fraction))

    def grow(pool: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        picks = rng.choice(pool, size=n)
        y = codes[picks]
        partner = np.empty(n, dtype=np.int64)
        for code in np.unique(y):
            where = np.flatnonzero(y == code)
            partner[where] = rng.choice(pool[codes[pool] == code], size=len(where))
        w = rng.uniform(0.0, 1.0, size=(n, 1)).astype(np.float32)
        noise = rng.lognormal(0.0, 0.1, size=(n, features.shape[1])).astype(np.float32)
        return ((w * features[picks] + (1.0 - w) * features[partner]) * noise).astype(np.float32), y

    X_train, y_train = grow(train_idx, rows - n_test)
    X_test, y_test = grow(test_idx, n_test)
    no_val = np.zeros((0, features.shape[1]), np.float32), np.zeros(0, dtype=y_train.dtype)
    desc = (
        f"derived: {len(X_train)} train + {len(X_test)} test rows, each a random convex mix of two same-class "
        f"rows of the {len(features)} extracted {features.shape[1]}-d ResNet50 features (train and test pools "
        "split beforehand) times log-normal noise (sigma 0.1); non-negative; "
        f"labels {classes} as codes 0..{len(classes) - 1}"
    )
    return SweepData(X_train, y_train, *no_val, X_test, y_test, classes=classes), desc


def sweep_tune_seconds(
    data: SweepData, names: list[str], timeout_s: float, cpus_per_trial: float
) -> tuple[float, pd.DataFrame]:
    """`run_sweep_tune` over `names` (one Ray Tune trial each) into a temporary storage path."""
    storage_path = tempfile.mkdtemp(prefix="leukray-bench-tune-")
    try:
        start = time.perf_counter()
        board = run_sweep_tune(
            data, names, seed=42, timeout_s=timeout_s, cpus_per_trial=cpus_per_trial, storage_path=storage_path
        )
        return time.perf_counter() - start, board
    finally:
        shutil.rmtree(storage_path, ignore_errors=True)


def sweep_lazy_seconds(data: SweepData) -> tuple[float, pd.DataFrame, dict[str, str]]:
    """The baseline: Lazy Predict's own sequential ``LazyClassifier.fit`` (its defaults).

    Returns:
        (seconds, its scores table, the errors of the classifiers it dropped).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lazypredict.Supervised import LazyClassifier

        logging.getLogger("lazypredict").setLevel(logging.ERROR)
        clf = LazyClassifier(verbose=0, ignore_warnings=True)
        start = time.perf_counter()
        scores = clf.fit(data.X_train, data.X_test, data.y_train, data.y_test)
        seconds = time.perf_counter() - start
    if isinstance(scores, tuple):  # (scores, predictions)
        scores = scores[0]
    errors = {
        name: f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        for name, exc in clf.errors.items()
    }
    return seconds, scores, errors


def measure_sweep(data: SweepData, timeout_s: float, cpus_per_trial: float) -> dict[str, Any]:
    """Ray Tune sweep vs sequential Lazy Predict on the same features, once each."""
    names = select_classifiers("all")
    log(
        f"sweep: Lazy Predict, {len(names)} classifiers one after another "
        f"on {len(data.y_train)} x {data.X_train.shape[1]} ..."
    )
    lazy_s, scores, lazy_errors = sweep_lazy_seconds(data)
    log(f"sweep: Lazy Predict took {lazy_s:.1f}s ({len(scores)} classifiers scored); now Ray Tune ...")
    tune_s, board = sweep_tune_seconds(data, names, timeout_s, cpus_per_trial)
    log(f"sweep: Ray Tune took {tune_s:.1f}s ({int((board['status'] == 'ok').sum())} classifiers scored)")
    lazy_times = scores["Time Taken"] if "Time Taken" in scores.columns else pd.Series(dtype=float)
    tune_times = board.set_index("Model")["Time Taken"].dropna()
    return {
        "sweep_train_rows": int(len(data.y_train)),
        "sweep_test_rows": int(len(data.y_test)),
        "sweep_classifiers": len(names),
        "sweep_tune_s": round(tune_s, 2),
        "sweep_lazy_s": round(lazy_s, 2),
        "sweep_time_ratio": round(tune_s / lazy_s, 3),
        "sweep_tune_setup": {
            "cpus_per_trial": cpus_per_trial,
            "timeout_s_per_classifier": timeout_s,
            "order": "select_classifiers('all')",
        },
        "sweep_tune_status": {str(k): int(v) for k, v in board["status"].value_counts().items()},
        "sweep_tune_sum_of_fit_s": round(float(tune_times.sum()), 2),
        "sweep_lazy_sum_of_fit_s": round(float(lazy_times.sum()), 2),
        "sweep_tune_slowest_s": {
            str(k): round(float(v), 2) for k, v in tune_times.sort_values(ascending=False).head(6).items()
        },
        "sweep_lazy_slowest_s": {
            str(k): round(float(v), 2) for k, v in lazy_times.sort_values(ascending=False).head(6).items()
        },
        "sweep_lazy_scored": int(len(scores)),
        "sweep_lazy_failed": lazy_errors,
        "sweep_tune_failed": {
            str(r["Model"]): str(r["detail"])[:120] for _, r in board[board["status"] != "ok"].iterrows()
        },
    }


# -- 4. head training -----------------------------------------------------------------------


def synthetic_maps(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` trunk maps as the extractor emits them for 224x224 crops (2048 x 7 x 7 float16,
    non-negative like post-ReLU activations) and alternating labels "all"/"hem", class
    "all" a little brighter so there is something to learn."""
    rng = np.random.default_rng(seed)
    labels = np.where(np.arange(n) % 2 == 0, "all", "hem")
    maps = np.abs(rng.normal(size=(n, 2048, 7, 7))).astype(np.float16)
    maps[labels == "all"] += np.float16(0.1)
    return maps, labels


def maps_shards(maps: np.ndarray, labels: np.ndarray, tmp: str, val_every: int = 8):
    """The maps as `leukray run` hands them to Ray Train: written as 32-row shards under
    `tmp` (`leukray.distributed.maps.write_maps`) for the workers to read, with path, label,
    split (every `val_every`-th row "val"), aug_index and error.

    Returns:
        (the shards, the number of training rows).
    """
    from leukray.distributed.maps import write_maps
    from leukray.distributed.streaming import ROWS_PER_BLOCK

    n = len(maps)
    split = np.where(np.arange(n) % val_every == 0, "val", "train")
    rows = {
        "path": np.asarray([f"m{i}" for i in range(n)], dtype=object), "label": np.asarray(labels, dtype=object),
        "subject": np.asarray(["s"] * n, dtype=object), "split": np.asarray(split, dtype=object),
        "aug_index": np.zeros(n, np.int64), "error": np.asarray([""] * n, dtype=object), "maps": maps,
    }  # fmt: skip
    return write_maps(tmp, "bench", rows, ROWS_PER_BLOCK), int((split == "train").sum())


def _train_config(epochs: int, batch_size: int, on_gpu: bool):
    from leukray.config import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=batch_size, use_gpu=str(on_gpu).lower(), max_failures=0)


def train_loop_epochs(
    maps: np.ndarray, labels: np.ndarray, epochs: int, batch_size: int, threads: int, on_gpu: bool = False
) -> list[float]:
    """The baseline: the same model (`training.build_model`), optimizer
    (`training.build_optimizer`) and batch size in a plain torch loop over the training
    rows held in memory as float16, shuffled with `torch.randperm`, converted to float32 per
    batch, with the same per-batch bookkeeping (`EpochCounts`), under the allocator setting
    of the Ray Train workers (`allocator.TENSOR`, for this call only). With `on_gpu` the
    maps are held on the GPU (the fastest a plain loop can be fed).

    Returns:
        seconds of each epoch.
    """
    import torch

    from leukray.distributed.training import EpochCounts, build_model, build_optimizer

    torch.set_num_threads(threads)
    device = torch.device("cuda" if on_gpu else "cpu")
    keep = np.arange(len(maps)) % 8 != 0  # the rows `maps_shards` puts in "train"
    x_all = torch.from_numpy(maps[keep]).to(device)
    y_all = torch.from_numpy((labels[keep] == "all").astype(np.int64)).to(device)
    config = {"in_features": 100_352, "num_classes": 2, "dropout": 0.5, "unfreeze_stages": 0, "embedding": 256}
    config.update(weights="random", weights_seed=0, lr=1e-3, finetune_lr=1e-5)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = build_optimizer(model, config, device)
    generator = torch.Generator().manual_seed(0)
    with allocator.kept_freed_memory(*allocator.TENSOR):
        seconds = []
        for _ in range(epochs):
            start = time.perf_counter()
            model.train()
            counts = EpochCounts(2, device)
            order = torch.randperm(len(y_all), generator=generator).to(device)
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                if len(idx) < 2:
                    continue
                x, target = x_all[idx].float(), y_all[idx]
                logits = model(x)
                loss = model.head.loss(logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                counts.add(loss, target, model.head.probabilities(logits.detach()).argmax(dim=1))
            counts.metrics("train")
            seconds.append(time.perf_counter() - start)
        return seconds


def train_ray_epochs(maps, epochs: int, batch_size: int, tmp: str, on_gpu: bool) -> tuple[list[float], float]:
    """`leukray`'s path: `training.split_maps` + `training.train_head` (Ray Train, one
    worker, as `leukray run` on this machine) on the maps' shards.

    Returns:
        (each epoch's training seconds as the worker measured them, whole fit seconds).
    """
    from leukray.distributed.training import split_maps, train_head

    train, val = split_maps(maps, ["hem", "all"])
    storage_path = tempfile.mkdtemp(prefix="train-", dir=tmp)
    start = time.perf_counter()
    result = train_head(
        train,
        val,
        _train_config(epochs, batch_size, on_gpu),
        in_features=100_352,
        num_classes=2,
        weights="random",
        weights_seed=0,
        storage_path=storage_path,
        name="bench",
        use_gpu=on_gpu,
    )
    wall = time.perf_counter() - start
    shutil.rmtree(storage_path, ignore_errors=True)
    return [float(h["train_s"]) for h in result.history], wall


def measure_train(n: int, epochs: int, batch_size: int, repeats: int, cpus: int, tmp: str) -> dict[str, Any]:
    """An epoch of the Table II head through Ray Train vs the plain loop, on the same maps,
    interleaved; each side's fastest epoch after its first (warm-up) counts."""
    import ray

    maps, labels = synthetic_maps(n)
    shards, train_rows = maps_shards(maps, labels, tmp)
    # The loop runs in a Ray worker process too (all CPUs, the same niceness and torch
    # threads as the Ray Train worker), so the two sides differ only in the input path.
    on_gpu = ray.cluster_resources().get("GPU", 0) > 0
    loop_task = ray.remote(num_cpus=cpus, num_gpus=1 if on_gpu else 0)(train_loop_epochs)
    maps_ref = ray.put(maps)
    loop_runs: list[list[float]] = []
    ray_runs: list[list[float]] = []
    walls = []
    for i in range(repeats):
        for side in ("loop", "ray") if i % 2 == 0 else ("ray", "loop"):
            if side == "loop":
                loop_runs.append(ray.get(loop_task.remote(maps_ref, labels, epochs, batch_size, cpus, on_gpu)))
            else:
                got, wall = train_ray_epochs(shards, epochs, batch_size, tmp, on_gpu)
                ray_runs.append(got)
                walls.append(wall)
        log(
            f"train run {i + 1}/{repeats} ({train_rows} maps, batch {batch_size}): epochs "
            f"loop {', '.join(f'{s:.2f}' for s in loop_runs[-1])}s; ray {', '.join(f'{s:.2f}' for s in ray_runs[-1])}s"
        )
    warm = 1 if epochs > 1 else 0
    loop_s = min(s for run in loop_runs for s in run[warm:])
    ray_s = min(s for run in ray_runs for s in run[warm:])
    return {
        "train_maps": train_rows,
        "train_batch_size": batch_size,
        "train_device": "gpu" if on_gpu else "cpu",
        "train_loop_epoch_s": round(loop_s, 3),
        "train_ray_epoch_s": round(ray_s, 3),
        "train_loop_maps_per_s": round(train_rows / loop_s, 1),
        "train_ray_maps_per_s": round(train_rows / ray_s, 1),
        "train_ratio": round(loop_s / ray_s, 3),
        "train_runs_epoch_s": {
            "loop": [[round(s, 3) for s in run] for run in loop_runs],
            "ray": [[round(s, 3) for s in run] for run in ray_runs],
        },
        "train_ray_fit_wall_s": [round(w, 2) for w in walls],
        "train_setup": {
            "maps": "2048x7x7 float16 (the Table II head on 224x224 crops, 100,352 inputs)",
            "epochs_per_run": epochs,
            "counted": "fastest epoch after each run's first" if warm else "the only epoch",
            "ray": "split_maps + train_head: one Ray Train worker reading the maps' shards, epoch timed in the worker",
            "loop": (
                "same model, optimizer and batch size; maps held in memory as float16; "
                "in a Ray task (a worker process like the trainer's)"
            ),
            "torch_threads": cpus,
        },
    }


# -- report ---------------------------------------------------------------------------------


def verdict(key: str, value: float) -> str:
    """PASS or MISS for a ratio against its target."""
    op, target = TARGETS[key]
    return "PASS" if (value >= target if op == ">=" else value <= target) else "MISS"


def e2e_targets(e2e: dict[str, Any]) -> dict[str, tuple[str, float]]:
    """The end-to-end targets of issue 9 for the device the section ran on."""
    stage = 0.9 if e2e["extractor_ceiling"]["device"] == "gpu" else 0.8
    return {"stage_ratio": (">=", stage), "command_ratio": (">=", round(0.75 * stage, 3)), **E2E_TARGETS}


def e2e_verdicts(e2e: dict[str, Any]) -> dict[str, str]:
    """PASS or MISS per end-to-end ratio (none for a ratio that could not be measured)."""
    verdicts = {}
    for key, (op, target) in e2e_targets(e2e).items():
        value = e2e.get(key)
        if value is not None:
            verdicts[key] = "PASS" if (value >= target if op == ">=" else value <= target) else "MISS"
    return verdicts


def _e2e_lines(e2e: dict[str, Any]) -> list[str]:
    lines = []
    for key, (op, target) in e2e_targets(e2e).items():
        if e2e.get(key) is not None:
            lines.append(
                f"{'e2e ' + key:<20} {E2E_LABELS.get(key, 'leukray extract / ceiling'):<30} {e2e[key]:>7.3f} "
                f"{op + format(target, 'g'):>7}  {e2e['verdicts'][key]:<4}"
            )
    scaled = e2e["extract_at_scale"]
    lines.append(
        f"  stage {scaled['stage_images_per_s']:g} and command {scaled['command_images_per_s']:g} img/s vs "
        f"CPU ceiling {e2e['cpu_ceiling']['images_per_s']:g}, extractor {e2e['extractor_ceiling']['images_per_s']:g}"
        f" img/s; gpu_busy {e2e['gpu_busy']}; hashing {e2e['hash_fraction']:.3f} of the stage"
    )
    return lines


def format_table(results: dict[str, Any]) -> str:
    """The three ratios with their targets, verdicts and the numbers behind them."""
    rows = [
        (
            "preprocess_speedup",
            "Ray Data preprocess / loop",
            "preprocess_ray_images_per_s",
            "preprocess_loop_images_per_s",
            "img/s",
        ),
        (
            "extract_ratio",
            "ResNet50 actor / torch loop",
            "extract_ray_images_per_s",
            "extract_loop_images_per_s",
            "img/s",
        ),
        ("sweep_time_ratio", "Ray Tune sweep / Lazy Predict", "sweep_tune_s", "sweep_lazy_s", "s"),
        ("train_ratio", "Ray Train epoch / torch loop", "train_ray_maps_per_s", "train_loop_maps_per_s", "maps/s"),
    ]
    lines = [f"{'ratio':<20} {'what':<30} {'value':>7} {'target':>7}  {'':<4}  ray vs baseline"]
    for key, what, ray_key, base_key, unit in rows:
        if key in results:
            op, target = TARGETS[key]
            lines.append(
                f"{key:<20} {what:<30} {results[key]:>7.3f} {op + format(target, 'g'):>7}  "
                f"{verdict(key, results[key]):<4}  "
                f"{results[ray_key]:g} vs {results[base_key]:g} {unit}"
            )
        if key == "preprocess_speedup" and "preprocess_pool_speedup" in results:
            lines.append(
                f"{'':<20} {'ceiling: Pool(all CPUs) / loop':<30} {results['preprocess_pool_speedup']:>7.3f}"
                f"{'':<15}Ray Data at {results['preprocess_ray_vs_pool']:.2f}x of it "
                f"({results['preprocess_pool_images_per_s']:g} img/s)"
            )
    if "e2e" in results:
        lines += _e2e_lines(results["e2e"])
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m leukray.bench", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--cells",
        type=int,
        default=6400,
        help="synthetic images for preprocessing (default 6400: a few seconds a side on 2 cores)",
    )
    parser.add_argument(
        "--data",
        default="",
        help="preprocess the images under this folder instead (read in place; at most --cells of them)",
    )
    parser.add_argument("--extract-images", type=int, default=256, help="crops for extraction (default 256)")
    parser.add_argument(
        "--sweep-rows", type=int, default=2500, help="train + test rows for the sweep (default 2500: 2000 + 500)"
    )
    parser.add_argument("--weights", default="random", help="trunk weights (default random: nothing to download)")
    parser.add_argument(
        "--preprocess-repeats", type=int, default=5, help="interleaved preprocessing runs per side; the fastest counts"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved extraction runs per side; the fastest counts"
    )
    parser.add_argument(
        "--rows-per-block",
        type=int,
        default=0,
        help="preprocessing rows per input block (0: as `leukray extract`, streaming.stream_block_rows)",
    )
    parser.add_argument(
        "--preprocess-batch-size", type=int, default=0, help="preprocessing map_batches batch size (0: rows per block)"
    )
    parser.add_argument("--extract-batch-size", type=int, default=32)
    parser.add_argument(
        "--extract-setup",
        default="one-actor-all-cpus",
        choices=(*EXTRACT_SETUPS, "all"),
        help="actor pool for extraction; 'all' runs every setup and reports the fastest (default one-actor-all-cpus)",
    )
    parser.add_argument(
        "--sweep-timeout", type=float, default=3600.0, help="run_sweep_tune's per-classifier limit in seconds"
    )
    parser.add_argument("--train-maps", type=int, default=384, help="trunk maps for head training (default 384)")
    parser.add_argument(
        "--train-epochs", type=int, default=3, help="epochs per training run; the first is warm-up (default 3)"
    )
    parser.add_argument("--train-batch-size", type=int, default=32, help="head training batch (default 32, the paper)")
    parser.add_argument(
        "--train-repeats", type=int, default=2, help="interleaved training runs per side; the fastest epoch counts"
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated stages to leave out: preprocess, extract, sweep, train, e2e"
    )
    parser.add_argument("--e2e", action="store_true", help="only the end-to-end section (`leukray extract`)")
    parser.add_argument(
        "--e2e-images", type=int, default=200, help="end to end: N images (default 200); the second run has scale x N"
    )
    parser.add_argument("--e2e-scale", type=int, default=10, help="end to end: the second run's images / N (10)")
    parser.add_argument(
        "--e2e-batch-size", type=int, default=0, help="end to end: extract.batch_size (0: the device's auto choice)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small and fast: 120 images, 64 crops, 400 sweep rows, 3 + 2 repeats"
    )
    parser.add_argument("--out", default="bench.json", help="where to write the results (default ./bench.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.cells, args.extract_images, args.sweep_rows, args.preprocess_repeats, args.repeats = 120, 64, 400, 3, 2
        args.train_maps, args.train_epochs, args.train_repeats = 192, 2, 1
        args.e2e_images, args.e2e_scale = 40, 5
    if args.e2e:
        args.skip = "preprocess,extract,sweep,train"
    unknown = {s.strip() for s in args.skip.split(",") if s.strip()} - {*SECTIONS}
    if unknown:
        parser.error(f"--skip: unknown stage(s) {', '.join(sorted(unknown))}")
    return args


def _run_sections(args: argparse.Namespace, skip: set[str], cpus: int, tmp: str, results: dict[str, Any]) -> None:
    """Preprocessing, extraction, the sweep and head training, each into `results` unless
    skipped."""
    if "e2e" not in skip:
        from leukray.tools.bench_e2e import measure_e2e

        results["e2e"] = measure_e2e(args.e2e_images, args.e2e_scale, args.weights, args.e2e_batch_size, cpus, tmp)
        results["e2e"]["verdicts"] = e2e_verdicts(results["e2e"])
    if "train" not in skip:
        results.update(
            measure_train(args.train_maps, args.train_epochs, args.train_batch_size, args.train_repeats, cpus, tmp)
        )
    if {"preprocess", "extract", "sweep"} <= skip:
        return
    if args.data:
        frame = folder_images(args.data, args.cells)
        results["preprocess_data"] = f"{args.data}: {len(frame)} images, read in place"
    else:
        tick = time.perf_counter()
        frame = synthetic_images(os.path.join(tmp, "data"), args.cells)
        results["preprocess_data"] = (
            f"synthetic: generate_dataset(cells={args.cells}, subjects=12, seed=0), 450x450 RGB BMP"
        )
        log(f"generated {len(frame)} synthetic images in {time.perf_counter() - tick:.1f}s")
    rows_per_block = args.rows_per_block or stream_block_rows(len(frame), cpus)
    batch_size = args.preprocess_batch_size or rows_per_block

    # Later stages start from the crops (and their features), so a skipped stage still
    # runs once, untimed in the report, when a later one needs its output.
    pre, crops, labels = measure_preprocess(
        frame,
        PreprocessConfig(),
        1 if "preprocess" in skip else args.preprocess_repeats,
        rows_per_block,
        batch_size,
    )
    if "preprocess" not in skip:
        results.update(pre)

    if not {"extract", "sweep"} <= skip:
        pick = np.linspace(0, len(crops) - 1, min(args.extract_images, len(crops))).round().astype(int)
        setups = list(EXTRACT_SETUPS) if args.extract_setup == "all" else [args.extract_setup]
        ext, features = measure_extract(
            crops[pick],
            args.weights,
            0,
            args.extract_batch_size,
            setups,
            1 if "extract" in skip else args.repeats,
            cpus,
        )
        if "extract" not in skip:
            results.update(ext)

        if "sweep" not in skip:
            data, desc = derive_sweep_features(features, labels[pick], args.sweep_rows, 0.2, seed=0)
            results["sweep_features"] = desc
            results.update(measure_sweep(data, args.sweep_timeout, 1.0))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--screen" in argv:  # the screen section alone (`leukray.tools.bench_screen`), into bench.json's `screen`
        from leukray.tools.bench_screen import main as screen_main

        return screen_main([a for a in argv if a != "--screen"])
    args = parse_args(argv)
    ready_out(args.out)
    import ray
    import torch

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    cpus = machine_cpus()
    started = time.perf_counter()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m leukray.bench", *(sys.argv[1:] if argv is None else argv)]),
        "cpus": cpus,
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "quick": args.quick,
    }
    os.environ.setdefault("RAY_worker_niceness", "0")  # see the module docstring
    results["ray_worker_niceness"] = int(os.environ["RAY_worker_niceness"])
    tmp = tempfile.mkdtemp(prefix="leukray-bench-")
    # address="local": always a fresh single-node Ray on this machine, never a running
    # cluster that `ray start` left behind (that one's CPUs and load are not this machine's).
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        _run_sections(args, skip, cpus, tmp, results)
    except ray.exceptions.RayError as exc:  # e.g. the raylet was killed by someone else's cleanup
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        print(
            f"bench: Ray failed mid-run ({type(exc).__name__}: {first}); nothing written, run it again", file=sys.stderr
        )
        return 1
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    results["bench_seconds"] = round(time.perf_counter() - started, 1)
    results["verdicts"] = {k: verdict(k, results[k]) for k in TARGETS if k in results}
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    print()
    print(format_table(results))
    missed = [k for k, v in results["verdicts"].items() if v == "MISS"]
    missed += [f"e2e {k}" for k, v in results.get("e2e", {}).get("verdicts", {}).items() if v == "MISS"]
    summary = f"MISS: {', '.join(missed)}" if missed else "all targets met"
    print(f"\n{summary}; details in {args.out} (took {results['bench_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
