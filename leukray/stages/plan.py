"""`leukray config show`: what a run with this configuration would read, with which weights,
and where it would write — without running anything: no Ray, no weights loaded, no file
decoded. The counts come from the same discovery and split code the run uses; only the
byte-level duplicate check is left out (it reads every file; the run does it, and a
duplicate can move an image out of the counts).

May import: `leukray.config`, `leukray.errors`, `leukray.io`, `leukray.data`,
`leukray.models.trunk` (for where ImageNet weights are cached).
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from leukray.config import RunConfig
from leukray.data.manifest import build_manifest, discover_all
from leukray.errors import WeightsError
from leukray.io import storage

SPLITS = ("train", "val", "test")


def plan_data(cfg: RunConfig) -> dict[str, Any]:
    """Image and subject counts per class and split, as the run would split them.

    Returns:
        {"counts": {found, usable, skipped, augmented_copies}, "images": {split: {label: n}},
        "subjects": {split: {label: n}}, "group_source", "leaking_subjects", "text"}.

    Raises:
        DataError: the data cannot be used (as the run would say).
    """
    images, skipped = discover_all(cfg)
    # Every path its own "hash": nothing is a duplicate and nothing is unreadable here.
    hashed = pd.DataFrame({"sha256": images["path"], "read_error": ""}, index=images["path"])
    hashed = hashed[~hashed.index.duplicated()]
    manifest, errors, facts = build_manifest(cfg, images, skipped, hashed)
    used = manifest[manifest["split"] != ""]
    image_counts = _by_split(used.groupby(["split", "label"]).size())
    subject_counts = _by_split(used.groupby(["split", "label"])["subject_group"].nunique())
    counts = {
        "found": int(len(manifest)),
        "usable": int(len(used)),
        "skipped": int(len(errors)),
        "augmented_copies": int(used["n_aug"].sum()),
    }
    lines = [
        "# data (discovery and split as the run does them; duplicates are found when the run hashes the files)",
        f"{cfg.data.path}" + (f" + test data {cfg.data.test_path}" if cfg.data.test_path else ""),
        f"{counts['found']} images found, {counts['usable']} usable, {counts['skipped']} skipped (not images); "
        f"{counts['augmented_copies']} augmented training copies planned",
        f"split: {cfg.split.mode}-level, seed {cfg.split.seed}; groups: {facts['group_source']}; "
        f"subjects on more than one side: {facts['leaking_subjects']}",
    ]
    labels = sorted(used["label"].unique())
    lines.append(f"{'split':<6}" + "".join(f"{label + ' images':>14}{label + ' subjects':>16}" for label in labels))
    for split in SPLITS:
        cells = "".join(
            f"{image_counts.get(split, {}).get(lb, 0):>14}{subject_counts.get(split, {}).get(lb, 0):>16}"
            for lb in labels
        )
        lines.append(f"{split:<6}{cells}")
    return {
        "counts": counts,
        "images": image_counts,
        "subjects": subject_counts,
        "group_source": facts["group_source"],
        "leaking_subjects": int(facts["leaking_subjects"]),
        "text": "\n".join(lines),
    }


def _by_split(series: pd.Series) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for (split, label), value in series.items():
        table.setdefault(str(split), {})[str(label)] = int(value)
    return table


def describe_weights(spec: str, seed: int) -> dict[str, Any]:
    """Which trunk weights a run would use, from the spec alone (nothing is loaded or
    downloaded).

    Raises:
        WeightsError: a weights file that does not exist, or an unknown ImageNet variant.
    """
    if spec == "random":
        return _weights(
            "random-init", "random", f"RANDOM-INIT trunk (torch.manual_seed({seed})): not ImageNet features"
        )
    if spec == "auto" or spec == "imagenet" or spec.startswith("imagenet:"):
        from leukray.models.trunk import imagenet_cache_file

        cached = imagenet_cache_file("imagenet" if spec == "auto" else spec)
        name = f"ImageNet ({spec.split(':', 1)[1] if ':' in spec else 'IMAGENET1K_V1'})"
        if os.path.exists(cached):
            return _weights(name, "imagenet", f"{name} from the torch cache: {cached}")
        if spec == "auto":
            return _weights(
                "random-init", "random", f"auto: {cached} is not cached, so a RANDOM-INIT trunk (seed {seed})"
            )
        return _weights(
            name,
            "imagenet",
            f"{name}: NOT cached at {cached}; the run downloads it (offline it stops with exit code 4)",
        )
    if not os.path.isfile(spec):
        raise WeightsError(
            f"--weights {spec!r}: no such file (use imagenet, random, auto, or a path to a ResNet50 state dict)"
        )
    return _weights(
        os.path.basename(spec), "file", f"state dict {os.path.abspath(spec)} ({os.path.getsize(spec):,} bytes)"
    )


def _weights(name: str, kind: str, text: str) -> dict[str, Any]:
    return {"name": name, "kind": kind, "text": text}


def describe_outputs(cfg: RunConfig) -> dict[str, Any]:
    """Where the run would write, and whether that folder already holds a run."""
    if not cfg.out:
        return {"out": "", "exists": False, "text": "no output folder yet: pass --out RUN or set `out:` in --config"}
    exists = storage.exists(cfg.out)
    finished = exists and storage.exists(storage.join(cfg.out, "summary.json"))
    checkpoints = cfg.train.storage_path or storage.join(cfg.out, "train")
    state = "holds a finished run: its files will be replaced" if finished else "exists" if exists else "new"
    text = (
        f"{cfg.out} ({state}): config.yaml, manifest.parquet, features.parquet, errors.csv, leaderboard.csv/.md, "
        f"summary.json, predictions.parquet, report.html, model/ (README: The run folder)\n"
        f"Ray Train checkpoints: {checkpoints}" + ("" if cfg.train.enabled else " (train.enabled is false: none)")
    )
    return {"out": cfg.out, "exists": exists, "finished_run": finished, "checkpoints": checkpoints, "text": text}
