"""C-NMC's folds as they ship (`fold_0..2`): train on two, test on the third, in one command
line (`--data F0 --data F1 --test-data F2`, or `data.path: F0,F1` in a config file). No Ray:
discovery, the manifest and the split are plain functions."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from leukray.cli import build_parser
from leukray.config import build_config
from leukray.data.discovery import discover, split_roots
from leukray.data.manifest import build_manifest, discover_all
from leukray.errors import DataError


@pytest.fixture(scope="module")
def three_folds(tmp_path_factory):
    """Synthetic cells in C-NMC's shipped layout: fold_0, fold_1, fold_2, each {all,hem}/,
    every subject in exactly one fold."""
    from leukray.tools.synth import generate_dataset

    root = tmp_path_factory.mktemp("cnmc")
    index = generate_dataset(root, cells=90, subjects=12, seed=3, folds=3)
    return root, index


def test_repeated_data_options_name_several_roots():
    args = build_parser().parse_args(
        ["run", "--data", "C/fold_0", "--data", "C/fold_1", "--test-data", "C/fold_2", "--out", "r"]
    )
    assert (args.data, args.test_data) == ("C/fold_0,C/fold_1", "C/fold_2")
    assert build_parser().parse_args(["extract", "--data", "only", "--out", "r"]).data == "only"


def test_discovery_lists_exactly_the_folds_given(three_folds):
    root, index = three_folds
    images, skipped = discover(f"{root}/fold_0,{root}/fold_1")
    expected = index[index["fold"].isin([0, 1])]
    assert sorted(images["path"]) == sorted(expected["path"]) and skipped.empty
    assert set(images["subject"]) == set(expected["subject"])
    whole, _ = discover(str(root))  # the parent holds all three folds
    assert len(whole) == len(index)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{root}/fold_0,", "empty entry"),
        ("{root}/fold_0,{root}/fold_0/", "overlap"),
        ("{root},{root}/fold_1", "overlap"),
        ("{root}/fold_0,{root}/fold_9", "data path not found: {root}/fold_9"),
    ],
)
def test_a_bad_list_of_roots_is_a_one_line_error(three_folds, spec, message):
    root = three_folds[0]
    with pytest.raises(DataError, match=message.format(root=root)):
        discover(spec.format(root=root))


def test_split_roots_keeps_each_root_as_given():
    assert split_roots("s3://b/cnmc/fold_0/, s3://b/cnmc/fold_1") == ["s3://b/cnmc/fold_0/", "s3://b/cnmc/fold_1"]
    assert split_roots("data") == ["data"]


def test_two_folds_train_and_validate_and_the_third_is_the_test_split(three_folds):
    root, index = three_folds
    cfg = build_config(
        {"data": {"path": f"{root}/fold_0,{root}/fold_1", "test_path": f"{root}/fold_2"}},
        {"out": "unused", "split.val_fraction": "0.2"},
    )
    images, skipped = discover_all(cfg)
    hashed = pd.DataFrame(
        {
            "sha256": [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in images["path"]],
            "read_error": "",
        },
        index=images["path"],
    )
    manifest, errors, facts = build_manifest(cfg, images, skipped, hashed)
    fold = manifest["path"].map(index.set_index("path")["fold"])
    assert errors.empty and facts["leaking_subjects"] == 0
    assert (manifest.loc[fold == 2, "split"] == "test").all()
    assert set(manifest.loc[fold < 2, "split"]) == {"train", "val"}  # folds 0-1 split into train and val only
    assert len(manifest) == len(index)
    by_split = manifest.groupby("split")["subject"].agg(set)
    assert not (by_split["train"] & by_split["val"]) and not (by_split["test"] & (by_split["train"] | by_split["val"]))
