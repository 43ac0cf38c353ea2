"""`leukray screen`: find the leukocytes in whole peripheral-blood smear fields, cut each out
as a C-NMC-like single-cell crop and classify it with a model bundle; report per cell and per
slide.

The bundle's classifier was trained on C-NMC crops: one segmented cell on a black background.
Detection and cropping are `leukray.ops.smear`; this stage streams the slides through them
(`leukray.distributed.streaming.screen_stream`) and summarises per slide.

May import: `leukray.config`, `leukray.errors`, `leukray.io`, `leukray.data`, `leukray.ops`,
`leukray.models`, `leukray.distributed`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable

import pandas as pd

from leukray import __version__
from leukray.config import ScreenConfig
from leukray.data.discovery import IMAGE_EXTENSIONS
from leukray.distributed.resources import cluster_cpus, cluster_gpus
from leukray.distributed.streaming import screen_stream
from leukray.errors import ConfigError, DataError
from leukray.io import storage
from leukray.io.tables import log, write_csv, write_json, write_parquet
from leukray.models.bundle import BUNDLE_FILE, Bundle, load_bundle, sha256_bytes
from leukray.ops.smear import BOX_COLUMNS, NO_CELLS

CELL_COLUMNS = [
    "slide", "cell_index", "x0", "y0", "x1", "y1", "cx", "cy", "area",
    "prob_all", "predicted_label", "flagged", "node_id",
]  # fmt: skip
SLIDE_COLUMNS = [
    "slide",
    "cells",
    "flagged_cells",
    "blast_fraction",
    "mean_prob_all",
    "status",
    "error",
]
SLIDE_STATUSES = ("flagged", "not flagged", "insufficient cells", "error")
# What the screening stream keeps of each cell row.
STREAM_COLUMNS = ["slide", "cell_index", *BOX_COLUMNS, "prob_all", "predicted_label", "error", "detect_node", "node_id"]
CAVEAT = (
    "The classifier was trained on single-cell crops (C-NMC 2019) and is applied here to cells cut out of "
    "smear fields by an automatic detector; cell-level probabilities on such crops are a screening aid to "
    "prioritise slides for review by a haematologist, not a diagnosis."
)


# -- per-slide report -------------------------------------------------------------------------


def summarise_slides(rows: pd.DataFrame, cfg: ScreenConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split classified rows into (cells, slides).

    Args:
        rows: one row per `detect_and_crop` output row, with `prob_all` added.

    Returns:
        cells: the classified cells (CELL_COLUMNS), `flagged` = prob_all >= the threshold
        (`ScreenConfig.cell_threshold`).
        slides: one row per slide (SLIDE_COLUMNS). status is "error" when the slide could not
        be read, "insufficient cells" below `min_cells` classified cells, else "flagged" when
        the share of flagged cells is >= `slide_flag_fraction`, else "not flagged".
    """
    rows = rows.copy()
    rows["error"] = rows["error"].astype(str)
    is_cell = (rows["cell_index"] >= 0) & (rows["error"] == "") & rows["prob_all"].notna()
    cells = rows[is_cell].copy()
    cells["flagged"] = cells["prob_all"] >= cfg.cell_threshold()
    cells = cells.sort_values(["slide", "cell_index"], kind="stable").reset_index(drop=True)[CELL_COLUMNS]
    records = []
    for slide, group in rows.groupby("slide", sort=True):
        own = cells[cells["slide"] == slide]
        slide_errors = group.loc[group["cell_index"] < 0, "error"]
        cell_errors = group.loc[(group["cell_index"] >= 0) & (group["error"] != ""), "error"]
        n, flagged = len(own), int(own["flagged"].sum())
        error = "; ".join(sorted(set(slide_errors) | set(cell_errors)))
        fraction = flagged / n if n else math.nan
        if len(slide_errors) and (slide_errors != NO_CELLS).any():
            status = "error"
        elif n < max(cfg.min_cells, 1):
            status = "insufficient cells"
        elif fraction >= cfg.slide_flag_fraction:
            status = "flagged"
        else:
            status = "not flagged"
        records.append(
            {
                "slide": slide,
                "cells": n,
                "flagged_cells": flagged,
                "blast_fraction": fraction,
                "mean_prob_all": float(own["prob_all"].mean()) if n else math.nan,
                "status": status,
                "error": error,
            }
        )
    slides = pd.DataFrame(records, columns=SLIDE_COLUMNS)
    return cells, slides


# -- the job ------------------------------------------------------------------------------------


