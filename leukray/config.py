"""Typed configuration: frozen dataclasses, YAML overrides defaults, CLI overrides YAML.

Every field of every section is reachable from the command line as
``--<section>.<field> VALUE`` (derived from the dataclasses, so the CLI cannot drift from
the config), and the fully resolved configuration is written into every run folder as
``config.yaml``. `ScreenConfig` is `leukray screen`'s own section.

May import: yaml, `leukray.errors`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from leukray.errors import ConfigError

WEIGHT_KEYWORDS = ("imagenet", "random", "auto")
# Feature families a classifier sweep can use: the ResNet50 trunk's 2,048 features and the
# hand-crafted cell families of `leukray.ops.cellfeatures` (measured on each cell at its own
# resolution, in the preprocessing pass).
CELL_FAMILIES = ("morphology", "colour", "texture")
# `trained`: the 2,048 features of the trunk trained on the cells (train.unfreeze_stages >= 1).
TRUNK_FAMILIES = ("resnet50", "trained")
FEATURE_FAMILIES = (*TRUNK_FAMILIES, *CELL_FAMILIES)
FEATURE_ALIASES = {"cells": CELL_FAMILIES}
# train.unfreeze_stages: the 4 ResNet50 stages, and `all` (= 5) with the stem.
ALL_STAGES = 5
# Integer fields that also take a word: `--train.unfreeze_stages all`.
INT_WORDS = {"train.unfreeze_stages": {"all": ALL_STAGES}}


def parse_feature_sets(spec: str) -> list[tuple[str, ...]]:
    """`extract.features` -> the feature sets to sweep, each a tuple of families in
    FEATURE_FAMILIES order: "resnet50,cells" -> [("resnet50",), ("morphology", "colour", "texture")].

    Raises:
        ConfigError: an empty set, an unknown family or a set given twice.
    """
    sets: list[tuple[str, ...]] = []
    for part in spec.split(","):
        names: set[str] = set()
        for name in (n.strip().lower() for n in part.split("+")):
            if name in FEATURE_ALIASES:
                names.update(FEATURE_ALIASES[name])
            elif name in FEATURE_FAMILIES:
                names.add(name)
            else:
                known = ", ".join([*FEATURE_FAMILIES, *FEATURE_ALIASES])
                raise ConfigError(f"extract.features: unknown feature family {name!r} in {spec!r} (known: {known})")
        families = tuple(f for f in FEATURE_FAMILIES if f in names)
        if set(TRUNK_FAMILIES) <= names:
            raise ConfigError(
                f"extract.features: {'+'.join(families)!r} joins two trunks' features; a model carries one "
                "trunk, so sweep resnet50 and trained as separate sets (resnet50,trained)"
            )
        if families in sets:
            raise ConfigError(f"extract.features: the set {'+'.join(families)} is given twice in {spec!r}")
        sets.append(families)
    return sets


def parse_threshold_rule(spec: str) -> tuple[str, float]:
    """`sweep.threshold` -> (kind, value): `balanced` -> ("balanced", nan); `sensitivity:0.95`
    -> ("sensitivity", 0.95); `0.3` -> ("fixed", 0.3).

    Raises:
        ConfigError: anything else, or a value outside [0, 1].
    """
    text = str(spec).strip().lower()
    if text == "balanced":
        return "balanced", float("nan")
    kind, _, number = text.rpartition(":") if text.startswith("sensitivity:") else ("fixed", "", text)
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"sweep.threshold must be balanced, sensitivity:<0..1> or a number in [0, 1], got {spec!r}")
    return kind, value


def cell_families_of(sets: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The cell families any of `sets` needs, in CELL_FAMILIES order (what preprocessing measures)."""
    return tuple(f for f in CELL_FAMILIES if any(f in s for s in sets))


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from."""

    path: str = ""
    """Dataset root (local path or filesystem URI such as s3://bucket/prefix) or a CSV manifest."""
    test_path: str = ""
    """A separate dataset to evaluate on, not resplit (the C-NMC challenge protocol)."""
    layout: str = "auto"
    """auto | cnmc | folders | csv."""
    positive_label: str = "all"
    """The label scored as positive (ALL). Ignored when it is not among the labels."""
    allowed_prefixes: str = ""
    """Comma-separated folders/URI prefixes a CSV manifest may point into besides its own
    folder (e.g. s3://other-bucket/cells); anything else it lists is refused."""

    @property
    def allowed(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.allowed_prefixes.split(",") if p.strip())

    def __post_init__(self) -> None:
        check_choice("data.layout", self.layout, ("auto", "cnmc", "folders", "csv"))


@dataclass(frozen=True)
class PreprocessConfig:
    """Otsu threshold -> binary mask -> crop to the cell -> resize (the paper's step 1)."""

    size: int = 224
    """Output side in pixels (the paper: 224)."""
    min_side: int = 32
    """Images whose shorter side is below this are rejected as too small."""
    min_foreground_px: int = 50
    """A foreground (largest connected component) smaller than this counts as no foreground."""
    margin: int = 4
    """Pixels kept around the foreground bounding box."""
    keep_aspect: bool = True
    """Pad the crop to a square with black before resizing, instead of stretching it."""
    max_pixels: int = 16_000_000
    """Images whose header declares more pixels are refused before decoding (errors.csv):
    a small file can declare a huge image (a decompression bomb). Single-cell images are far
    smaller (C-NMC: 450x450)."""
    stain: str = "none"
    """Stain normalisation of each image before the crop (`leukray.ops.stain`): none |
    reinhard (Reinhard et al. 2001) | macenko (Macenko et al. 2009). Smear fields are
    normalised per field, from the stained pixels of their detected cells."""
    stain_target: str = ""
    """The colour target images are normalised toward, comma-separated numbers (reinhard: 6,
    macenko: 8); empty = fitted on the training images and stored in the bundle, so predict
    and screen normalise toward the training stain."""

    def __post_init__(self) -> None:
        check_choice("preprocess.stain", self.stain, ("none", "reinhard", "macenko"))
        if self.stain_target:
            want = {"reinhard": 6, "macenko": 8}.get(self.stain, 0)
            try:
                count = len([float(v) for v in self.stain_target.split(",")])
            except ValueError:
                count = -1
            if count != want:
                raise ConfigError(
                    f"preprocess.stain_target must be {want} comma-separated numbers for preprocess.stain "
                    f"{self.stain}, got {self.stain_target!r}"
                )
        check_at_least("preprocess.size", self.size, 16)
        check_at_least("preprocess.max_pixels", self.max_pixels, 1)
        check_at_least("preprocess.min_side", self.min_side, 1)
        check_at_least("preprocess.min_foreground_px", self.min_foreground_px, 1)
        check_at_least("preprocess.margin", self.margin, 0)


@dataclass(frozen=True)
class AugmentConfig:
    """Training-split augmentation (rotation, flips, scaling) and minority oversampling."""

    oversample: float = 1.0
    """Bring the minority class up to this fraction of the majority with augmented copies; 0 = off."""
    copies: int = 0
    """Extra augmented copies of every training image, on top of oversampling."""
    max_rotation: float = 180.0
    """Rotation angle drawn uniformly from [-max_rotation, max_rotation] degrees."""
    scale_min: float = 0.9
    """Smallest scale factor of an augmented copy."""
    scale_max: float = 1.1
    """Largest scale factor of an augmented copy."""
    flip: bool = True
    """Random horizontal and vertical flips of augmented copies."""

    def __post_init__(self) -> None:
        check_in_range("augment.oversample", self.oversample, 0.0, 10.0)
        check_at_least("augment.copies", self.copies, 0)
        check_in_range("augment.max_rotation", self.max_rotation, 0.0, 180.0)
        check_in_range("augment.scale_min", self.scale_min, 0.1, 10.0)
        check_in_range("augment.scale_max", self.scale_max, self.scale_min, 10.0)

    @property
    def enabled(self) -> bool:
        return self.oversample > 0 or self.copies > 0


@dataclass(frozen=True)
class SplitConfig:
    """How images are divided into train / validation / test."""

    mode: str = "subject"
    """subject (default: no subject on two sides) | image (the paper's split; leaks subjects)."""
    test_fraction: float = 0.2
    """Share of the data (of subjects, in subject mode) held out as the test split; unused
    with --test-data."""
    val_fraction: float = 0.15
    """Validation picks the best classifier, so the test split reports it without selection bias."""
    seed: int = 0
    """Seeds the split (and the augmentation plan), so a rerun splits the same way."""

    def __post_init__(self) -> None:
        check_choice("split.mode", self.mode, ("subject", "image"))
        check_in_range("split.test_fraction", self.test_fraction, 0.01, 0.9)
        check_in_range("split.val_fraction", self.val_fraction, 0.0, 0.9)
        if self.test_fraction + self.val_fraction >= 0.95:
            raise ConfigError(
                f"split.test_fraction + split.val_fraction must leave data to train on, got "
                f"{self.test_fraction} + {self.val_fraction}"
            )


@dataclass(frozen=True)
class ExtractConfig:
    """The ResNet50 trunk (top removed) that turns a 224x224 crop into 2,048 features."""

    weights: str = "imagenet"
    """imagenet | imagenet:IMAGENET1K_V2 | random | auto (imagenet if cached, else random) | PATH."""
    batch_size: int = 0
    """Crops per trunk forward pass in each extractor actor; 0 = auto: 256 on a GPU, 32 on a
    CPU (the size used is recorded in extract.json)."""
    actors: int = 0
    """Extractor actors (a fixed pool); 0 = one per GPU, or from one up to one per CPU on a
    CPU-only cluster."""
    use_gpu: str = "auto"
    """auto (GPU actors when the cluster has GPUs) | true | false."""
    accelerator_resource: str = ""
    """A custom Ray resource that marks accelerator nodes; when the cluster has it, each
    extractor actor asks for one unit of it (and lands on such a node)."""
    preprocess_batch_size: int = 16
    """Images per decode + Otsu-crop task."""
    seed: int = 0
    """Seeds the random trunk for --weights random, so its features are reproducible."""
    features: str = "resnet50,cells"
    """Feature sets the classifier sweep runs on, comma-separated; each set joins families
    with '+': resnet50 (the trunk's 2,048 features, the paper's Table III), trained (the
    2,048 features of the trunk trained on the cells, with train.unfreeze_stages >= 1; added
    when not named), morphology, colour, texture (hand-crafted, per cell; `cells` = all
    three). The first set is
    leaderboard.csv, the others leaderboard-<families>.csv; e.g. resnet50+cells sweeps both
    joined."""
    deterministic: bool = False
    """torch's deterministic algorithms for the trunk (the same features bit for bit on a
    GPU too, run after run; slower)."""

    def __post_init__(self) -> None:
        parse_feature_sets(self.features)
        if not self.weights:
            raise ConfigError("extract.weights is empty: use imagenet, random, auto or a file path")
        check_at_least("extract.batch_size", self.batch_size, 0)
        check_at_least("extract.actors", self.actors, 0)
        check_choice("extract.use_gpu", self.use_gpu, ("auto", "true", "false"))
        check_at_least("extract.preprocess_batch_size", self.preprocess_batch_size, 1)

    @property
    def feature_sets(self) -> list[tuple[str, ...]]:
        """`features` parsed (see `parse_feature_sets`)."""
        return parse_feature_sets(self.features)

    @property
    def cell_families(self) -> tuple[str, ...]:
        """The hand-crafted families preprocessing measures for `features`."""
        return cell_families_of(self.feature_sets)


@dataclass(frozen=True)
class SweepConfig:
    """The Lazy Predict classifier sweep, one Ray Tune trial per classifier."""

    classifiers: str = "all"
    """all, or a comma-separated list of classifier names (see `leukray classifiers`)."""
    timeout_s: float = 600.0
    """CPU-time limit per classifier fit, in CPU seconds summed over the fit's threads (whole
    seconds, at least 1); past it the classifier is recorded as timed out. CPU time, not
    wall time, so that a loaded machine does not change which classifiers finish."""
    cpus_per_trial: float = 1.0
    """CPUs Ray Tune reserves for each classifier trial."""
    seed: int = 42
    """random_state given to every classifier that takes one (Lazy Predict's default: 42)."""
    tune_trials: int = 16
    """Hyperparameter search (the paper's step 6): this many Ray Tune trials in all, drawn by
    Optuna (TPE) over the `tune_top` best classifiers with a search space, each scored by
    subject-grouped cross-validation over train+val (needs `cv_folds` >= 2); 0 = off."""
    tune_top: int = 5
    """How many of the sweeps' best classifiers (on validation) the search covers."""
    cv_folds: int = 5
    """The model is chosen by cross-validation grouped by subject (StratifiedGroupKFold) over
    the training and validation subjects, with this many folds (fewer when a class has
    fewer subjects); 0 = choose on the validation split alone. Never uses the test split."""
    cv_top: int = 5
    """How many candidates (the best on validation of every sweep and the fine-tuned one)
    are cross-validated for the choice."""
    ensemble_size: int = 3
    """A soft-voting ensemble of the best this many distinct classifiers of the CV choice
    (on one feature set) is a candidate too, chosen only if its CV balanced accuracy beats
    the best single model's; 0 or 1 = off."""
    bootstrap: int = 1000
    """Subject-bootstrap resamples for the 95% intervals of the chosen model's test
    balanced accuracy and ROC AUC; 0 = no intervals."""
    stacking: bool = True
    """A stacked ensemble of the same members as the soft vote (a logistic regression on
    their probabilities, fitted on inner subject-grouped folds) is a candidate too, scored by
    the same grouped CV and chosen only if strictly better (needs ensemble_size >= 2)."""
    threshold: str = "balanced"
    """The decision threshold on P(ALL) of a two-class model, stored in the bundle and used
    by `predict` and `screen`: `balanced` = the one maximising balanced accuracy on the
    chosen model's out-of-fold predictions of the grouped CV; `sensitivity:0.95` = the
    highest one that keeps that out-of-fold sensitivity; a number in [0, 1] = that value
    (`0.5` = the most probable class, as before)."""

    def __post_init__(self) -> None:
        check_at_least("sweep.tune_trials", self.tune_trials, 0)
        check_at_least("sweep.cv_folds", self.cv_folds, 0)
        if self.cv_folds == 1:
            raise ConfigError("sweep.cv_folds must be 0 (off) or >= 2, got 1")
        check_at_least("sweep.cv_top", self.cv_top, 1)
        check_at_least("sweep.tune_top", self.tune_top, 1)
        check_at_least("sweep.ensemble_size", self.ensemble_size, 0)
        check_at_least("sweep.bootstrap", self.bootstrap, 0)
        parse_threshold_rule(self.threshold)
        if not self.classifiers.strip():
            raise ConfigError("sweep.classifiers is empty: use 'all' or a comma-separated list")
        check_in_range("sweep.timeout_s", self.timeout_s, 0.1, 7 * 24 * 3600)
        check_in_range("sweep.cpus_per_trial", self.cpus_per_trial, 0.01, 1024)


@dataclass(frozen=True)
class TrainConfig:
    """The custom ResNet50 (the paper's Table II head) trained with Ray Train."""

    enabled: bool = True
    """Train the custom ResNet50 head (Table IV's features); false = the trunk sweep only."""
    epochs: int = 50
    """Training epochs of the head (the paper: 50)."""
    batch_size: int = 32
    """Images per training batch (the paper: 32)."""
    lr: float = 1e-3
    """Adam's learning rate for the head (Keras' default, as in the paper)."""
    dropout: float = 0.5
    """Dropout rate of the head's dense layers (the paper: 0.5)."""
    workers: int = 1
    """Data-parallel Ray Train workers (DistributedDataParallel). Each reads its own share of
    the maps' shards; the ranks take the same number of steps per epoch, so each epoch drops
    under a batch per worker plus what one worker holds beyond the others."""
    use_gpu: str = "auto"
    """auto (when the cluster has GPUs) | true | false."""
    unfreeze_stages: int = 0
    """0: the head trains on trunk maps computed once (the paper). 1-4 or all: the trunk is
    trained on the cells instead (`leukray.distributed.trunktraining`): images stream through
    it every epoch with augmentation drawn anew, the last N of its 4 stages (all: the stem
    too) are trained with a linear classifier on its pooled features, and its features are
    the `trained` family of extract.features."""
    finetune_lr: float = 1e-5
    """Learning rate of the trained trunk layers when the weights are pretrained (ImageNet
    or a file; a random-init trunk trains at train.lr)."""
    embedding: int = 256
    """Penultimate layer whose activations feed the second sweep (Table IV): 256 or 512."""
    max_failures: int = 3
    """Worker failures Ray Train recovers from (resuming from the last checkpoint)."""
    storage_path: str = ""
    """Where checkpoints go (a shared path or URI on a cluster); default RUN/train."""
    seed: int = 0
    """Seeds the head's initialisation and the batch order."""
    weight_decay: float = 0.0
    """Adam's L2 weight decay on the head (the paper: none)."""
    search_trials: int = 0
    """Ray Tune trials of a head search (`leukray.distributed.headsearch`): Optuna's TPE
    (seeded by train.seed) over learning rate, dropout and weight decay, each trial a Ray
    Train run of up to train.epochs epochs that ASHA stops early on the validation loss; the
    best trial's best epoch is the head. 0 = no search (train.lr/dropout/weight_decay)."""
    search_grace_epochs: int = 2
    """Epochs every search trial runs before ASHA may stop it (its first rung)."""
    search_reduction_factor: int = 3
    """ASHA's reduction factor: at each rung only the best 1/N of trials go on."""

    def __post_init__(self) -> None:
        check_at_least("train.epochs", self.epochs, 1)
        check_at_least("train.batch_size", self.batch_size, 2)
        check_in_range("train.lr", self.lr, 1e-8, 1.0)
        check_in_range("train.dropout", self.dropout, 0.0, 0.95)
        check_at_least("train.workers", self.workers, 1)
        check_choice("train.use_gpu", self.use_gpu, ("auto", "true", "false"))
        check_in_range("train.unfreeze_stages", self.unfreeze_stages, 0, ALL_STAGES)
        check_in_range("train.finetune_lr", self.finetune_lr, 1e-9, 1.0)
        if self.embedding not in (256, 512):
            raise ConfigError(f"train.embedding must be 256 or 512, got {self.embedding}")
        check_at_least("train.max_failures", self.max_failures, 0)
        check_in_range("train.weight_decay", self.weight_decay, 0.0, 1.0)
        self._check_search()

    def _check_search(self) -> None:
        check_at_least("train.search_trials", self.search_trials, 0)
        check_at_least("train.search_reduction_factor", self.search_reduction_factor, 2)
        if self.search_trials and not 1 <= self.search_grace_epochs < self.epochs:
            raise ConfigError(
                f"train.search_grace_epochs must be at least 1 and below train.epochs ({self.epochs}) for ASHA "
                f"to stop anything, got {self.search_grace_epochs}"
            )
        if self.search_trials and self.unfreeze_stages:
            raise ConfigError(
                "train.search_trials searches the head on trunk maps computed once; it cannot be combined "
                "with train.unfreeze_stages (the trunk trained on the cells): set one of them to 0"
            )

    @property
    def trains_trunk(self) -> bool:
        """Whether the trunk itself is trained on the cells (unfreeze_stages >= 1)."""
        return self.unfreeze_stages > 0


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking: the finished run logged to MLflow (`leukray.io.tracking`)."""

    mlflow: str = ""
    """MLflow tracking URI (http://host:5000, sqlite:///mlflow.db, file:./mlruns or a folder);
    "env" = $MLFLOW_TRACKING_URI; "" = no tracking."""
    experiment: str = "leukray"
    """MLflow experiment name the run is logged under."""

    def __post_init__(self) -> None:
        if self.mlflow.strip() == "env" and not os.environ.get("MLFLOW_TRACKING_URI", "").strip():
            raise ConfigError("tracking.mlflow is 'env' but MLFLOW_TRACKING_URI is not set")
        if self.mlflow.strip() and not self.experiment.strip():
            raise ConfigError("tracking.experiment is empty: name the MLflow experiment")


@dataclass(frozen=True)
class RunConfig:
    """Everything `leukray run` needs."""

    out: str = ""
    """The run folder (local path or URI); --out overrides it."""
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        wants_trained = any("trained" in s for s in self.extract.feature_sets)
        if wants_trained and not self.train.trains_trunk:
            raise ConfigError(
                "extract.features: `trained` is the trunk trained on the cells; it needs "
                "--train.unfreeze_stages N (1-4) or all"
            )
        if self.train.trains_trunk and not self.train.enabled:
            raise ConfigError("train.unfreeze_stages trains the trunk, but train.enabled is false")
        if self.train.trains_trunk and not wants_trained:  # what the trained trunk is for
            extract = dataclasses.replace(self.extract, features=self.extract.features + ",trained")
            object.__setattr__(self, "extract", extract)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@dataclass(frozen=True)
class ScreenConfig:
    """Leukocyte detection on smear fields, cropping, and the flagging rules."""

    red_cell_diameter_px: float = 0.0
    """Red-cell diameter in pixels of the input fields, the unit of every size below; 0 =
    estimate it per field (median inscribed diameter of the red-cell blobs). Red cells are
    the one object of nearly constant size (about 7.5 um) in every smear, so they calibrate
    magnification better than the image width does: BCCD (640x480) has ~100 px red cells,
    ALL-IDB1 at 2592x1944 ~90 px and at 1712x1368 ~65 px."""
    min_stain: int = 20
    """Floor on the Otsu threshold of the B - G stain channel (0-255): on a field without
    any nucleus Otsu splits noise, and this keeps it from inventing cells."""
    merge_distance: float = 0.35
    """Nucleus pieces closer than this (in red-cell diameters) are one cell: the lobes of a
    neutrophil are a fraction of a red cell apart, neighbouring leukocytes rarely closer."""
    split_depth: float = 0.04
    """Touching nuclei are split (watershed) where the neck between them is narrower than
    either nucleus by at least this much (in red-cell diameters, on the inscribed radius);
    0 = never split."""
    lobe_area_fraction: float = 0.6
    """Pieces smaller than this fraction of a red cell's area are lobes and are merged with
    nearby lobes; larger pieces (round blast or lymphocyte nuclei) are cells on their own."""
    min_area_fraction: float = 0.2
    """A cell's nucleus area must be at least this fraction of a red cell's area (platelets,
    2-3 um, are ~0.1)."""
    max_area_fraction: float = 10.0
    """... and at most this fraction (a large blast's nucleus is ~4-6; larger is a clump or
    stain debris)."""
    margin: float = 0.5
    """The cytoplasm ring kept around the nucleus, as a fraction of the nucleus's
    equivalent radius (C-NMC crops show the whole cell: nucleus plus cytoplasm)."""
    edge_fraction: float = 0.0
    """Drop cells whose nucleus box touches the field border and whose nucleus is smaller
    than this fraction of a red cell's area (cut-off cells); 0 = keep every border cell."""
    blast_threshold: float = -1.0
    """A cell is flagged when its prob_all >= this; -1 = the model bundle's decision
    threshold (chosen on out-of-fold predictions, see `sweep.threshold`; 0.5 for a bundle
    without one)."""
    slide_flag_fraction: float = 0.2
    """A slide is flagged when the share of its cells that are flagged is >= this."""
    min_cells: int = 1
    """A slide with fewer detected cells is reported as "insufficient cells", not negative."""
    batch_size: int = 4
    """Slides per detection batch (each yields tens of crops)."""
    max_pixels: int = 50_000_000
    """Smear fields whose header declares more pixels are refused before decoding
    (ALL-IDB1's 2592x1944 fields are 5 million); a TIFF this large is read as a whole slide,
    tile by tile, instead."""
    tile_px: int = 2048
    """Whole-slide images (SVS, NDPI, MRXS, ..., tiled or pyramidal TIFF) are cut into tiles
    of this many pixels a side at the level read; each tile is one detection unit."""
    tile_overlap: float = 3.0
    """Tiles overlap by this many red-cell diameters on every side (a leukocyte is 1.5-3
    across), so every cell lies whole in some tile; a cell is kept only by the tile whose
    core holds its nucleus centre, so none is counted twice."""
    target_mpp: float = 0.25
    """Whole slides are read at the coarsest pyramid level at least this fine (microns per
    pixel, from the file's resolution metadata; a 40x scan is ~0.25); 0 = level 0."""
    level: int = -1
    """The pyramid level to read whole slides at (0 = full resolution), overriding
    target_mpp; -1 = choose by target_mpp (level 0 when the file has no resolution)."""
    part_slides: int = 16
    """Finished slides per result part (OUT/parts/*.parquet, each written atomically); a
    rerun into the same --out skips the slides of finished parts. A part is also written
    once a minute, so an interrupted screen loses at most about a minute of work."""
    report_cells: int = 24
    """The most suspicious cells (highest prob_all) shown per slide in report.html."""
    thumbnail_px: int = 640
    """Longer side, in pixels, of the field thumbnails in report.html."""

    def __post_init__(self) -> None:
        check_at_least("screen.red_cell_diameter_px", self.red_cell_diameter_px, 0.0)
        if 0 < self.red_cell_diameter_px < 4:
            raise ConfigError(
                f"screen.red_cell_diameter_px must be 0 (estimate) or >= 4, got {self.red_cell_diameter_px}"
            )
        check_in_range("screen.min_stain", self.min_stain, 0, 254)
        check_in_range("screen.merge_distance", self.merge_distance, 0.0, 5.0)
        check_in_range("screen.split_depth", self.split_depth, 0.0, 5.0)
        check_in_range("screen.lobe_area_fraction", self.lobe_area_fraction, 0.0, 100.0)
        check_in_range("screen.min_area_fraction", self.min_area_fraction, 0.0, 100.0)
        check_in_range(
            "screen.max_area_fraction",
            self.max_area_fraction,
            self.min_area_fraction,
            1000.0,
        )
        check_in_range("screen.margin", self.margin, 0.0, 5.0)
        check_in_range("screen.edge_fraction", self.edge_fraction, 0.0, 1000.0)
        if self.blast_threshold != -1.0:
            check_in_range("screen.blast_threshold", self.blast_threshold, 0.0, 1.0)
        check_in_range("screen.slide_flag_fraction", self.slide_flag_fraction, 0.0, 1.0)
        check_at_least("screen.min_cells", self.min_cells, 0)
        check_at_least("screen.batch_size", self.batch_size, 1)
        check_at_least("screen.max_pixels", self.max_pixels, 1)
        check_at_least("screen.tile_px", self.tile_px, 64)
        check_in_range("screen.tile_overlap", self.tile_overlap, 1.0, 50.0)
        check_at_least("screen.target_mpp", self.target_mpp, 0.0)
        check_at_least("screen.level", self.level, -1)
        check_at_least("screen.part_slides", self.part_slides, 1)
        check_at_least("screen.report_cells", self.report_cells, 0)
        check_in_range("screen.thumbnail_px", self.thumbnail_px, 32, 4096)

    def cell_threshold(self, bundle_threshold: float | None = None) -> float:
        """The prob_all at which a cell is flagged: `blast_threshold` when set, else the
        bundle's decision threshold, else 0.5."""
        if self.blast_threshold >= 0:
            return self.blast_threshold
        return 0.5 if bundle_threshold is None else float(bundle_threshold)


@dataclass(frozen=True)
class SmearTrainConfig:
    """`leukray smear-train`: a cell classifier for the smear domain, trained on cells cut out
    of annotated smear fields exactly as `leukray screen` cuts them."""

    features: str = "cells"
    """The cell feature families the classifier reads ('+'-joined: morphology, colour,
    texture; cells = the three)."""
    classifier: str = "logistic"
    """logistic (standardised logistic regression) | random_forest; both class-balanced."""
    cv_folds: int = 0
    """Leave-slides-out cross-validation folds (groups = slides); 0 = leave one slide out."""
    seed: int = 0
    stain_sample: int = 16
    """Fields (a seeded sample) whose detected cells the stain target is fitted on, when
    preprocess.stain is set and preprocess.stain_target is empty."""

    def __post_init__(self) -> None:
        (families,) = parse_feature_sets(self.features)
        if "resnet50" in families or "trained" in families:
            raise ConfigError(
                "smear.features: the smear classifier reads cell features only (morphology, colour, texture)"
            )
        check_choice("smear.classifier", self.classifier, ("logistic", "random_forest"))
        check_at_least("smear.cv_folds", self.cv_folds, 0)
        if self.cv_folds == 1:
            raise ConfigError("smear.cv_folds must be 0 (leave one slide out) or >= 2, got 1")
        check_at_least("smear.stain_sample", self.stain_sample, 1)

    @property
    def cell_families(self) -> tuple[str, ...]:
        return parse_feature_sets(self.features)[0]


# -- building a config from defaults, a YAML file and command-line overrides -------------


def sections() -> dict[str, type]:
    """Section name -> dataclass, in RunConfig order."""
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])}


