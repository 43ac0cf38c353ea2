"""The ``screen`` section of the benchmark (``python -m leukray.bench --screen``): `leukray
screen` over synthetic whole-slide images, its throughput and whether its memory stays bounded
as the archive grows.

Each synthetic slide is a pyramidal tiled TIFF (tifffile; level 0 at 0.25 um/px and two 2x
reductions) stitched from constructed smear fields (red cells, round and lobed leukocytes,
platelets; seeded). The same `screen` job runs on N slides and on `scale` x N slides, each
under a sampler that records the driver's RSS and Ray's object-store bytes in use every 0.25 s.

Reported under ``screen`` in bench.json: per run, slides, tiles, fields (the camera fields the
slides were stitched from), cells, seconds, ``fields_per_s``, ``tiles_per_s``, ``cells_per_s``,
``peak_driver_rss_bytes``, ``peak_object_store_bytes``; ``rss_growth`` and
``object_store_growth`` (scale x N over N; store peaks under 1 MiB count as 1 MiB) and
``memory_growth``, the larger of the two; target <= 1.3.

May import: anything in leukray; Ray (a tool, like `leukray.tools.bench`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any

import cv2
import numpy as np

from leukray.config import PreprocessConfig, ScreenConfig
from leukray.tools.bench_e2e import Sampler, ready_out

TARGETS = {"memory_growth": ("<=", 1.3)}
# Object-store peaks below this count as this much: Ray keeps objects under 100 KiB inline,
# outside the store, so a few KiB in the store is noise, and a ratio of two such is too.
STORE_FLOOR_BYTES = 1 << 20
FIELD_H, FIELD_W = 384, 512
RED_CELL_D = 40  # px at level 0: a 7.5 um red cell at ~0.19 um/px
MPP = 0.25


def log(message: str) -> None:
    print(f"[bench screen] {message}", flush=True)


# -- synthetic slides -----------------------------------------------------------------------


def smear_field(seed: int) -> np.ndarray:
    """A FIELD_H x FIELD_W x 3 uint8 RGB constructed smear field: red cells (40 px, pale
    centre) on plasma, three to five leukocytes (round or three-lobed nuclei in a cytoplasm
    ring), a few platelets, seeded sensor noise and a slight blur."""
    rng = np.random.default_rng(seed)
    image = np.empty((FIELD_H, FIELD_W, 3), np.uint8)
    image[:] = (226, 218, 206)
    white = []
    for _ in range(int(rng.integers(3, 6))):
        x, y = int(rng.integers(50, FIELD_W - 50)), int(rng.integers(50, FIELD_H - 50))
        if all(math.hypot(x - a, y - b) > 110 for a, b in white):
            white.append((x, y))
    placed: list[tuple[int, int]] = []
    for _ in range(500):
        x, y = int(rng.integers(0, FIELD_W)), int(rng.integers(0, FIELD_H))
        if any(math.hypot(x - a, y - b) < 56 for a, b in white) or any(
            math.hypot(x - a, y - b) < RED_CELL_D + 2 for a, b in placed
        ):
            continue
        placed.append((x, y))
        cv2.circle(image, (x, y), RED_CELL_D // 2, (208, 150, 148), -1)
        cv2.circle(image, (x, y), RED_CELL_D // 6, (222, 190, 186), -1)
    for x, y in white:
        cv2.circle(image, (x, y), 33, (200, 186, 206), -1)
        if rng.random() < 0.5:
            cv2.circle(image, (x, y), int(rng.integers(16, 23)), (112, 48, 150), -1)
        else:
            for dx, dy in ((-12, -6), (8, -9), (0, 12)):
                cv2.circle(image, (x + dx, y + dy), 9, (112, 48, 150), -1)
    for _ in range(3):
        cv2.circle(image, (int(rng.integers(5, FIELD_W - 5)), int(rng.integers(5, FIELD_H - 5))), 3, (112, 48, 150), -1)
    noisy = image.astype(np.float32) + rng.normal(0, 3, image.shape)
    return cv2.GaussianBlur(np.clip(noisy, 0, 255).astype(np.uint8), (3, 3), 0)


def write_slide(path: str, fields: list[np.ndarray], side: int, seed: int) -> None:
    """A side x side mosaic of `fields` (seeded arrangement) as a pyramidal tiled TIFF."""
    import tifffile

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(fields), side * side)
    rows = [np.concatenate([fields[p] for p in picks[r * side : (r + 1) * side]], axis=1) for r in range(side)]
    image = np.concatenate(rows, axis=0)
    options = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(image, subifds=2, resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER", **options)
        for factor in (2, 4):
            tif.write(image[::factor, ::factor], subfiletype=1, **options)


def write_slides(folder: str, count: int, side: int) -> list[str]:
    """`count` synthetic slides in `folder` (slide i stitched with seed i from 8 fields)."""
    os.makedirs(folder, exist_ok=True)
    fields = [smear_field(seed) for seed in range(8)]
    paths = []
    for i in range(count):
        paths.append(os.path.join(folder, f"slide-{i:04d}.tif"))
        write_slide(paths[-1], fields, side, seed=i)
    return paths


def random_bundle(model_dir: str, crop_size: int, weights: str) -> None:
    """A model bundle without a run: a seeded ResNet50 trunk and a logistic regression on
    seeded random features (its answers mean nothing; the screening work is the same)."""
    from sklearn.linear_model import LogisticRegression

    from leukray.models.bundle import save_bundle
    from leukray.models.trunk import build_trunk, resolve_weights

    state, info = resolve_weights(weights, 0)
    rng = np.random.default_rng(0)
    classifier = LogisticRegression(max_iter=500).fit(rng.normal(size=(40, 2048)), np.arange(40) % 2)
    save_bundle(
        model_dir,
        classes=["hem", "all"],
        positive_label="all",
        preprocess=PreprocessConfig(size=crop_size),
        weights=info.as_dict(),
        weights_seed=0,
        feature_source="trunk",
        classifier_name="LogisticRegression",
        classifier=classifier,
        trunk_state=build_trunk(state, 0).state_dict(),
        extra={"data_fingerprint": "0" * 64, "extract_batch_size": 32},
    )


# -- the section ----------------------------------------------------------------------------


def screen_run(model_dir: str, slides: list[str], out: str, cfg: ScreenConfig, fields: int) -> dict[str, Any]:
    """`screen` over `slides` under the e2e section's `Sampler`: throughput and peak memory."""
    from leukray.stages.screen import screen

    folder = os.path.dirname(slides[0])
    with Sampler(interval=0.25) as sampler:
        tick = time.perf_counter()
        summary = screen(model_dir, folder, out, cfg)
        seconds = time.perf_counter() - tick
    tiles = sum(math.ceil(w / cfg.tile_px) * math.ceil(h / cfg.tile_px) for w, h in _sizes(slides))
    cells = int(summary["counts"]["cells"])
    peaks = sampler.summary()  # the driver's exact peak where Linux gives it, as the e2e section's
    return {
        "slides": len(slides),
        "tiles": tiles,
        "fields": fields,
        "cells": cells,
        "seconds": round(seconds, 2),
        "fields_per_s": round(fields / seconds, 3),
        "tiles_per_s": round(tiles / seconds, 3),
        "cells_per_s": round(cells / seconds, 3),
        **{k: peaks[k] for k in ("peak_driver_rss_bytes", "peak_driver_rss_source", "samples")},
        "peak_object_store_bytes": peaks["peak_object_store_bytes"] or 0,
    }


