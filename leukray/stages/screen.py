"""`leukray screen`: find the leukocytes in whole peripheral-blood smear fields, cut each out
as a C-NMC-like single-cell crop and classify it with a model bundle; report per cell and per
slide, and show a reviewer why each slide was flagged (report.html).

The bundle's classifier was trained on C-NMC crops: one segmented cell on a black background.
Detection and cropping are `leukray.ops.smear`; this stage streams the slides through them
(`leukray.distributed.streaming.screen_stream`), writes finished slides as parts
(`leukray.io.screenparts`, so a rerun resumes), and assembles the tables and the review from
the parts.

May import: `leukray.config`, `leukray.errors`, `leukray.io`, `leukray.data`, `leukray.ops`,
`leukray.models`, `leukray.distributed`, `leukray.report`."""

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
from leukray.io import journal, screenparts, storage, wholeslide
from leukray.io.tables import log, write_csv, write_json, write_parquet
from leukray.models.bundle import BUNDLE_FILE, Bundle, load_bundle, sha256_bytes
from leukray.ops.smear import BOX_COLUMNS, NO_CELLS
from leukray.report.review import write_review

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
FINAL_FILES = ("cells.parquet", "slides.csv", "screen.json", "report.html")
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
        # A whole slide's empty tiles each say NO_CELLS; that is no error when others had cells.
        errors = set(slide_errors) - ({NO_CELLS} if len(own) else set())
        error = "; ".join(sorted(errors | set(cell_errors)))
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
    """Every image file below `data` (a folder or URI, recursively), sorted: camera fields
    and whole-slide images (TIFF, and OpenSlide's SVS, NDPI, MRXS, ...).

    Raises:
        DataError: `data` is missing or holds no image files, or holds scanner files without
            OpenSlide installed.
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
    extensions = IMAGE_EXTENSIONS + wholeslide.OPENSLIDE_EXTENSIONS
    slides = [p for p in paths if p.lower().endswith(extensions) and not p.rsplit("/", 1)[-1].startswith(".")]
    if not slides:
        raise DataError(f"no images found in {data} (looked for {', '.join(extensions)})")
    scanner_files = [p for p in slides if wholeslide.is_openslide_path(p)]
    if scanner_files and not wholeslide.openslide_available():
        name = scanner_files[0].rsplit("/", 1)[-1]
        raise DataError(f"{name} is a whole-slide image and needs OpenSlide: {wholeslide.WSI_EXTRA}")
    return slides


# Settings that change how the screen is cut into parts, not what it computes.
RESOURCE_FIELDS = ("batch_size", "part_slides")
# Settings applied when the results are assembled: parts made under others are still valid.
FLAGGING_FIELDS = ("blast_threshold", "slide_flag_fraction", "min_cells")
PART_SECONDS = 60.0  # a part is written at least this often while slides finish
PART_COLUMNS = [*STREAM_COLUMNS, "thumbnail", "thumb_scale", "crop_jpeg"]


def screen_settings(bundle_sha256: str, data: str, cfg: ScreenConfig) -> dict[str, Any]:
    """What a screen folder's journal records and a rerun is compared with: the bundle,
    the data, and every setting that can change a result."""
    fields = {f"screen.{k}": v for k, v in dataclasses.asdict(cfg).items() if k not in RESOURCE_FIELDS}
    return {"command": "screen", "model.bundle_json_sha256": bundle_sha256, "data": data, **fields}


def part_identity(settings: dict[str, Any]) -> str:
    """What a part's rows depend on: the settings less those applied at assembly."""
    kept = {k: v for k, v in settings.items() if k.removeprefix("screen.") not in FLAGGING_FIELDS}
    return journal.identity_of("screen-part", kept)


def read_failure(rows: pd.DataFrame) -> str:
    """Why a slide (its rows) could not be read, "" when it was: the reasons of its rows
    that stand for the slide or a tile (cell_index < 0), but for an empty tile or field."""
    own = rows.loc[rows["cell_index"] < 0, "error"].astype(str)
    return "; ".join(sorted(set(own) - {"", NO_CELLS}))


