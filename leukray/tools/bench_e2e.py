"""The benchmark's end-to-end section (``python -m leukray.bench --e2e``; part of ``make
bench``): how close `leukray extract` comes to the machine's own ceilings (issue 9).

Measured in one run, on the same synthetic 450x450 BMP cells (`leukray.tools.synth`):

- ``cpu_ceiling``: `decode_image` + `preprocess_image` (reading each file) in a plain
  ``multiprocessing.Pool`` of one process per CPU, nothing else running;
- ``extractor_ceiling``: `FeatureExtractor.extract` on crops already in memory, in this
  process, on the device the stage would use, at the stage's batch size (torch's default threads);
- ``leukray extract`` end to end, through the real CLI (`leukray.cli.main`, in this process,
  on the Ray that the benchmark started) at N and at scale x N images: the stage's images/s
  (extract.json's ``preprocess_augment_extract`` seconds) and the whole command's
  (discovery, hashing, split, stream, files written; interpreter and Ray start-up left out);
- the custom head's maps path: `leukray train --train.epochs 1` on each of those run folders
  (the trunk maps computed and written as shards under RUN/maps, one epoch of Ray Train
  streaming them, the embedding pass over them; `leukray.io.mapshards`), sampled the same way;
- while each command runs, a sampler records this process's RSS, Ray's object-store bytes
  in use and, with a GPU, its utilisation (``nvidia-smi``, else ``torch.cuda.utilization``).

Ratios: ``stage_ratio`` and ``command_ratio`` divide the images/s at scale x N by the smaller
ceiling; ``memory_growth`` is the larger of (peak driver RSS at scale x N / at N) and (peak
object store at scale x N / at N, each peak at least `STORE_FLOOR_BYTES`);
``maps_memory_growth`` is the same for the maps path's two train commands;
``hash_fraction`` is the discovery + hashing + split seconds over the stage's, and
``hash_cpu_share`` the CPU time of hashing an image (read + sha256) over that of
preprocessing it (what hashing costs where the stage is CPU-bound). The
commands run without augmentation and with the trunk's features only
(``--augment.oversample 0 --features resnet50``), so the stage does per image exactly what
the ceilings do.

Imports Ray (like `leukray.tools.bench`, the benchmark may).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
from typing import Any

import numpy as np

from leukray.config import PreprocessConfig
from leukray.distributed.resources import extract_batch_size
from leukray.io import storage
from leukray.ops import allocator
from leukray.ops.preprocess import decode_image, preprocess_image

E2E_KEYS = ("stage_ratio", "command_ratio", "memory_growth", "gpu_busy", "hash_fraction", "maps_memory_growth")


def log(message: str) -> None:
    print(f"[bench e2e] {message}", flush=True)


# -- ceilings -------------------------------------------------------------------------------


def _pool_crop(path: str) -> int:
    """One image through the CPU ceiling's work; returns a checksum (no crop is shipped back,
    so the parent's unpickling is not what is measured)."""
    crop = preprocess_image(decode_image(storage.read_bytes(path)), PreprocessConfig())
    return int(crop[::16, ::16].sum())


def _pool_ready(_: int) -> None:
    """Held long enough that every process of the pool takes one (and has imported this)."""
    time.sleep(0.5)


