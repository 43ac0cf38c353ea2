"""Which images a run uses and how: the inputs of --data (and --test-data), read errors and
byte-identical duplicates, the split, and how many augmented copies each training image gets.

May import: numpy, pandas, `leukray.config`, `leukray.errors`, `leukray.data.*`,
`leukray.ops.augment`, `leukray.io.tables`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from leukray.config import RunConfig
from leukray.data.discovery import assign_groups, discover, mark_duplicates
from leukray.data.splits import TEST, TRAIN, leaking_groups, split_by_group, split_by_image
from leukray.errors import DataError
from leukray.io.tables import ERROR_COLUMNS
from leukray.ops.augment import plan_copies


def discover_all(cfg: RunConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The images of --data (and --test-data), with a `dataset` column; no Ray needed."""
    images, skipped = discover(cfg.data.path, cfg.data.layout, cfg.data.allowed)
    images["dataset"] = "data"
    if cfg.data.test_path:
        test_images, test_skipped = discover(cfg.data.test_path, cfg.data.layout, cfg.data.allowed)
        test_images["dataset"] = "test-data"
        images = pd.concat([images, test_images], ignore_index=True)
        skipped = pd.concat([skipped, test_skipped], ignore_index=True)
    return images, skipped


def build_manifest(
    cfg: RunConfig, images: pd.DataFrame, skipped: pd.DataFrame, hashed: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Deduplicate, split and plan augmentation.

    Args:
        images: `discover_all`'s images.
        skipped: files discovery could not use (path, reason).
        hashed: sha256 and read_error per path (indexed by path).

    Returns:
        (manifest, errors, facts about groups, leaks and duplicates).
    """
    images["sha256"] = images["path"].map(hashed["sha256"]).fillna("")
    read_error = images["path"].map(hashed["read_error"]).fillna("not hashed")
    images["duplicate_of"] = mark_duplicates(images)
    unreadable = read_error != ""
    read_errors = pd.DataFrame(
        {"path": images.loc[unreadable, "path"], "stage": "read", "reason": read_error[unreadable]}
    )
    usable = (~unreadable) & (images["duplicate_of"] == "")
    groups, group_source = assign_groups(images)
    images["split"] = _split(cfg, images, usable, groups)
    images["n_aug"] = 0
    train = images[images["split"] == TRAIN]
    if cfg.augment.enabled:
        images.loc[train.index, "n_aug"] = plan_copies(train, cfg.augment, cfg.split.seed)
    images["subject_group"] = groups
    facts = {
        "group_source": group_source,
        "leaking_subjects": leaking_groups(images.loc[usable, "split"], groups[usable]),
        "duplicates": int((images["duplicate_of"] != "").sum()),
        "duplicate_pairs": images.loc[images["duplicate_of"] != "", ["path", "duplicate_of"]].to_dict("records")[:1000],
    }
    errors = pd.concat([skipped, read_errors], ignore_index=True).reindex(columns=ERROR_COLUMNS)
    return images, errors, facts


def _split(cfg: RunConfig, images: pd.DataFrame, usable: pd.Series, groups: pd.Series) -> pd.Series:
    """train / val / test ("" for unusable images): --data split by subject (or image),
    --test-data all test."""
    split = pd.Series("", index=images.index, dtype=object)
    primary = usable & (images["dataset"] == "data")
    test_fraction = 0.0 if cfg.data.test_path else cfg.split.test_fraction
    if images.loc[primary, "label"].nunique() < 2:
        found = sorted(images.loc[primary, "label"].unique())
        raise DataError(f"need at least two classes of usable images in {cfg.data.path}; found {found}")
    labels = images.loc[primary, "label"]
    if cfg.split.mode == "subject":
        split.loc[primary] = split_by_group(
            labels, groups[primary], test_fraction, cfg.split.val_fraction, cfg.split.seed
        )
    else:
        split.loc[primary] = split_by_image(labels, test_fraction, cfg.split.val_fraction, cfg.split.seed)
    split.loc[usable & (images["dataset"] == "test-data")] = TEST
    if not (split == TEST).any():
        raise DataError("the test split is empty: check --test-data or split.test_fraction")
    return split
