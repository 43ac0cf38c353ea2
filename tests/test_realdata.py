"""Real C-NMC files (../shared/data/cnmc-dev, a subset of the training fold) load, get their
subjects and preprocess. Skipped where the data is absent (a user's machine)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CNMC_DEV

from leukray.config import PreprocessConfig
from leukray.data.discovery import discover
from leukray.data.splits import check_disjoint, split_by_group
from leukray.ops.preprocess import crop_to_foreground, decode_image, preprocess_image

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def cnmc():
    return discover(str(CNMC_DEV))


def test_layout_labels_and_subjects(cnmc):
    images, skipped = cnmc
    assert skipped.empty
    counts = images["label"].value_counts()
    assert counts["all"] == 2397 and counts["hem"] == 1130  # the official fold_0 counts
    subjects = images.groupby("label")["subject"].nunique()
    assert subjects["all"] == 19 and subjects["hem"] == 9  # h* and H* folded together
    assert images.loc[images["label"] == "hem", "subject"].str.startswith("H").all()
    assert (images.groupby("subject")["label"].nunique() == 1).all()  # one class per subject


def test_subject_split_on_real_subjects(cnmc):
    images, _ = cnmc
    split = split_by_group(images["label"], images["subject"], 0.2, 0.15, seed=0)
    check_disjoint(split, images["subject"])
    for name in ("train", "val", "test"):
        assert set(images.loc[split == name, "label"]) == {"all", "hem"}


def test_real_cells_preprocess(cnmc):
    images, _ = cnmc
    sample = images.groupby("label", group_keys=False).apply(lambda g: g.sample(20, random_state=0))
    cfg = PreprocessConfig()
    sides = []
    for path in sample["path"]:
        with open(path, "rb") as handle:
            image = decode_image(handle.read())
        assert image.shape == (450, 450, 3)
        crop = crop_to_foreground(image, cfg)
        sides.append(max(crop.shape[:2]))
        out = preprocess_image(image, cfg)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # real cells are 150-260 px across (data/README.md): the crop removes most of the black
    assert 120 < np.median(sides) < 300