def cpu_ceiling(paths: list[str], cpus: int) -> dict[str, Any]:
    """`decode_image` + `preprocess_image` over `paths` in ``multiprocessing.Pool(cpus)``
    (spawned and warmed up before the clock starts)."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that runs Ray's threads
    with context.Pool(cpus) as pool:
        pool.map(_pool_ready, range(2 * cpus), chunksize=1)  # every process started, imports done
        pool.map(_pool_crop, paths[: 2 * cpus], chunksize=1)
        start = time.perf_counter()
        pool.map(_pool_crop, paths, chunksize=max(1, len(paths) // (8 * cpus)))
        seconds = time.perf_counter() - start
    return {"images": len(paths), "processes": cpus, "seconds": round(seconds, 3), "images_per_s": len(paths) / seconds}


def extractor_ceiling(crops: np.ndarray, weights: str, batch_size: int) -> dict[str, Any]:
    """`FeatureExtractor.extract` over `crops` (N x size x size x 3 uint8, in memory) in
    batches of `batch_size`, after one untimed batch; features only, as the stage's."""
    import torch

    from leukray.distributed.actors import FeatureExtractor

    # the actor's allocator setting while the extractor runs here, then this process's own
    # again: the commands measured next sample this process's memory
    with allocator.kept_freed_memory(*allocator.TENSOR):
        extractor = FeatureExtractor(weights, seed=0)
        on_gpu = extractor.on_gpu
        extractor.extract(crops[:batch_size])
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(crops), batch_size):
            extractor.extract(crops[i : i + batch_size])  # returns host arrays: synchronised
        seconds = time.perf_counter() - start
        del extractor
    if on_gpu:
        torch.cuda.empty_cache()  # the stage's actor, not this process, needs the GPU next
    return {
        "images": len(crops),
        "batch_size": batch_size,
        "device": "gpu" if on_gpu else "cpu",
        "seconds": round(seconds, 3),
        "images_per_s": len(crops) / seconds,
    }


def hashing_share(paths: list[str]) -> dict[str, Any]:
    """CPU seconds per image of the discovery pass's hashing (read + sha256, as
    `leukray.data.discovery.hash_files`) and of the CPU ceiling's work, in this process: what
    the second read adds to each image's CPU work wherever the bottleneck is."""
    from leukray.data.discovery import content_hash

    cfg = PreprocessConfig()
    start = time.process_time()
    for path in paths:
        content_hash(storage.read_bytes(path))
    hashing = time.process_time() - start
    start = time.process_time()
    for path in paths:
        preprocess_image(decode_image(storage.read_bytes(path)), cfg)
    preprocessing = time.process_time() - start
    return {
        "hash_cpu_ms_per_image": 1000 * hashing / len(paths),
        "preprocess_cpu_ms_per_image": 1000 * preprocessing / len(paths),
        "hash_cpu_share": hashing / preprocessing,
    }


# -- sampling while a command runs ------------------------------------------------------------


def _rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (VmRSS) or its peak since the last `_reset_peak_rss`
    (VmHWM), from /proc; 0 where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Restart the kernel's record of this process's peak RSS (VmHWM) from its current RSS
    (Linux >= 4.0, ``echo 5 > /proc/self/clear_refs``); False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class Sampler:
    """A background thread that records this process's RSS, Ray's object-store bytes in use
    and (with a GPU) its utilisation every `interval` seconds while the block runs. The
    driver's peak is the kernel's exact one for the block (VmHWM, reset on entry) where
    Linux allows, so a peak between two samples is not missed; else the sampled one."""

    def __init__(self, interval: float = 0.5, gpu: bool = False):
        self.interval, self.gpu = interval, gpu
        self.rss: list[int] = []
        self.store: list[int] = []
        self.spilled: list[int] = []
        self.gpu_util: list[float] = []
        self.exact_peak_rss: int | None = None  # VmHWM over the block, where it could be reset
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._peak_reset = False
        self._smi: subprocess.Popen | None = None

    def _store_reader(self):
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        if not ray.is_initialized():  # no Ray here: no store figure (and none started for one)
            return None
        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        return lambda: get_memory_info_reply(state).store_stats

    def _run(self) -> None:
        try:
            read_store = self._store_reader()
        except Exception:  # noqa: BLE001 - an internal Ray API: without it, no store figure
            read_store = None
        while True:
            self.rss.append(_rss_bytes())
            if read_store is not None:
                try:
                    stats = read_store()
                    self.store.append(int(stats.object_store_bytes_used))
                    self.spilled.append(int(stats.spilled_bytes_total))
                except Exception:  # noqa: BLE001 - the raylet busy or gone: skip this sample
                    pass
            if self.gpu and self._smi is None:
                try:
                    self.gpu_util.append(_torch_gpu_util())
                except Exception:  # noqa: BLE001 - no pynvml/NVML: gpu_busy stays unmeasured
                    self.gpu = False
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Sampler:
        if self.gpu and shutil.which("nvidia-smi"):
            self._smi = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "250"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        self._peak_reset = _reset_peak_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._peak_reset:
            self.exact_peak_rss = _rss_bytes("VmHWM") or None
        if self._smi is not None:
            self._smi.terminate()
            out, _ = self._smi.communicate(timeout=10)
            # one line per GPU and sample; "[N/A]" where the driver does not report it
            self.gpu_util = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]

    def summary(self) -> dict[str, Any]:
        return {
            "peak_driver_rss_bytes": max([*self.rss, self.exact_peak_rss or 0]),
            "peak_driver_rss_source": "VmHWM" if self.exact_peak_rss else "sampled",
            "sampled_peak_driver_rss_bytes": max(self.rss, default=0),
            "peak_object_store_bytes": max(self.store) if self.store else None,
            "spilled_bytes": (max(self.spilled) - min(self.spilled)) if self.spilled else None,
            "gpu_busy": round(float(np.mean(self.gpu_util)) / 100.0, 4) if self.gpu_util else None,
            "samples": len(self.rss),
        }


