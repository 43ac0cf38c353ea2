"""The `leukray` command: `synth`, `run`, `demo`, `extract`, `train`, `tune`, `predict`,
`screen`, `classifiers`.

`run` is `extract` -> `train` -> `tune` in one job (the trunk maps stay in Ray's object store
between extraction and training); the three can also run as separate jobs on the same run
folder, e.g. extraction on a GPU pool and the sweep on CPU nodes.

Every config field is an option (`--sweep.timeout_s 30`), derived from the dataclasses in
`leukray.config`; the common ones also have short names (`--data`, `--weights`, ...).
A user mistake (wrong path, empty folder, single class, bad config value) ends in one
line on stderr and exit code 2, never a traceback.

The top of the house: may import anything in `leukray`; the commands import their stage
lazily, so `leukray --help` starts without torch or Ray.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from leukray import __version__
from leukray.config import ScreenConfig, build_config, build_screen_config, field_types, load_yaml, sections
from leukray.errors import LeukrayError

# short option -> config key
ALIASES = {
    "data": "data.path",
    "test_data": "data.test_path",
    "weights": "extract.weights",
    "split": "split.mode",
    "classifiers": "sweep.classifiers",
    "features": "extract.features",
}
DEMO_DEFAULTS = {
    "extract.weights": "auto",
    "sweep.timeout_s": "120",
    "train.epochs": "8",  # the paper's 50 is `leukray run`'s default; the demo stays short
    "sweep.tune_trials": "8",
}


class _JoinRoots(argparse.Action):
    """A repeatable --data / --test-data: `--data A --data B` -> "A,B" (data roots are comma-separated)."""

    def __call__(self, parser, namespace, values, option_string=None):
        previous = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{previous},{values}" if previous else values)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run folder (created; outputs are written here)")
    parser.add_argument("--config", help="YAML file with config sections (overridden by options)")
    parser.add_argument(
        "--test-data", dest="test_data", action=_JoinRoots, help="separate dataset to test on, not resplit (repeatable)"
    )
    parser.add_argument("--weights", help="imagenet | imagenet:IMAGENET1K_V2 | random | auto | PATH to a state dict")
    parser.add_argument("--split", choices=["subject", "image"], help="subject (default) or image (leaks subjects)")
    parser.add_argument("--classifiers", help="all, or comma-separated names (see `leukray classifiers`)")
    parser.add_argument(
        "--features",
        help="feature sets to sweep, e.g. resnet50,cells (default) or resnet50+morphology; "
        "families: resnet50, morphology, colour, texture; cells = the three hand-crafted ones",
    )
    group = parser.add_argument_group("every config field (section.field)")
    for section, cls in sections().items():
        _add_section_options(group, section, cls, skip=set(ALIASES.values()))


def _add_section_options(group, section: str, cls: type, skip: set[str] = frozenset()) -> None:
    """`--section.field VALUE` for every field of a config section (dest `cfg:section.field`)."""
    for name, typ in field_types(cls).items():
        key = f"{section}.{name}"
        if key not in skip:
            group.add_argument(f"--{key}", dest=f"cfg:{key}", metavar=typ.__name__.upper())


def _overrides(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    values: dict[str, Any] = dict(base or {})
    for dest, value in vars(args).items():
        if value is None:
            continue
        if dest.startswith("cfg:"):
            values[dest[4:]] = value
        elif dest in ALIASES:
            values[ALIASES[dest]] = value
    values["out"] = args.out
    return values


def _config_from(args: argparse.Namespace, base: dict[str, Any] | None = None):
    yaml_values = load_yaml(args.config) if args.config else {}
    return build_config(yaml_values, _overrides(args, base))


def init_ray() -> None:
    """Connect to RAY_ADDRESS (a cluster, or inside `ray job submit`) or start a local Ray."""
    from leukray.distributed.resources import init_ray as start

    start()


def cmd_synth(args: argparse.Namespace) -> int:
    from leukray.tools.synth import generate_dataset

    frame = generate_dataset(args.out, cells=args.cells, subjects=args.subjects, seed=args.seed, folds=args.folds)
    counts = frame.groupby("label").size().to_dict()
    print(f"wrote {len(frame)} synthetic cells ({counts}) of {frame['subject'].nunique()} subjects to {args.out}")
    return 0


def cmd_run(args: argparse.Namespace, base: dict[str, Any] | None = None) -> int:
    from leukray.report.console import print_leaderboard
    from leukray.stages.run import run_pipeline

    cfg = _config_from(args, base)
    summary = run_pipeline(cfg, start_ray=init_ray)
    print_leaderboard(cfg.out, summary)
    return 0


def _stage_config(args: argparse.Namespace, stage: str, extra: dict[str, Any] | None = None):
    from leukray.io.runfolder import stage_config

    yaml_values = load_yaml(args.config) if args.config else {}
    return stage_config(args.out, stage, yaml_values, {**_overrides(args), **(extra or {})})


def cmd_extract(args: argparse.Namespace) -> int:
    from leukray.stages.extract import extract_stage

    cfg = _config_from(args)
    extracted = extract_stage(cfg, start_ray=init_ray)
    counts = extracted.record["counts"]
    print(
        f"extracted {counts['feature_rows']} feature rows ({counts['errors']} errors) "
        f"with {extracted.record['weights']['name']} "
        f"into {cfg.out}; next: `leukray train --out {cfg.out}` and/or `leukray tune --out {cfg.out}`"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from leukray.stages.run import run_train_job

    cfg = _stage_config(args, "train", {"train.enabled": "true"})
    record = run_train_job(cfg, start_ray=init_ray)
    facts = record["custom_model"]
    print(
        f"trained the custom ResNet50 for {facts['epochs']} epochs: best epoch {facts['best_epoch']}, "
        "validation balanced "
        f"accuracy {facts['best_val_balanced_accuracy']:.4f}; embeddings in {cfg.out}/custom_features.parquet; "
        f"next: `leukray tune --out {cfg.out}`"
    )
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from leukray.report.console import print_leaderboard
    from leukray.stages.run import run_tune_job

    cfg = _stage_config(args, "tune")
    summary = run_tune_job(cfg, start_ray=init_ray)
    print_leaderboard(cfg.out, summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from leukray.tools.synth import generate_dataset

    data = os.path.join(args.out, "data")
    marker = os.path.join(data, f".synth-{args.cells}-{args.subjects}-{args.seed}")
    if not os.path.exists(marker):
        print(f"[leukray] generating {args.cells} synthetic cells of {args.subjects} subjects in {data}", flush=True)
        generate_dataset(data, cells=args.cells, subjects=args.subjects, seed=args.seed)
        open(marker, "w").close()
    args.data = data
    return cmd_run(args, base=DEMO_DEFAULTS)


def cmd_predict(args: argparse.Namespace) -> int:
    from leukray.stages.predict import predict

    predict(args.model, args.data, args.out, start_ray=init_ray)
    return 0


def _screen_config(args: argparse.Namespace) -> tuple[ScreenConfig, dict[str, str]]:
    yaml_values = load_yaml(args.config) if args.config else {}
    options = {
        k[len("cfg:screen.") :]: v for k, v in vars(args).items() if k.startswith("cfg:screen.") and v is not None
    }
    places = {key: getattr(args, key) for key in ("model", "data", "out")}
    return build_screen_config(yaml_values, options, places, source=args.config)


def cmd_screen(args: argparse.Namespace) -> int:
    from leukray.stages.screen import screen

    cfg, places = _screen_config(args)
    result = screen(places["model"], places["data"], places["out"], cfg, start_ray=init_ray)
    counts = result["counts"]
    print(
        f"screened {counts['slides']} slides: {counts['cells']} leukocytes, {counts['flagged_cells']} flagged; "
        + ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("slides", "cells", "flagged_cells"))
        + f"; per-slide results in {places['out']}/slides.csv"
    )
    return 0


def cmd_classifiers(args: argparse.Namespace) -> int:
    from leukray.models.classifiers import select_classifiers

    for name in select_classifiers("all"):
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leukray", description="ALL screening of blood-cell microscopy on Ray.")
    parser.add_argument("--version", action="version", version=f"leukray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write synthetic C-NMC-style cells (the built-in default data)")
    synth.add_argument("--out", required=True, help="folder to write fold_<k>/{all,hem}/UID_*.bmp into")
    synth.add_argument("--cells", type=int, default=600)
    synth.add_argument("--subjects", type=int, default=24)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--folds", type=int, default=1)
    synth.set_defaults(func=cmd_synth)

    run = sub.add_parser("run", help="preprocess, extract ResNet50 features and sweep classifiers on Ray")
    run.add_argument(
        "--data",
        action=_JoinRoots,
        help="dataset root, URI (s3://...) or CSV manifest (path,label[,subject]); repeatable",
    )
    _add_config_options(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="synthesise cells into RUN/data, then `run` on them")
    demo.add_argument("--cells", type=int, default=600)
    demo.add_argument("--subjects", type=int, default=24)
    demo.add_argument("--seed", type=int, default=0)
    _add_config_options(demo)
    demo.set_defaults(func=cmd_demo)

    extract = sub.add_parser(
        "extract", help="the first stage of `run`: discover, split, preprocess, extract ResNet50 features"
    )
    extract.add_argument(
        "--data",
        action=_JoinRoots,
        help="dataset root, URI (s3://...) or CSV manifest (path,label[,subject]); repeatable",
    )
    _add_config_options(extract)
    extract.set_defaults(func=cmd_extract)

    train = sub.add_parser(
        "train", help="train the custom ResNet50 (Table II head) on a run folder that `extract` wrote"
    )
    _add_config_options(train)
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser(
        "tune",
        help="classifier sweeps (Tables III/IV), model choice, bundle and report on a run folder that `extract` wrote",
    )
    _add_config_options(tune)
    tune.set_defaults(func=cmd_tune)

    _add_model_commands(sub)
    return parser


def _add_model_commands(sub) -> None:
    """`predict`, `screen` and `classifiers`: the commands that apply or list models."""
    pred = sub.add_parser("predict", help="apply a model bundle (RUN/model) to new images")
    pred.add_argument("--model", required=True, help="a model bundle folder, e.g. RUN/model")
    pred.add_argument("--data", required=True, help="folder, URI or CSV manifest of images (labels optional)")
    pred.add_argument("--out", required=True, help="predictions file (.parquet)")
    pred.set_defaults(func=cmd_predict)

    scr = sub.add_parser(
        "screen", help="find leukocytes in whole smear fields and screen each cell and slide with a model bundle"
    )
    scr.add_argument("--model", help="a model bundle folder, e.g. RUN/model (or `model:` in --config)")
    scr.add_argument(
        "--data", help="folder or URI of smear-field images, searched recursively (or `data:` in --config)"
    )
    scr.add_argument("--out", help="output folder: cells.parquet, slides.csv, screen.json (or `out:` in --config)")
    scr.add_argument("--config", help="YAML with model/data/out and a `screen:` section (overridden by options)")
    _add_section_options(scr.add_argument_group("screening settings (screen.field)"), "screen", ScreenConfig)
    scr.set_defaults(func=cmd_screen)

    classifiers = sub.add_parser("classifiers", help="list the classifiers of the sweep (Lazy Predict's list)")
    classifiers.set_defaults(func=cmd_classifiers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LeukrayError as exc:
        print(f"leukray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leukray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