def _sizes(slides: list[str]) -> list[tuple[int, int]]:
    from leukray.io.wholeslide import slide_info

    return [(slide_info(p).levels[0].width, slide_info(p).levels[0].height) for p in slides]


def measure_screen(slides: int, scale: int, side: int, tile_px: int, crop_size: int, weights: str) -> dict[str, Any]:
    """The section: `screen` on `slides` and on `scale` x `slides` synthetic slides."""
    tmp = tempfile.mkdtemp(prefix="leukray-bench-screen-")
    try:
        model_dir = os.path.join(tmp, "model")
        random_bundle(model_dir, crop_size, weights)
        cfg = ScreenConfig(tile_px=tile_px)
        runs = {}
        for name, count in (("at_n", slides), ("at_scale", slides * scale)):
            tick = time.perf_counter()
            paths = write_slides(os.path.join(tmp, name), count, side)
            seconds = time.perf_counter() - tick
            log(f"wrote {count} synthetic slides ({side * FIELD_W}x{side * FIELD_H}) in {seconds:.1f}s")
            runs[name] = screen_run(model_dir, paths, os.path.join(tmp, f"out-{name}"), cfg, count * side * side)
            log(f"{name}: {runs[name]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rss_growth = runs["at_scale"]["peak_driver_rss_bytes"] / max(runs["at_n"]["peak_driver_rss_bytes"], 1)
    store = [max(runs[name]["peak_object_store_bytes"], STORE_FLOOR_BYTES) for name in ("at_n", "at_scale")]
    store_growth = store[1] / store[0]
    memory_growth = round(max(rss_growth, store_growth), 3)
    op, target = TARGETS["memory_growth"]
    return {
        "data": f"synthetic pyramidal TIFFs, {side}x{side} fields of {FIELD_W}x{FIELD_H} px each, 0.25 um/px",
        "config": {"tile_px": tile_px, "crop_size": crop_size, "weights": weights, "scale": scale},
        **runs,
        "rss_growth": round(rss_growth, 3),
        "object_store_growth": round(store_growth, 3),
        "memory_growth": memory_growth,
        "target": f"memory_growth {op} {target}",
        "verdict": "PASS" if memory_growth <= target else "MISS",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m leukray.bench --screen", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--slides", type=int, default=2, help="N: synthetic slides in the first run (default 2)")
    parser.add_argument("--scale", type=int, default=10, help="the second run screens scale x N slides (default 10)")
    parser.add_argument("--side", type=int, default=4, help="each slide is side x side smear fields (default 4)")
    parser.add_argument("--tile-px", type=int, default=1024, help="screen.tile_px (default 1024)")
    parser.add_argument("--crop-size", type=int, default=64, help="the bundle's crop size (default 64)")
    parser.add_argument("--weights", default="random", help="trunk weights (default random: nothing to download)")
    parser.add_argument("--out", default="bench.json", help="bench.json to add the `screen` key to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the section alone and write it under `screen` in --out (other keys kept)."""
    import ray

    args = parse_args(argv)
    ready_out(args.out)
    os.environ.setdefault("RAY_worker_niceness", "0")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        section = measure_screen(args.slides, args.scale, args.side, args.tile_px, args.crop_size, args.weights)
    finally:
        ray.shutdown()
    section["cpus"] = cpus
    results: dict[str, Any] = {}
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as handle:
            results = json.load(handle)
    results["screen"] = section
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    n, scaled = section["at_n"], section["at_scale"]
    mib = {k: (n[k] / 2**20, scaled[k] / 2**20) for k in ("peak_driver_rss_bytes", "peak_object_store_bytes")}
    print(
        f"screen: {scaled['fields_per_s']:g} fields/s, {scaled['cells_per_s']:g} cells/s at {scaled['slides']} slides; "
        "peak driver RSS {:.0f} -> {:.0f} MiB, ".format(*mib["peak_driver_rss_bytes"])
        + "object store {:.0f} -> {:.0f} MiB; ".format(*mib["peak_object_store_bytes"])
        + f"memory_growth {section['memory_growth']} ({section['target']}: {section['verdict']}); details in {args.out}"
    )
    return 0
