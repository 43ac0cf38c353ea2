"""Train / validation / test splits: by subject (default) or by image (the paper's, leaky).

A subject-level split keeps every image of a subject on one side, so the test score says
how the model does on *new patients*. C-NMC subjects each carry one class, so subjects are
stratified by their class; the image-level split reproduces the paper and overstates
accuracy because cells of one patient land on both sides.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from leukray.errors import DataError

TRAIN, VAL, TEST = "train", "val", "test"


def split_by_group(
    labels: pd.Series,
    groups: pd.Series,
    test_fraction: float,
    val_fraction: float,
    seed: int,
) -> pd.Series:
    """Assign each row to train / val / test so that no group spans two splits.

    Groups are stratified by their majority label; within each label the groups are
    shuffled with `seed` and dealt to test, then val, until each holds its fraction of that
    label's images (at least one group each, and at least one left for training).

    Raises:
        DataError: a class has too few groups to appear in every split.
    """
    split = pd.Series(TRAIN, index=labels.index, dtype=object)
    per_group = pd.DataFrame({"label": labels, "group": groups})
    group_label = per_group.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    group_size = per_group.groupby("group").size()
    rng = np.random.default_rng(seed)
    wanted = [(name, f) for name, f in ((TEST, test_fraction), (VAL, val_fraction)) if f > 0]
    for label in sorted(group_label.unique()):
        members = group_label.index[group_label == label].to_numpy()
        members = members[rng.permutation(len(members))]
        if len(members) < len(wanted) + 1:
            raise DataError(
                f"class {label!r} has {len(members)} subject(s); a subject-level split needs at least "
                f"{len(wanted) + 1} (use --split image to split by image, which leaks subjects)"
            )
        total = int(group_size[members].sum())
        cursor = 0
        for name, fraction in wanted:
            target = fraction * total
            taken = 0
            # at least one group; stop before overshooting by more than half a group, and
            # always leave at least one group per later split and for training
            reserve = len(wanted) - [w[0] for w in wanted].index(name)
            while cursor < len(members) - reserve:
                size = int(group_size[members[cursor]])
                if taken > 0 and taken + size / 2 > target:
                    break
                split[per_group["group"] == members[cursor]] = name
                taken += size
                cursor += 1
    check_disjoint(split, groups)
    return split


def split_by_image(labels: pd.Series, test_fraction: float, val_fraction: float, seed: int) -> pd.Series:
    """Stratified image-level split (the paper's protocol: leaks subjects across splits)."""
    split = pd.Series(TRAIN, index=labels.index, dtype=object)
    rng = np.random.default_rng(seed)
    for label in sorted(labels.unique()):
        idx = labels.index[labels == label].to_numpy()
        idx = idx[rng.permutation(len(idx))]
        n_test = max(1, int(round(test_fraction * len(idx))))
        n_val = int(round(val_fraction * len(idx)))
        if val_fraction > 0:
            n_val = max(1, n_val)
        if n_test + n_val >= len(idx):
            raise DataError(f"class {label!r} has {len(idx)} image(s): too few to split into train, val and test")
        split.loc[idx[:n_test]] = TEST
        split.loc[idx[n_test : n_test + n_val]] = VAL
    return split


def check_disjoint(split: pd.Series, groups: pd.Series) -> None:
    """Raise AssertionError if any group appears in more than one split."""
    spans = pd.DataFrame({"split": split, "group": groups}).groupby("group")["split"].nunique()
    leaking = spans[spans > 1]
    if not leaking.empty:
        raise AssertionError(f"groups on more than one side of the split: {list(leaking.index[:5])}")


def leaking_groups(split: pd.Series, groups: pd.Series) -> int:
    """How many groups appear in more than one split (0 for a subject-level split)."""
    spans = pd.DataFrame({"split": split, "group": groups}).groupby("group")["split"].nunique()
    return int((spans > 1).sum())