def field_types(section_cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def parse_value(key: str, raw: Any, typ: type) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {raw!r}")
    if typ is int and str(raw).strip().lower() in INT_WORDS.get(key, {}):
        return INT_WORDS[key][str(raw).strip().lower()]
    if typ in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(f"{key} must be a number, got {raw!r}")
        try:
            value = typ(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {'an integer' if typ is int else 'a number'}, got {raw!r}") from None
        if typ is int and isinstance(raw, float) and raw != int(raw):
            raise ConfigError(f"{key} must be an integer, got {raw!r}")
        return value
    if typ is str:
        if isinstance(raw, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {raw!r}")
        return "" if raw is None else str(raw)
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover - guards new fields


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    return load_yaml_text(text, path)


def load_yaml_text(text: str, path: str | os.PathLike) -> dict[str, Any]:
    """Parse a config mapping; `path` only names it in errors."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def build_config(
    yaml_values: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Defaults <- YAML mapping <- dotted overrides (``{"sweep.timeout_s": "30"}``).

    Raises:
        ConfigError: an unknown section or key, or a value of the wrong type or range.
    """
    secs = sections()
    values: dict[str, dict[str, Any]] = {name: {} for name in secs}
    top: dict[str, Any] = {}

    def put(key: str, raw: Any) -> None:
        if "." not in key:
            if key == "out":
                top["out"] = parse_value(key, raw, str)
                return
            if key in secs:
                raise ConfigError(f"config section '{key}' must be a mapping, got {raw!r}")
            raise ConfigError(f"unknown config key '{key}' (sections: out, {', '.join(secs)})")
        section, name = key.split(".", 1)
        if section not in secs:
            raise ConfigError(f"unknown config section '{section}' in '{key}' (sections: {', '.join(secs)})")
        values[section][name] = parse_field(section, secs[section], name, raw)

    for section, body in (yaml_values or {}).items():
        if isinstance(body, dict):
            if section not in secs:
                raise ConfigError(f"unknown config section '{section}' (sections: out, {', '.join(secs)})")
            for name, raw in body.items():
                put(f"{section}.{name}", raw)
        else:
            put(section, body)
    for key, raw in (overrides or {}).items():
        put(key, raw)

    try:
        built = {name: cls(**values[name]) for name, cls in secs.items()}
    except TypeError as exc:  # pragma: no cover - put() already rejects unknown keys
        raise ConfigError(str(exc)) from None
    return RunConfig(**top, **built)


def parse_field(section: str, cls: type, name: str, raw: Any) -> Any:
    """One field of a section (a frozen dataclass) from a raw YAML / command-line value.

    Raises:
        ConfigError: an unknown key, or a value of the wrong type.
    """
    types = field_types(cls)
    if name not in types:
        raise ConfigError(f"unknown config key '{section}.{name}' (known in {section}: {', '.join(types)})")
    return parse_value(f"{section}.{name}", raw, types[name])


def build_section(name: str, cls: type, values: Mapping[str, Any]) -> Any:
    """One config section from raw values (`leukray screen`'s `screen` section).

    Raises:
        ConfigError: an unknown key, or a value of the wrong type or range.
    """
    return cls(**{key: parse_field(name, cls, key, raw) for key, raw in values.items()})


SCREEN_TOP_KEYS = ("model", "data", "out")


def build_screen_config(
    yaml_values: Mapping[str, Any],
    options: Mapping[str, Any],
    places: Mapping[str, str | None],
    source: str | None = None,
) -> tuple[ScreenConfig, dict[str, str]]:
    """`leukray screen`'s ScreenConfig and (model, data, out) from a YAML file's `screen`
    section and top-level `model`/`data`/`out` keys, overridden by the options.

    Args:
        yaml_values: the YAML file's content ({} without one).
        options: `screen.*` options given on the command line (field -> raw value).
        places: model, data, out as given on the command line (None when not given).
        source: the YAML file's name, for messages.

    Raises:
        ConfigError: an unknown key or value, or no model/data/out anywhere.
    """
    unknown = sorted(set(yaml_values) - {"screen", *SCREEN_TOP_KEYS})
    if unknown:
        raise ConfigError(
            f"config file {source}: `leukray screen` reads model, data, out and a screen section; "
            f"unknown: {', '.join(unknown)}"
        )
    section = yaml_values.get("screen") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"config section 'screen' must be a mapping, got {section!r}")
    resolved = {}
    for key in SCREEN_TOP_KEYS:
        resolved[key] = places.get(key) or str(yaml_values.get(key) or "")
        if not resolved[key]:
            raise ConfigError(f"no {key}: pass --{key} or set `{key}:` in the config file")
    return build_section("screen", ScreenConfig, {**section, **options}), resolved


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ConfigError naming `key` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def check_at_least(key: str, value: float, low: float) -> None:
    """Raise ConfigError naming `key` unless `value` >= `low`."""
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


def check_in_range(key: str, value: float, low: float, high: float) -> None:
    """Raise ConfigError naming `key` unless `low` <= `value` <= `high`."""
    if not low <= value <= high:
        raise ConfigError(f"{key} must be between {low} and {high}, got {value}")