def list_slides(data: str) -> list[str]:
    """Every image file below `data` (a folder or URI, recursively), sorted.

    Raises:
        DataError: `data` is missing or holds no image files.
    """
    if not data:
        raise DataError("no data given: pass --data DIR (a folder of smear images, or a URI)")
    info = storage.file_info(data)
    if info.type.name == "NotFound":
        raise DataError(f"data path not found: {data}")
    if info.type.name == "File":
        paths = [data]
    else:
        paths = storage.list_files(data)
    slides = [p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS) and not p.rsplit("/", 1)[-1].startswith(".")]
    if not slides:
        raise DataError(f"no images found in {data} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return slides


def screen(
    model_dir: str,
    data: str,
    out: str,
    cfg: ScreenConfig | None = None,
    start_ray: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Screen every smear field under `data` with the bundle in `model_dir`; write `out`.

    Writes out/cells.parquet (one row per classified cell), out/slides.csv (one row per
    slide, none dropped) and out/screen.json (provenance, resolved config, counts, caveat).

    Args:
        model_dir: a model bundle folder written by `leukray run` (RUN/model).
        data: a folder (searched recursively), a single image, or a filesystem URI.
        out: output folder (local path or URI).
        cfg: detection and flagging parameters; defaults when None.
        start_ray: called once the bundle and data are checked; without it Ray must already
            be initialised (or is started by Ray Data with defaults).

    Returns:
        screen.json's content.

    Raises:
        BundleError: the bundle is missing, incomplete or modified (one line).
        DataError: no images under `data`.
    """
    cfg = cfg or ScreenConfig()
    if not out:
        raise ConfigError("no output folder: pass --out DIR")
    t0 = time.perf_counter()
    bundle = load_bundle(model_dir)  # verify before anything else runs
    # unless screen.blast_threshold is set, cells are flagged at the bundle's decision threshold
    cfg = dataclasses.replace(cfg, blast_threshold=cfg.cell_threshold(bundle.decision_threshold))
    bundle_sha256 = sha256_bytes(storage.read_bytes(storage.join(model_dir, BUNDLE_FILE)))
    slides = list_slides(data)
    if start_ray is not None:
        start_ray()
    weights = bundle.manifest["weights"]
    log(
        f"screening {len(slides)} smear fields: leukocyte detection -> {bundle.feature_source} features -> "
        f"{bundle.manifest['classifier']} (trunk {weights['name']})"
    )
    rows, use_gpu = screen_stream(slides, cfg, bundle, model_dir, STREAM_COLUMNS)
    cells, slide_table = summarise_slides(rows, cfg)
    provenance = {
        "model": model_dir,
        "bundle": storage.join(model_dir, BUNDLE_FILE),
        "bundle_sha256": bundle_sha256,
        "weights": json.dumps(weights),
        "data": data,
        "training_data_fingerprint": str(bundle.manifest.get("data_fingerprint", "")),
        "leukray_version": __version__,
    }
    storage.makedirs(out)
    write_parquet(storage.join(out, "cells.parquet"), cells, provenance)
    write_csv(storage.join(out, "slides.csv"), slide_table)
    summary = _screen_summary(bundle, bundle_sha256, data, cfg, len(slides), rows, cells, slide_table, use_gpu)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(storage.join(out, "screen.json"), summary)
    log(f"wrote {out}: {summary['counts']}")
    return summary


def _screen_summary(
    bundle: Bundle,
    bundle_sha256: str,
    data: str,
    cfg: ScreenConfig,
    n_slides: int,
    rows: pd.DataFrame,
    cells: pd.DataFrame,
    slide_table: pd.DataFrame,
    use_gpu: bool,
) -> dict[str, Any]:
    """screen.json's content: provenance, resolved config, counts, where it ran, the caveat."""
    status_counts = slide_table["status"].value_counts()
    return {
        "leukray_version": __version__,
        "caveat": CAVEAT,
        "model": {
            "bundle": bundle.model_dir,
            "bundle_json_sha256": bundle_sha256,
            "weights": bundle.manifest["weights"],
            "classifier": bundle.manifest["classifier"],
            "feature_source": bundle.feature_source,
            "training_data_fingerprint": bundle.manifest.get("data_fingerprint", ""),
            "preprocess": dataclasses.asdict(bundle.preprocess),
        },
        "data": data,
        "config": dataclasses.asdict(cfg),
        "counts": {
            "slides": n_slides,
            "cells": len(cells),
            "flagged_cells": int(cells["flagged"].sum()),
            **{status: int(status_counts.get(status, 0)) for status in SLIDE_STATUSES},
        },
        "seconds": None,
        "ray": {
            "classify_device": "gpu" if use_gpu else "cpu",
            "node_ids": {
                "detect": sorted(set(map(str, rows["detect_node"])) - {""}),
                "classify": sorted(set(map(str, rows["node_id"])) - {""}),
            },
            "cluster_cpus": cluster_cpus(),
            "cluster_gpus": cluster_gpus(),
        },
    }