class SlideParts:
    """Gathers the streamed rows into finished slides and writes them out as parts.

    A slide is finished when `unit_rows` distinct rows of each of its `units` detection
    units (a camera field is one unit, a whole slide one per tile) have arrived (a row seen
    twice, or after its slide finished, is kept once). Of a finished slide's crops only the
    `report_cells` most suspicious are kept. Finished slides are written as one part once `part_slides` of them wait, or
    PART_SECONDS after the last part, and at `close`.
    """

    def __init__(self, out: str, identity: str, provenance: dict[str, str], cfg: ScreenConfig):
        self.out, self.identity, self.provenance, self.cfg = out, identity, provenance, cfg
        self.attempt = screenparts.new_attempt()
        self.pending: dict[str, list[pd.DataFrame]] = {}
        self.seen: dict[str, dict[int, set[int]]] = {}  # slide -> unit -> cell indices arrived
        self.need: dict[str, dict[int, int]] = {}  # slide -> unit -> rows it gave
        self.finished: list[pd.DataFrame] = []
        self.failed: dict[str, str] = {}  # finished slides not yet written that could not be read
        self.parts: list[screenparts.Part] = []
        self.done: set[str] = set()
        self.last_write = time.monotonic()

    def add(self, rows: pd.DataFrame) -> None:
        for slide, own in rows.groupby("slide", sort=False):
            if slide in self.done:
                continue
            self.pending.setdefault(str(slide), []).append(own)
            if self._complete(str(slide), own):
                self.finished.append(self._finish(str(slide)))
                if len(self.finished) >= self.cfg.part_slides:
                    self.write()
        if self.finished and time.monotonic() - self.last_write >= PART_SECONDS:
            self.write()

    def _complete(self, slide: str, rows: pd.DataFrame) -> bool:
        """Count `rows` (new rows of `slide`) in; whether every unit of the slide is complete."""
        seen, need = self.seen.setdefault(slide, {}), self.need.setdefault(slide, {})
        for unit, cell, total in zip(rows["unit"], rows["cell_index"], rows["unit_rows"]):
            seen.setdefault(int(unit), set()).add(int(cell))
            need[int(unit)] = int(total)
        units = int(rows["units"].iloc[0])
        return len(need) >= units and all(len(seen[u]) >= n for u, n in need.items())

    def _finish(self, slide: str) -> pd.DataFrame:
        self.done.add(slide)
        self.seen.pop(slide, None)
        self.need.pop(slide, None)
        rows = pd.concat(self.pending.pop(slide), ignore_index=True).drop_duplicates(["slide", "unit", "cell_index"])
        rows = rows.sort_values("cell_index", kind="stable").reset_index(drop=True)
        top = rows["prob_all"].fillna(-1.0).nlargest(self.cfg.report_cells).index
        rows.loc[~rows.index.isin(top), "crop_jpeg"] = b""
        reason = read_failure(rows)
        if reason:
            self.failed[slide] = reason
        return rows[PART_COLUMNS]

    def write(self) -> None:
        if self.finished:
            name = screenparts.part_name(self.attempt, len(self.parts))
            rows = pd.concat(self.finished, ignore_index=True)
            part = screenparts.write_part(self.out, name, rows, self.identity, self.provenance, failed=self.failed)
            self.parts.append(part)
            self.finished, self.failed = [], {}
        self.last_write = time.monotonic()

    def close(self) -> None:
        """Write what is finished; a slide still missing rows is an error (the stream lost them)."""
        if self.pending:
            missing = ", ".join(sorted(self.pending)[:3])
            raise DataError(f"the screening stream ended before these slides were complete: {missing}")
        self.write()