def _torch_gpu_util() -> float:
    import torch

    return float(torch.cuda.utilization())


# -- the command --------------------------------------------------------------------------------


def extract_argv(data: str, out: str, weights: str, batch_size: int) -> list[str]:
    """`leukray extract`'s arguments for the benchmark (see the module docstring)."""
    argv = ["extract", "--data", data, "--out", out, "--weights", weights]
    argv += ["--features", "resnet50", "--augment.oversample", "0", "--quiet"]
    return argv + (["--extract.batch_size", str(batch_size)] if batch_size else [])


def run_extract(data: str, out: str, weights: str, batch_size: int, gpu: bool) -> dict[str, Any]:
    """`leukray extract` through `leukray.cli.main` in this process, sampled (`Sampler`).

    Returns:
        The command's and the stage's seconds and images/s, the memory peaks, gpu_busy.

    Raises:
        SystemExit: the command failed (its own message is on stderr).
    """
    from leukray.cli import main as cli_main

    argv = extract_argv(data, out, weights, batch_size)
    with Sampler(gpu=gpu) as sampler:
        start = time.perf_counter()
        code = cli_main(argv)
        seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"bench: `leukray {' '.join(argv)}` exited with {code}")
    with open(os.path.join(out, "extract.json"), encoding="utf-8") as handle:
        record = json.load(handle)
    rows = int(record["counts"]["feature_rows"])
    stage_s = float(record["seconds"]["preprocess_augment_extract"])
    return {
        "command": "leukray " + " ".join(argv),
        "images": rows,
        "command_seconds": round(seconds, 3),
        "command_images_per_s": rows / seconds,
        "stage_seconds": stage_s,
        "stage_images_per_s": rows / stage_s,
        "discover_hash_split_seconds": float(record["seconds"]["discover_hash_split"]),
        "extract_device": record["ray"]["extract_device"],
        "extract_batch_size": record["ray"].get("extract_batch_size"),
        **sampler.summary(),
    }


def train_argv(out: str, epochs: int) -> list[str]:
    """`leukray train`'s arguments for the maps path (on a folder `leukray extract` wrote)."""
    return ["train", "--out", out, "--train.epochs", str(epochs), "--quiet"]


