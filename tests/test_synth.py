"""Tests of the synthetic C-NMC-style data generator (`leukray.synth`)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from leukray.tools.synth import SubjectStyle, generate_dataset, render_cell

NAME_RE = re.compile(r"UID_(H?\d+)_(\d+)_(\d+)_(all|hem)\.bmp")


def files_under(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_rgb(path: str) -> np.ndarray:
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert img is not None, f"cv2 cannot decode {path}"
    return img[..., ::-1]


def foreground(rgb: np.ndarray) -> np.ndarray:
    """The C-NMC foreground rule: gray > 8."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY) > 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("synth")
    return root, generate_dataset(root, cells=90, subjects=9, seed=3)


@pytest.fixture(scope="module")
def images(dataset) -> list[np.ndarray]:
    return [read_rgb(p) for p in dataset[1]["path"]]


def test_frame_and_layout(dataset):
    root, frame = dataset
    assert list(frame.columns) == ["path", "label", "subject", "fold"]
    assert len(frame) == 90
    assert frame["path"].tolist() == sorted(frame["path"])
    assert frame["path"].is_unique
    assert frame["fold"].dtype.kind == "i" and set(frame["fold"]) == {0}
    # Exactly the listed files are on disk.
    on_disk = {str(p) for p in root.rglob("*") if p.is_file()}
    assert on_disk == set(frame["path"])
    for row in frame.itertuples():
        path = Path(row.path)
        assert path.is_absolute()
        m = NAME_RE.fullmatch(path.name)
        assert m, path.name
        subject, _image, cell, label = m.groups()
        assert path.parent.name == label == row.label
        assert path.parent.parent.name == f"fold_{row.fold}"
        assert path.parent.parent.parent == root.resolve()
        assert subject == row.subject
        assert subject.startswith("H") == (label == "hem")
        assert 1 <= int(cell) <= 5


def test_images_are_450_rgb_bmp(dataset, images):
    _, frame = dataset
    for path, img in zip(frame["path"], images):
        assert Path(path).read_bytes()[:2] == b"BM"
        assert img.shape == (450, 450, 3) and img.dtype == np.uint8


def test_background_black_and_cell_inside(images):
    for img in images:
        fg = foreground(img)
        # Every non-black pixel is foreground (gray > 8), every other pixel is exactly 0.
        assert np.array_equal(fg, img.any(axis=2))
        # A margin along the border is empty: the cell never touches the edge.
        assert not fg[:4].any() and not fg[-4:].any() and not fg[:, :4].any() and not fg[:, -4:].any()
        # One connected cell, roughly centred.
        n, _ = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)
        assert n == 2
        ys, xs = np.nonzero(fg)
        assert 120 < ys.mean() < 330 and 120 < xs.mean() < 330
        # Dark purple stain: red and blue above green, dark overall.
        r, g, b = img[fg].mean(axis=0)
        assert r > g and b > g and 20 < r < 130


def test_class_balance_and_one_class_per_subject(dataset):
    _, frame = dataset
    counts = frame["label"].value_counts()
    assert 1.6 <= counts["all"] / counts["hem"] <= 2.5
    per_subject = frame.groupby("subject")["label"].nunique()
    assert (per_subject == 1).all()
    subject_label = frame.groupby("subject")["label"].first()
    n_all, n_hem = (subject_label == "all").sum(), (subject_label == "hem").sum()
    assert n_all + n_hem == 9 and n_hem >= 1 and 1.5 <= n_all / n_hem <= 2.5
    # Several cells per image, and no (subject, image, cell) twice.
    parsed = frame["path"].map(lambda p: NAME_RE.fullmatch(Path(p).name).groups()[:3])
    assert parsed.is_unique
    assert parsed.map(lambda t: t[:2]).value_counts().max() > 1


def test_blasts_larger_but_overlapping(dataset, images):
    _, frame = dataset
    area = np.array([foreground(img).sum() for img in images])
    is_all = (frame["label"] == "all").to_numpy()
    a, h = area[is_all], area[~is_all]
    # Size is the strongest cue (real C-NMC medians: ALL ~35.8k px, normal ~23.7k px) ...
    assert np.median(a) > 1.2 * np.median(h)
    assert 25_000 < np.median(a) < 48_000 and 15_000 < np.median(h) < 33_000
    # ... but the classes overlap.
    assert np.percentile(a, 10) < np.percentile(h, 90)