def screen(
    model_dir: str,
    data: str,
    out: str,
    cfg: ScreenConfig | None = None,
    start_ray: Callable[[], None] | None = None,
    existing: str = "refuse",
) -> dict[str, Any]:
    """Screen every smear field under `data` with the bundle in `model_dir`; write `out`.

    Writes out/parts/*.parquet as slides finish (see `leukray.io.screenparts`), then
    assembles out/cells.parquet (one row per classified cell), out/slides.csv (one row per
    slide, none dropped), out/screen.json (provenance, resolved config, counts, caveat) and
    out/report.html (the visual review). Rerun into the same `out` it screens only the
    slides no finished part holds, and those no earlier attempt could read.

    Args:
        model_dir: a model bundle folder written by `leukray run` (RUN/model).
        data: a folder (searched recursively), a single image, or a filesystem URI.
        out: output folder (local path or URI).
        cfg: detection and flagging parameters; defaults when None.
        start_ray: called once the bundle and data are checked; without it Ray must already
            be initialised (or is started by Ray Data with defaults).
        existing: what to do when `out` holds a screen of another bundle, data or settings
            (or a training run): refuse (one line), overwrite (start again) or resume (keep
            the parts whose identity still matches; flagging settings never invalidate one).

    Returns:
        screen.json's content.

    Raises:
        BundleError: the bundle is missing, incomplete or modified (one line).
        DataError: no images under `data`.
        ConfigError: `out` holds other results and `existing` is refuse.
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
    settings = screen_settings(bundle_sha256, data, cfg)
    identity = part_identity(settings)
    done, unreadable = _open_screen_folder(out, settings, identity, existing)
    todo = [s for s in slides if s not in done]
    provenance = _provenance(model_dir, bundle, bundle_sha256, data)
    use_gpu = None
    if todo:
        use_gpu = _screen_slides(todo, len(slides), cfg, bundle, model_dir, out, identity, provenance, start_ray)
    else:
        log(f"all {len(slides)} smear fields were screened by an earlier attempt into {out}")
    summary = _assemble(out, slides, identity, cfg, provenance, bundle, bundle_sha256, use_gpu)
    summary["resumed"] = _resumed(len(slides), todo, unreadable)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(storage.join(out, "screen.json"), summary)
    log(f"wrote {out}: {summary['counts']}")
    return summary


def _resumed(total: int, todo: list[str], unreadable: set[str]) -> dict[str, int]:
    """screen.json's `resumed`: how many slides earlier attempts screened, how many this one
    did, and how many of those it read again because no earlier attempt could."""
    return {
        "slides_from_earlier_attempts": total - len(todo),
        "slides_screened_now": len(todo),
        "unreadable_slides_read_again": len(unreadable & set(todo)),
    }


def _provenance(model_dir: str, bundle: Bundle, bundle_sha256: str, data: str) -> dict[str, str]:
    return {
        "model": model_dir,
        "bundle": storage.join(model_dir, BUNDLE_FILE),
        "bundle_sha256": bundle_sha256,
        "weights": json.dumps(bundle.manifest["weights"]),
        "data": data,
        "training_data_fingerprint": str(bundle.manifest.get("data_fingerprint", "")),
        "leukray_version": __version__,
    }


def _open_screen_folder(out: str, settings: dict[str, Any], identity: str, existing: str) -> tuple[set[str], set[str]]:
    """Claim `out` through the run journal (`leukray.io.journal.open_run`: refused when it
    holds other results, unless overwrite/resume), drop what a killed attempt left and the
    parts of another identity. Returns the slides finished parts already hold, less those no
    attempt could read (every rerun reads them again), and those."""
    try:
        earlier = journal.read_journal(out)
    except DataError:
        earlier = None  # a broken journal: open_run refuses it, or overwrite starts clean
    if earlier and earlier["stages"]:  # never --overwrite a training run with a screen
        raise ConfigError(f"{out} holds a `leukray run` (its run.json lists stages): screen into another --out")
    journal.open_run(out, settings, existing)
    parts, stray = screenparts.list_parts(out)
    if existing == "overwrite":
        stray += [p.path for p in parts]
        parts = []
        stray += [storage.join(out, name) for name in FINAL_FILES if storage.exists(storage.join(out, name))]
    other = [p for p in parts if p.identity != identity]
    for path in stray + [p.path for p in other]:
        storage.delete(path)
    screenparts.forget_media()
    owners, _ = screenparts.slide_owners(parts, identity)
    if stray or other:
        log(f"removed {len(stray) + len(other)} files of earlier attempts in {out}")
    unreadable = {slide for slide, part in owners.items() if slide in part.failed}
    if unreadable:
        log(f"reading again {len(unreadable)} slides that an earlier attempt could not read")
    return set(owners) - unreadable, unreadable


def _screen_slides(
    todo: list[str],
    total: int,
    cfg: ScreenConfig,
    bundle: Bundle,
    model_dir: str,
    out: str,
    identity: str,
    provenance: dict[str, str],
    start_ray: Callable[[], None] | None,
) -> bool:
    """Stream `todo` through detection and the classifier into parts (Ray started first by
    `start_ray`, when given); whether on GPUs."""
    if start_ray is not None:
        start_ray()
    weights = bundle.manifest["weights"]
    resumed = f" ({total - len(todo)} done by an earlier attempt)" if total > len(todo) else ""
    log(
        f"screening {len(todo)} smear fields{resumed}: leukocyte detection -> {bundle.feature_source} features -> "
        f"{bundle.manifest['classifier']} (trunk {weights['name']})"
    )
    columns = [*STREAM_COLUMNS, "unit", "units", "unit_rows", "thumbnail", "thumb_scale", "crop_jpeg"]
    frames, use_gpu = screen_stream(todo, cfg, bundle, model_dir, columns, cfg.thumbnail_px)
    writer = SlideParts(out, identity, provenance, cfg)
    try:
        for frame in frames:
            writer.add(frame)
    finally:
        frames.close()
    writer.close()
    return use_gpu


def _assemble(
    out: str,
    slides: list[str],
    identity: str,
    cfg: ScreenConfig,
    provenance: dict[str, str],
    bundle: Bundle,
    bundle_sha256: str,
    use_gpu: bool | None,
) -> dict[str, Any]:
    """cells.parquet, slides.csv and report.html from the parts (each slide once, from the
    first part that read it, else the first that holds it: `screenparts.slide_owners`);
    returns screen.json's content (without timing)."""
    owners, failures = screenparts.slide_owners(screenparts.list_parts(out)[0], identity)
    wanted = set(slides)
    owner = {slide: part.path for slide, part in owners.items() if slide in wanted}
    missing = wanted - set(owner)
    if missing:
        raise DataError(f"{len(missing)} slides have no results in {out}/parts (e.g. {sorted(missing)[0]}); rerun")
    frames = []
    for path, part in sorted({p.path: p for p in owners.values()}.items()):
        rows = screenparts.read_rows(part, STREAM_COLUMNS)
        frames.append(rows[rows["slide"].map(owner.get) == path])
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=STREAM_COLUMNS)
    cells, slide_table = summarise_slides(rows, cfg)
    write_parquet(storage.join(out, "cells.parquet"), cells, provenance)
    write_csv(storage.join(out, "slides.csv"), slide_table)
    write_review(out, slide_table, cells, owner, cfg.report_cells, CAVEAT)
    summary = _screen_summary(
        bundle, bundle_sha256, provenance["data"], cfg, len(slides), rows, cells, slide_table, use_gpu
    )
    summary["read_failures"] = [
        {
            "slide": slide,
            "error": reason,
            "part": part.path.rsplit("/", 1)[-1],
            "read_later": slide not in owners[slide].failed,
        }
        for slide, reason, part in failures
        if slide in wanted
    ]
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
    use_gpu: bool | None,
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
            "calibration": bundle.calibration,
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
            "classify_device": "none (every slide was screened earlier)"
            if use_gpu is None
            else "gpu"
            if use_gpu
            else "cpu",
            "node_ids": {
                "detect": sorted(set(map(str, rows["detect_node"])) - {""}),
                "classify": sorted(set(map(str, rows["node_id"])) - {""}),
            },
            "cluster_cpus": cluster_cpus(),
            "cluster_gpus": cluster_gpus(),
        },
    }