def run_train(out: str, epochs: int, gpu: bool) -> dict[str, Any]:
    """`leukray train` through `leukray.cli.main` in this process, sampled (`Sampler`): the
    maps pass, `epochs` epochs of Ray Train over the shards, the embedding pass.

    Raises:
        SystemExit: the command failed (its own message is on stderr).
    """
    from leukray.cli import main as cli_main

    argv = train_argv(out, epochs)
    with Sampler(gpu=gpu) as sampler:
        start = time.perf_counter()
        code = cli_main(argv)
        seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"bench: `leukray {' '.join(argv)}` exited with {code}")
    from leukray.io.features import load_features

    rows = len(load_features(os.path.join(out, "custom_features.parquet"))[0])
    return {
        "command": "leukray " + " ".join(argv),
        "maps_rows": rows,
        "command_seconds": round(seconds, 3),
        "maps_left": os.path.exists(os.path.join(out, "maps")),
        **sampler.summary(),
    }


STORE_FLOOR_BYTES = 64 << 20
"""Object-store peaks below this count as this much in `memory_growth`: a few blocks in
flight (kilobytes to megabytes, sampled every half second) say nothing about growth, while
anything that accumulates with the data (crops or maps kept for every image: 30-40 MB at
N = 200) still shows as growth at 10 x N."""


def _growth(small: float | None, large: float | None, floor: float = 0.0) -> float | None:
    if small is None or large is None:
        return None
    return max(large, floor) / max(small, floor, 1.0)


def memory_growths(at_n: dict[str, Any], at_scale: dict[str, Any]) -> dict[str, float | None]:
    """Peak at scale x N / peak at N: driver RSS, object store (floored), and the larger."""
    rss = _growth(at_n["peak_driver_rss_bytes"], at_scale["peak_driver_rss_bytes"])
    store = _growth(at_n["peak_object_store_bytes"], at_scale["peak_object_store_bytes"], STORE_FLOOR_BYTES)
    growths = [g for g in (rss, store) if g is not None]
    return {"memory_growth": max(growths) if growths else None, "driver_rss_growth": rss, "object_store_growth": store}


def maps_ratios(at_n: dict[str, Any], at_scale: dict[str, Any]) -> dict[str, float | None]:
    """The maps path's memory growth (`memory_growths` of its two train commands)."""
    return {f"maps_{k}": v for k, v in memory_growths(at_n, at_scale).items()}


def e2e_ratios(cpu: dict[str, Any], extractor: dict[str, Any], at_n: dict[str, Any], at_scale: dict[str, Any]):
    """The section's ratios from its raw figures (see the module docstring)."""
    ceiling = min(cpu["images_per_s"], extractor["images_per_s"])
    return {
        "ceiling_images_per_s": ceiling,
        "bottleneck": "cpu" if cpu["images_per_s"] <= extractor["images_per_s"] else "extractor",
        "stage_ratio": at_scale["stage_images_per_s"] / ceiling,
        "command_ratio": at_scale["command_images_per_s"] / ceiling,
        "stage_ratio_at_n": at_n["stage_images_per_s"] / ceiling,
        **memory_growths(at_n, at_scale),
        "gpu_busy": at_scale["gpu_busy"],
        "hash_fraction": at_scale["discover_hash_split_seconds"] / at_scale["stage_seconds"],
    }


def _synth(root: str, cells: int) -> list[str]:
    from leukray.tools.synth import generate_dataset

    return generate_dataset(root, cells=cells, subjects=min(12, cells), seed=0, workers=os.cpu_count() or 1)[
        "path"
    ].tolist()