def test_deterministic_and_seed_dependent(tmp_path):
    first = generate_dataset(tmp_path / "a", cells=8, subjects=3, seed=11)
    again = generate_dataset(tmp_path / "b", cells=8, subjects=3, seed=11)
    other = generate_dataset(tmp_path / "c", cells=8, subjects=3, seed=12)
    files_a, files_b, files_c = (files_under(tmp_path / d) for d in "abc")
    assert len(files_a) == 8 and files_a == files_b
    assert [Path(p).name for p in first["path"]] == [Path(p).name for p in again["path"]]
    assert first.drop(columns="path").equals(again.drop(columns="path"))
    assert len(other) == 8
    assert set(files_a.values()).isdisjoint(files_c.values())


def test_folds_split_subjects(tmp_path):
    frame = generate_dataset(tmp_path, cells=60, subjects=6, seed=1, folds=3)
    assert sorted(frame["fold"].unique()) == [0, 1, 2]
    assert (frame.groupby("subject")["fold"].nunique() == 1).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold_0", "fold_1", "fold_2"]
    assert frame["fold"].value_counts().min() >= 5


@pytest.mark.parametrize("cells, subjects", [(4, 2), (5, 5), (7, 3)])
def test_small_valid_sizes(tmp_path, cells, subjects):
    frame = generate_dataset(tmp_path, cells=cells, subjects=subjects, seed=0)
    assert len(frame) == cells and frame["subject"].nunique() == subjects
    assert set(frame["label"]) == {"all", "hem"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cells": 3}, "cells"),
        ({"cells": 10, "subjects": 1}, "subjects"),
        ({"cells": 10, "subjects": 11}, "subjects"),
        ({"cells": 10, "subjects": 4, "folds": 0}, "folds"),
        ({"cells": 10, "subjects": 4, "folds": 5}, "folds"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        generate_dataset(out, **kwargs)
    assert not out.exists()


def test_render_cell_and_style():
    style = SubjectStyle.draw(np.random.default_rng(5))
    assert style == SubjectStyle.draw(np.random.default_rng(5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        style.scale = 2.0  # type: ignore[misc]
    img = render_cell(np.random.default_rng(1), "all", style)
    assert img.shape == (450, 450, 3) and img.dtype == np.uint8
    assert np.array_equal(img, render_cell(np.random.default_rng(1), "all", style))
    small = render_cell(np.random.default_rng(1), "hem", style, size=96)
    assert small.shape == (96, 96, 3) and not small[0].any() and not small[-1].any()
    with pytest.raises(ValueError, match="label"):
        render_cell(np.random.default_rng(1), "blast", style)


def test_subject_style_shifts_features():
    base = SubjectStyle()
    cells = {
        name: render_cell(np.random.default_rng(4), "hem", style)
        for name, style in {
            "base": base,
            "big": dataclasses.replace(base, scale=1.25),
            "bright": dataclasses.replace(base, brightness=1.3),
            "pink": dataclasses.replace(base, hue_shift=0.2),
        }.items()
    }
    fg = {k: foreground(v) for k, v in cells.items()}
    assert fg["big"].sum() > 1.35 * fg["base"].sum()
    mean = {k: cells[k][fg[k]].astype(float).mean(axis=0) for k in cells}
    assert mean["bright"].sum() > 1.2 * mean["base"].sum()
    ratio = {k: mean[k][0] / mean[k][2] for k in ("base", "pink")}  # red / blue
    assert ratio["pink"] > 1.2 * ratio["base"]


def test_workers_write_the_same_files_side_by_side(tmp_path, monkeypatch):
    """`workers` writes subjects in parallel processes; every file and row is the same."""
    import leukray.tools.synth as synth

    pools = []

    class CountingPool(synth.ProcessPoolExecutor):
        def __init__(self, max_workers, **kwargs):
            pools.append(max_workers)
            super().__init__(max_workers=max_workers, **kwargs)

    monkeypatch.setattr(synth, "ProcessPoolExecutor", CountingPool)
    one = generate_dataset(tmp_path / "one", cells=240, subjects=5, seed=3)
    two = generate_dataset(tmp_path / "two", cells=240, subjects=5, seed=3, workers=4)
    assert pools == [2]  # one process per 100 cells at most
    assert files_under(tmp_path / "one") == files_under(tmp_path / "two") and len(files_under(tmp_path / "two")) == 240
    assert [Path(p).relative_to(tmp_path / "one") for p in one["path"]] == [
        Path(p).relative_to(tmp_path / "two") for p in two["path"]
    ]
    assert one.drop(columns="path").equals(two.drop(columns="path"))
