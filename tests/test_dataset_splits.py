"""Name parsing, layout discovery, duplicate detection and split disjointness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from leukray.data.discovery import assign_groups, discover, mark_duplicates, parse_cnmc_name
from leukray.data.splits import TEST, TRAIN, VAL, check_disjoint, leaking_groups, split_by_group, split_by_image
from leukray.errors import DataError


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class TestNames:
    @pytest.mark.parametrize(
        "name, subject, image, cell, label",
        [
            ("UID_11_10_1_all.bmp", "11", 10, 1, "all"),
            ("UID_H3_2_5_hem.png", "H3", 2, 5, "hem"),
            ("UID_h3_2_5_hem.png", "H3", 2, 5, "hem"),  # same subject, lower case
            ("/x/fold_0/all/uid_7_1_2_ALL.BMP", "7", 1, 2, "all"),
        ],
    )
    def test_parses(self, name, subject, image, cell, label):
        parsed = parse_cnmc_name(name)
        assert (parsed.subject, parsed.image, parsed.cell, parsed.label) == (subject, image, cell, label)

    @pytest.mark.parametrize("name", ["cell_001.png", "UID_11_10_all.bmp", "UID_11_10_1_blast.bmp"])
    def test_rejects(self, name):
        assert parse_cnmc_name(name) is None


class TestDiscover:
    def test_cnmc_layout_with_folds(self, tmp_path):
        touch(tmp_path / "fold_0/all/UID_1_1_1_all.bmp")
        touch(tmp_path / "fold_0/hem/UID_h2_1_1_hem.bmp")
        touch(tmp_path / "fold_1/hem/UID_H2_3_1_hem.bmp")
        touch(tmp_path / "fold_1/hem/notes.txt")
        images, skipped = discover(str(tmp_path))
        assert sorted(images["label"]) == ["all", "hem", "hem"]
        assert set(images["subject"]) == {"1", "H2"}
        assert list(skipped["reason"]) == ["not an image file extension (.txt)"]

    def test_cnmc_without_folds_and_label_conflict(self, tmp_path):
        touch(tmp_path / "all/UID_1_1_1_all.bmp")
        touch(tmp_path / "hem/UID_H1_1_1_hem.bmp")
        touch(tmp_path / "hem/UID_5_1_1_all.bmp")  # named ALL, filed as normal
        images, skipped = discover(str(tmp_path))
        assert len(images) == 2
        assert "contradicts its folder" in skipped["reason"].iloc[0]

    def test_class_folders_without_subjects(self, tmp_path):
        touch(tmp_path / "blast/a.png")
        touch(tmp_path / "blast/deeper/b.png")
        touch(tmp_path / "normal/c.jpg")
        images, _ = discover(str(tmp_path))
        assert sorted(images["label"]) == ["blast", "blast", "normal"]
        groups, source = assign_groups(images)
        assert groups.nunique() == 3 and source.startswith("none")

    def test_csv_manifest_relative_paths(self, tmp_path):
        touch(tmp_path / "img/a.png")
        touch(tmp_path / "img/b.png")
        (tmp_path / "m.csv").write_text("path,label,subject\nimg/a.png,all,p1\nimg/b.png,hem,p2\n")
        images, _ = discover(str(tmp_path / "m.csv"))
        assert images["path"].tolist() == [str(tmp_path / "img/a.png"), str(tmp_path / "img/b.png")]
        assert images["subject"].tolist() == ["P1", "P2"]

    def test_user_mistakes_are_one_line_data_errors(self, tmp_path):
        with pytest.raises(DataError, match="not found"):
            discover(str(tmp_path / "nope"))
        (tmp_path / "empty").mkdir()
        with pytest.raises(DataError, match="no class folders"):
            discover(str(tmp_path / "empty"))
        touch(tmp_path / "one/all/UID_1_1_1_all.bmp")
        with pytest.raises(DataError, match="at least two classes"):
            discover(str(tmp_path / "one"))
        (tmp_path / "bad.csv").write_text("file,class\na,b\n")
        with pytest.raises(DataError, match="lacks column"):
            discover(str(tmp_path / "bad.csv"))


class TestDuplicates:
    def test_first_by_path_is_kept(self):
        images = pd.DataFrame(
            {
                "path": ["b/UID_2_1_1_all.bmp", "a/UID_1_1_1_all.bmp", "c.bmp", "d.bmp", "e.bmp"],
                "sha256": ["h1", "h1", "h2", "h1", ""],
            }
        )
        dup = mark_duplicates(images)
        assert dup.tolist() == ["a/UID_1_1_1_all.bmp", "", "", "a/UID_1_1_1_all.bmp", ""]


def subjects_frame(n_all_subjects=10, n_hem_subjects=5, per_subject=(3, 12), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_all_subjects):
        rows += [("all", f"{i}")] * int(rng.integers(*per_subject))
    for i in range(n_hem_subjects):
        rows += [("hem", f"H{i}")] * int(rng.integers(*per_subject))
    return pd.DataFrame(rows, columns=["label", "subject"])


class TestSplits:
    @pytest.mark.parametrize("seed", [0, 1, 2, 3])
    def test_subject_split_is_disjoint_and_stratified(self, seed):
        frame = subjects_frame(seed=seed)
        split = split_by_group(frame["label"], frame["subject"], 0.2, 0.15, seed)
        check_disjoint(split, frame["subject"])
        assert leaking_groups(split, frame["subject"]) == 0
        for name in (TRAIN, VAL, TEST):
            assert set(frame.loc[split == name, "label"]) == {"all", "hem"}, name
        assert 0.08 < (split == TEST).mean() < 0.4

    def test_without_test_fraction_only_train_and_val(self):
        frame = subjects_frame()
        split = split_by_group(frame["label"], frame["subject"], 0.0, 0.2, 0)
        assert set(split) == {TRAIN, VAL}

    def test_too_few_subjects_is_a_clear_error(self):
        frame = subjects_frame(n_hem_subjects=2)
        with pytest.raises(DataError, match="class 'hem' has 2 subject"):
            split_by_group(frame["label"], frame["subject"], 0.2, 0.15, 0)

    def test_image_split_leaks_and_says_so(self):
        frame = subjects_frame()
        split = split_by_image(frame["label"], 0.2, 0.15, 0)
        assert leaking_groups(split, frame["subject"]) > 0
        with pytest.raises(AssertionError, match="more than one side"):
            check_disjoint(split, frame["subject"])