def measure_e2e(
    images: int,
    scale: int,
    weights: str,
    batch_size: int,
    cpus: int,
    tmp: str,
    maps: bool = True,
    warm_up: bool = True,
) -> dict[str, Any]:
    """The whole section on the running Ray (see the module docstring): `bench.json`'s `e2e`.

    Args:
        images: N, the images of the first command and of both ceilings.
        scale: the second command runs on scale x N images.
        batch_size: the trunk's batch (0: the stage's auto choice for this device).
        maps: also measure the custom head's maps path (`measure_maps`).
        warm_up: run each command once untimed first (off only where the figures' consistency,
            not their speed, is checked: it saves two commands' start-ups).
    """
    import torch

    gpu = torch.cuda.is_available()
    batch = extract_batch_size(batch_size, gpu)
    tick = time.perf_counter()
    small = _synth(os.path.join(tmp, "e2e-n"), images)
    _synth(os.path.join(tmp, "e2e-scaled"), images * scale)
    warm = _synth(os.path.join(tmp, "e2e-warm"), 16) if warm_up else []
    log(f"synthesised {images} + {images * scale} + {len(warm)} images in {time.perf_counter() - tick:.1f}s")
    for path in small:  # both sides then read from the page cache
        storage.read_bytes(path)
    hashing = hashing_share(small)
    cpu = cpu_ceiling(small, cpus)
    log(f"CPU ceiling: {cpu['images_per_s']:.1f} images/s ({cpus} processes)")
    crops = np.stack([preprocess_image(decode_image(storage.read_bytes(p)), PreprocessConfig()) for p in small])
    extractor = extractor_ceiling(crops, weights, batch)
    del crops
    log(f"extractor ceiling: {extractor['images_per_s']:.1f} images/s on the {extractor['device']}, batch {batch}")
    # untimed: Ray Data's workers started and leukray imported in them, the weights resolved
    if warm_up:
        run_extract(os.path.join(tmp, "e2e-warm"), os.path.join(tmp, "run-warm"), weights, batch_size, gpu)
    runs = {}
    for name, root in (("n", "e2e-n"), ("scaled", "e2e-scaled")):
        runs[name] = run_extract(os.path.join(tmp, root), os.path.join(tmp, f"run-{name}"), weights, batch_size, gpu)
        log(
            f"leukray extract on {runs[name]['images']} images: stage {runs[name]['stage_images_per_s']:.1f} "
            f"images/s, command {runs[name]['command_images_per_s']:.1f} images/s"
        )
    return _rounded(
        {
            **e2e_ratios(cpu, extractor, runs["n"], runs["scaled"]),
            **hashing,
            "images": images,
            "scale": scale,
            "cpu_ceiling": cpu,
            "extractor_ceiling": extractor,
            "extract_at_n": runs["n"],
            "extract_at_scale": runs["scaled"],
            **(measure_maps(tmp, gpu, warm_up=warm_up) if maps else {}),
        }
    )


def measure_maps(tmp: str, gpu: bool, epochs: int = 1, warm_up: bool = True) -> dict[str, Any]:
    """The maps path (`run_train`) on the run folders that `measure_e2e`'s commands wrote, at
    N and scale x N images, after an untimed one on the warm-up folder (with `warm_up`)."""
    if warm_up:
        run_train(os.path.join(tmp, "run-warm"), epochs, gpu)  # Ray Train's imports and workers
    runs = {name: run_train(os.path.join(tmp, f"run-{name}"), epochs, gpu) for name in ("n", "scaled")}
    for run in runs.values():
        log(
            f"leukray train on {run['maps_rows']} maps: {run['command_seconds']:.1f}s, peak driver RSS "
            f"{run['peak_driver_rss_bytes'] / 2**20:.0f} MiB, "
            f"object store {(run['peak_object_store_bytes'] or 0) / 2**20:.0f} MiB"
        )
    return {**maps_ratios(runs["n"], runs["scaled"]), "maps_at_n": runs["n"], "maps_at_scale": runs["scaled"]}


def ready_out(path: str) -> None:
    """Makes the folder of bench.json (`--out`) before anything is measured, so that a path
    that cannot be written fails in a second, not after the benchmark's minutes.

    Raises:
        SystemExit: the folder cannot be made or written to (one line).
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"bench: cannot make the folder of --out {path}: {exc.strerror}") from None
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise SystemExit(f"bench: --out {path} is not a file this user can write")


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, 4)
    return value
