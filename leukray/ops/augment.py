"""Training-split augmentation (the paper's step 2): rotation, flips and scaling, seeded.

Also decides how many augmented copies each training image gets so that the minority
class is oversampled towards the majority.
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pandas as pd

from leukray.config import AugmentConfig


def augmentation_rng(seed: int, content_hash: str, copy_index: int) -> np.random.Generator:
    """A generator that depends only on (seed, the image's content hash, copy index): the
    same run produces the same augmented copies on any worker, in any order, and the same
    images copied to another folder or bucket get the same copies (a path would not)."""
    digest = hashlib.sha256(f"{seed}\0{content_hash}\0{copy_index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def epoch_augmentation_rng(seed: int, content_hash: str, draw: int, epoch: int) -> np.random.Generator:
    """The generator of one image's augmentation in one epoch of training the trunk: a
    function of (seed, content hash, draw, epoch) only, so every epoch sees new rotations,
    scales and flips, and a resumed run draws the ones the uninterrupted run drew."""
    digest = hashlib.sha256(f"{seed}\0{content_hash}\0{draw}\0epoch {epoch}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def augment_epoch(
    images: np.ndarray, content_hashes: np.ndarray, draws: np.ndarray, seed: int, epoch: int, cfg: AugmentConfig
) -> np.ndarray:
    """A batch of training crops augmented afresh for `epoch` (`augment_image` each, seeded
    by `epoch_augmentation_rng`).

    Args:
        images: N x H x W x 3 uint8 crops.
        content_hashes: N sha256 strings (the images' content).
        draws: N ints: which of an oversampled image's draws a row is (0 for the original).

    Returns:
        N x H x W x 3 uint8.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected NxHxWx3 uint8, got {images.shape} {images.dtype}")
    out = np.empty_like(images)
    for i, (image, content_hash, draw) in enumerate(zip(images, content_hashes, draws)):
        out[i] = augment_image(image, epoch_augmentation_rng(seed, str(content_hash), int(draw), epoch), cfg)
    return out


def augment_image(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Rotate about the centre, scale, and maybe flip an HxWx3 uint8 crop; the corners
    revealed by rotation are black, like the C-NMC background.

    Returns:
        An array of the same shape and dtype.
    """
    h, w = image.shape[:2]
    angle = float(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    scale = float(rng.uniform(cfg.scale_min, cfg.scale_max))
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, scale)
    out = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if cfg.flip:
        if rng.random() < 0.5:
            out = out[:, ::-1]
        if rng.random() < 0.5:
            out = out[::-1, :]
    return np.ascontiguousarray(out)


def plan_copies(train: pd.DataFrame, cfg: AugmentConfig, seed: int) -> pd.Series:
    """Number of augmented copies per training image (index-aligned with `train`).

    Every image gets `cfg.copies`; each class below `cfg.oversample` x the largest class
    then gets extra copies, spread as evenly as possible over its images (which images get
    one more is drawn with `seed`), until it reaches that target.

    Args:
        train: the training rows, with a `label` column.

    Returns:
        int64 Series named `n_aug`.
    """
    n_aug = pd.Series(cfg.copies, index=train.index, dtype=np.int64, name="n_aug")
    if cfg.oversample <= 0 or train.empty:
        return n_aug
    counts = train["label"].value_counts()
    per_image = 1 + cfg.copies
    target = int(round(cfg.oversample * counts.max() * per_image))
    rng = np.random.default_rng(seed)
    for label, count in counts.sort_index().items():
        have = count * per_image
        extra = target - have
        if extra <= 0:
            continue
        of_label = train[train["label"] == label]
        if "sha256" in of_label:  # by content: the same images in another folder get the same extras
            of_label = of_label.sort_values("sha256", kind="stable")
        idx = of_label.index.to_numpy()
        base, rest = divmod(extra, count)
        n_aug.loc[idx] += base
        if rest:
            n_aug.loc[rng.choice(idx, size=rest, replace=False)] += 1
    return n_aug
