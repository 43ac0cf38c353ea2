"""The `leukray` command: `synth`, `run`, `demo`, `extract`, `train`, `tune`, `predict`,
`screen`, `smear-train`, `classifiers`, `track`, `config show`, `runs`, `report`.

`run` is `extract` -> `train` -> `tune` in one job (the trunk maps are written as shards under
RUN/maps between extraction and training, `leukray.io.mapshards`); the three can also run as
separate jobs on the same run folder, e.g. extraction on a GPU pool and the sweep on CPU nodes.

Every config field is an option (`--sweep.timeout_s 30`), derived from the dataclasses in
`leukray.config`, with its help taken from the field's docstring; the common ones also have
short names (`--data`, `--weights`, ...).

The automation contract (README: "Automation"): a problem the user can fix ends in one line
on stderr and an exit code that says whose it is (`leukray.errors`: 2 user mistake, 3 bad
data, 4 weights, 5 cluster); `--quiet` prints only errors and the final line; `--json` prints
JSON lines on stdout (stage events and a final `summary` object) and the human text on
stderr; `--address` / `--num-cpus` attach to a cluster or bound the local Ray.

The top of the house: may import anything in `leukray`; the commands import their stage
lazily, so `leukray --help` starts without torch or Ray.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import sys
import textwrap
import time
from typing import Any, Callable, Iterator, Sequence

from leukray import __version__
from leukray.config import (
    RunConfig,
    ScreenConfig,
    build_config,
    build_screen_config,
    field_types,
    load_yaml,
    sections,
)
from leukray.errors import EXIT_CLUSTER, ConfigError, InputNotFoundError, LeukrayError, exit_code_of
from leukray.io import storage

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


# -- help from the config's field docstrings ----------------------------------------------


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring (the string literal right below the field in
    the class body), whitespace-collapsed; {} when the source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # e.g. frozen into a zip without sources
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def field_default(cls: type, name: str) -> Any:
    """The default of a config field (dataclass default or default_factory)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None


def field_help(cls: type, name: str, default: Any = dataclasses.MISSING) -> str:
    """`--section.field`'s help: the field's meaning and its default."""
    if default is dataclasses.MISSING:
        default = field_default(cls, name)
    shown = '""' if default == "" else str(default).lower() if isinstance(default, bool) else default
    doc = field_docs(cls).get(name, "")
    return f"{doc} (default: {shown})".strip().replace("%", "%%")


def _key_help(key: str, defaults: dict[str, Any]) -> str:
    """The help of a config key (`sweep.timeout_s`), with a command's own default if it has one."""
    section, name = key.split(".", 1)
    return field_help(sections()[section], name, defaults.get(key, dataclasses.MISSING))


def _add_config_options(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    defaults = defaults or {}
    parser.add_argument("--out", help="run folder, created; outputs are written here (or `out:` in --config)")
    parser.add_argument("--config", help="YAML file with config sections and `out:` (overridden by options)")
    parser.add_argument(
        "--test-data",
        dest="test_data",
        action=_JoinRoots,
        help=_key_help(ALIASES["test_data"], defaults) + "; repeatable",
    )
    for option in ("weights", "classifiers", "features"):
        parser.add_argument(f"--{option}", help=_key_help(ALIASES[option], defaults))
    parser.add_argument("--split", choices=["subject", "image"], help=_key_help(ALIASES["split"], defaults))
    group = parser.add_argument_group("every config field (section.field; YAML: section: {field: value})")
    for section, cls in sections().items():
        _add_section_options(group, section, cls, skip=set(ALIASES.values()), defaults=defaults)


def _add_section_options(
    group, section: str, cls: type, skip: set[str] = frozenset(), defaults: dict[str, Any] | None = None
) -> None:
    """`--section.field VALUE` for every field of a config section (dest `cfg:section.field`)."""
    for name, typ in field_types(cls).items():
        key = f"{section}.{name}"
        if key not in skip:
            help_text = field_help(cls, name, (defaults or {}).get(key, dataclasses.MISSING))
            group.add_argument(f"--{key}", dest=f"cfg:{key}", metavar=typ.__name__.upper(), help=help_text)


def _overrides(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    values: dict[str, Any] = dict(base or {})
    for dest, value in vars(args).items():
        if value is None:
            continue
        if dest.startswith("cfg:"):
            values[dest[4:]] = value
        elif dest in ALIASES:
            values[ALIASES[dest]] = value
    if getattr(args, "out", None):  # else the YAML's `out:`
        values["out"] = args.out
    return values


def _yaml_of(args: argparse.Namespace) -> dict[str, Any]:
    return load_yaml(args.config) if getattr(args, "config", None) else {}


def _add_existing_options(parser: argparse.ArgumentParser) -> None:
    """What `run`/`extract` do with an earlier run in --out (default: refuse one of other data or settings)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="start --out again, deleting its earlier run")
    group.add_argument("--resume", action="store_true", help="reuse the stages in --out whose identity matches")


def _existing(args: argparse.Namespace) -> str:
    return (
        "overwrite" if getattr(args, "overwrite", False) else "resume" if getattr(args, "resume", False) else "refuse"
    )


def _config_from(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    return build_config(_yaml_of(args), _overrides(args, base))


def _run_folder(args: argparse.Namespace) -> str:
    """--out, else the YAML's `out:`."""
    out = args.out or str(_yaml_of(args).get("out") or "")
    if not out:
        raise ConfigError("no output folder: pass --out RUN or set `out:` in the --config file")
    return out


def _exists(path: str) -> bool:
    try:
        return storage.exists(path)
    except Exception:  # noqa: BLE001 - a store we cannot ask now (credentials, network): the stage will say
        return True


def _check_inputs(cfg: RunConfig, need_out: bool = True) -> None:
    """The user's paths, checked before weights, Ray or anything slow (exit code 2)."""
    if need_out and not cfg.out:
        raise ConfigError("no output folder: pass --out RUN or set `out:` in the --config file")
    if not cfg.data.path:
        raise ConfigError("no data given: pass --data DIR (or a CSV manifest), or set data.path in --config")
    from leukray.data.discovery import split_roots  # --data may be repeated (folds): "A,B"

    for root in split_roots(cfg.data.path):
        if not _exists(root):
            raise InputNotFoundError(f"data path not found: {root}")
    for root in split_roots(cfg.data.test_path) if cfg.data.test_path else []:
        if not _exists(root):
            raise InputNotFoundError(f"test data path not found: {root}")


# -- output modes: text, --quiet, --json ---------------------------------------------------


class Output:
    """Where a command's results go. Text: as printed; quiet: only the final line (errors
    go to stderr in every mode); json: one JSON object per line on stdout, `summary` last."""

    def __init__(self, mode: str, stdout: Any):
        self.mode = mode
        self.stdout = stdout

    def event(self, name: str, **fields: Any) -> None:
        if self.mode == "json":
            record = {"event": name, "time": round(time.time(), 3), **fields}
            print(json.dumps(record, default=str), file=self.stdout, flush=True)

    def stage(self, stage: str, phase: str, **facts: Any) -> None:
        """A stage starts or ends (`leukray.stages.run`'s `on_stage`)."""
        self.event(f"stage_{phase}", stage=stage, **facts)

    def final(self, line: str, **summary: Any) -> None:
        if self.mode == "json":
            self.event("summary", status="ok", exit_code=0, message=line, **summary)
        else:
            print(line, file=self.stdout, flush=True)


@functools.lru_cache(maxsize=1)
def _devnull() -> Any:
    return open(os.devnull, "w")  # kept open: loggers created while quiet hold on to it


@contextlib.contextmanager
def _human_text(mode: str) -> Iterator[None]:
    """Human text (prints, logs, Ray's worker output) to stdout, stderr (json) or nowhere (quiet)."""
    if mode == "text":
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(sys.stderr if mode == "json" else _devnull()))
        if mode == "quiet":
            stack.enter_context(contextlib.redirect_stderr(_devnull()))
        yield


def _ray_starter(args: argparse.Namespace, out: Output) -> Callable[[], None]:
    """The `start_ray` the stages call once the inputs are checked."""
    if getattr(args, "num_cpus", None) is not None and getattr(args, "address", None):
        raise ConfigError("--num-cpus bounds a local Ray; with --address the cluster decides its CPUs")

    def start() -> None:
        from leukray.distributed.resources import init_ray

        address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS") or "local"
        num_cpus = getattr(args, "num_cpus", None)
        out.event("ray_start", address=address, num_cpus=num_cpus)
        init_ray(address=getattr(args, "address", None) or "", num_cpus=num_cpus)

    return start


# -- the commands ------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace, out: Output) -> int:
    from leukray.tools.synth import generate_dataset

    try:
        frame = generate_dataset(
            args.out, cells=args.cells, subjects=args.subjects, seed=args.seed, folds=args.folds, workers=args.workers
        )
    except ValueError as exc:  # a count that cannot make a data set: the user's to fix
        raise ConfigError(f"synth: {exc}") from None
    counts = frame.groupby("label").size().to_dict()
    out.final(
        f"wrote {len(frame)} synthetic cells ({counts}) of {frame['subject'].nunique()} subjects to {args.out}",
        out=args.out,
        counts={str(k): int(v) for k, v in counts.items()},
    )
    return 0


def _run_result(run_dir: str, summary: dict[str, Any]) -> dict[str, Any]:
    """What --json's summary says about a finished run."""
    from leukray.report.console import existing_outputs

    chosen = summary.get("chosen_model") or summary.get("best_model") or {}
    return {
        "out": run_dir,
        "weights": summary["weights"]["name"],
        "pretrained": summary["weights"]["is_pretrained"],
        "chosen_model": {k: chosen.get(k) for k in ("name", "feature_source", "chosen_by", "test")},
        "counts": summary["counts"],
        "files": existing_outputs(run_dir),
    }


def cmd_run(args: argparse.Namespace, out: Output, base: dict[str, Any] | None = None) -> int:
    cfg = _config_from(args, base)
    _check_inputs(cfg)  # before the stages' imports (torch, Ray): a mistake is reported at once
    from leukray.report.console import final_line, print_leaderboard
    from leukray.stages.run import run_pipeline

    summary = run_pipeline(cfg, start_ray=_ray_starter(args, out), on_stage=out.stage, existing=_existing(args))
    print_leaderboard(cfg.out, summary)
    out.final(final_line(cfg.out, summary), **_run_result(cfg.out, summary))
    return 0


def _stage_config(args: argparse.Namespace, stage: str, extra: dict[str, Any] | None = None) -> RunConfig:
    from leukray.io.runfolder import CONFIG_FILE, stage_config

    run = _run_folder(args)
    if not _exists(storage.join(run, CONFIG_FILE)):
        raise InputNotFoundError(
            f"{storage.join(run, CONFIG_FILE)} not found: `leukray {stage}` needs a run folder that "
            f"`leukray extract` wrote (run `leukray extract --out {run}` first)"
        )
    return stage_config(run, stage, _yaml_of(args), {**_overrides(args), **(extra or {})})


@contextlib.contextmanager
def _stage(out: Output, stage: str) -> Iterator[None]:
    tick = time.perf_counter()
    out.stage(stage, "start")
    yield
    out.stage(stage, "end", seconds=round(time.perf_counter() - tick, 2))


def cmd_extract(args: argparse.Namespace, out: Output) -> int:
    cfg = _config_from(args)
    _check_inputs(cfg)
    from leukray.stages.extract import extract_stage

    with _stage(out, "extract"):
        extracted = extract_stage(cfg, start_ray=_ray_starter(args, out), existing=_existing(args))
    counts = extracted.record["counts"]
    out.final(
        f"extracted {counts['feature_rows']} feature rows ({counts['errors']} errors) "
        f"with {extracted.record['weights']['name']} "
        f"into {cfg.out}; next: `leukray train --out {cfg.out}` and/or `leukray tune --out {cfg.out}`",
        out=cfg.out,
        weights=extracted.record["weights"]["name"],
        counts=counts,
    )
    return 0


def cmd_train(args: argparse.Namespace, out: Output) -> int:
    from leukray.stages.run import run_train_job

    cfg = _stage_config(args, "train", {"train.enabled": "true"})
    with _stage(out, "train"):
        record = run_train_job(cfg, start_ray=_ray_starter(args, out))
    if "trained_trunk" in record:
        facts = record["trained_trunk"]
        out.final(
            f"trained the ResNet50 on the cells ({facts['trained_layers']}) for {facts['epochs']} epochs: best epoch "
            f"{facts['best_epoch']}, validation balanced accuracy {facts['best_val_balanced_accuracy']:.4f}; its "
            f"features in {cfg.out}/trained_features.parquet; next: `leukray tune --out {cfg.out}`",
            out=cfg.out,
            trained_trunk=facts,
        )
        return 0
    facts = record["custom_model"]
    out.final(
        f"trained the custom ResNet50 for {facts['epochs']} epochs: best epoch {facts['best_epoch']}, "
        "validation balanced "
        f"accuracy {facts['best_val_balanced_accuracy']:.4f}; embeddings in {cfg.out}/custom_features.parquet; "
        f"next: `leukray tune --out {cfg.out}`",
        out=cfg.out,
        custom_model=facts,
    )
    return 0


def cmd_tune(args: argparse.Namespace, out: Output) -> int:
    from leukray.report.console import final_line, print_leaderboard
    from leukray.stages.run import run_tune_job

    cfg = _stage_config(args, "tune")
    with _stage(out, "tune"):
        summary = run_tune_job(cfg, start_ray=_ray_starter(args, out))
    print_leaderboard(cfg.out, summary)
    out.final(final_line(cfg.out, summary), **_run_result(cfg.out, summary))
    return 0


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    from leukray.tools.synth import generate_dataset

    args.out = _run_folder(args)
    data = os.path.join(args.out, "data")
    marker = os.path.join(data, f".synth-{args.cells}-{args.subjects}-{args.seed}")
    if not os.path.exists(marker):
        print(f"[leukray] generating {args.cells} synthetic cells of {args.subjects} subjects in {data}", flush=True)
        generate_dataset(data, cells=args.cells, subjects=args.subjects, seed=args.seed, workers=os.cpu_count() or 1)
        open(marker, "w").close()
    args.data = data
    return cmd_run(args, out, base=DEMO_DEFAULTS)


def cmd_predict(args: argparse.Namespace, out: Output) -> int:
    from leukray.stages.predict import predict

    if not _exists(args.data):
        raise InputNotFoundError(f"data path not found: {args.data}")
    with _stage(out, "predict"):
        counts = predict(args.model, args.data, args.out, start_ray=_ray_starter(args, out))
    out.final(
        f"predicted {counts['predicted']} of {counts['images']} images ({counts['errors']} errors) into {args.out}",
        out=args.out,
        counts=counts,
    )
    return 0


def _screen_config(args: argparse.Namespace) -> tuple[ScreenConfig, dict[str, str]]:
    yaml_values = load_yaml(args.config) if args.config else {}
    options = {
        k[len("cfg:screen.") :]: v for k, v in vars(args).items() if k.startswith("cfg:screen.") and v is not None
    }
    places = {key: getattr(args, key) for key in ("model", "data", "out")}
    return build_screen_config(yaml_values, options, places, source=args.config)


def cmd_screen(args: argparse.Namespace, out: Output) -> int:
    from leukray.stages.screen import screen

    cfg, places = _screen_config(args)
    if not _exists(places["data"]):
        raise InputNotFoundError(f"data path not found: {places['data']}")
    with _stage(out, "screen"):
        result = screen(
            places["model"], places["data"], places["out"], cfg, _ray_starter(args, out), existing=_existing(args)
        )
    counts = result["counts"]
    out.final(
        f"screened {counts['slides']} slides: {counts['cells']} leukocytes, {counts['flagged_cells']} flagged; "
        + ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("slides", "cells", "flagged_cells"))
        + f"; per-slide results in {places['out']}/slides.csv, review in {places['out']}/report.html",
        out=places["out"],
        counts=counts,
    )
    return 0


def cmd_smear_train(args: argparse.Namespace, out: Output) -> int:
    from leukray.config import PreprocessConfig, SmearTrainConfig, build_section
    from leukray.stages.smeartrain import smear_train

    def section(name: str, cls: type):
        prefix = f"cfg:{name}."
        values = {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}
        return build_section(name, cls, values)

    result = smear_train(
        args.fields,
        args.annotations,
        args.out,
        section("smear", SmearTrainConfig),
        section("screen", ScreenConfig),
        section("preprocess", PreprocessConfig),
        start_ray=_ray_starter(args, out),
    )
    scores = result["metrics"]["all"]
    out.final(
        f"smear-train: {result['counts']['cells']} cells ({result['counts']['blast_cells']} blasts) from "
        f"{result['counts']['fields']} fields; leave-slides-out cell AUROC {scores['cell_auroc']:.3f}, slide AUROC "
        f"{scores['slide_auroc_mean_prob']:.3f} ({scores['slides']} slides); bundle in {result['model']}",
        model=result["model"],
        metrics=result["metrics"],
    )
    return 0


def _add_smear_train(sub, parents: list[argparse.ArgumentParser]) -> None:
    from leukray.config import PreprocessConfig, SmearTrainConfig

    smear = sub.add_parser(
        "smear-train",
        parents=parents,
        help="train a cell classifier on annotated smear fields, cut as `screen` cuts them",
    )
    smear.add_argument("--fields", required=True, help="folder or URI of smear-field images (searched recursively)")
    smear.add_argument(
        "--annotations",
        required=True,
        nargs="+",
        help="folders or files of annotations: ALL-IDB .xyc blast centres, Pascal-VOC .xml (WBC boxes), "
        "slide,x,y,label .csv; matched to fields by file name",
    )
    smear.add_argument(
        "--out", required=True, help="output folder: model/, cells.parquet, slides.csv, smear_train.json"
    )
    _add_section_options(smear.add_argument_group("classifier (smear.field)"), "smear", SmearTrainConfig)
    _add_section_options(smear.add_argument_group("detection (screen.field)"), "screen", ScreenConfig)
    _add_section_options(smear.add_argument_group("preprocessing (preprocess.field)"), "preprocess", PreprocessConfig)
    smear.set_defaults(func=cmd_smear_train)


def cmd_classifiers(args: argparse.Namespace, out: Output) -> int:
    from leukray.models.classifiers import select_classifiers

    names = select_classifiers("all")
    out.final("\n".join(names), classifiers=names)  # one name a line: the list is the result
    return 0


def cmd_config_show(args: argparse.Namespace, out: Output) -> int:
    from leukray.stages.plan import describe_outputs, describe_weights, plan_data

    cfg = _config_from(args)
    _check_inputs(cfg, need_out=False)
    print("# resolved configuration (written as RUN/config.yaml)")
    print(cfg.to_yaml())
    plan = plan_data(cfg)
    print(plan["text"])
    weights = describe_weights(cfg.extract.weights, cfg.extract.seed)
    print(f"\n# weights\n{weights['text']}")
    outputs = describe_outputs(cfg)
    print(f"\n# outputs\n{outputs['text']}")
    counts = plan["counts"]
    out.final(
        f"would read {counts['usable']} images ({counts['skipped']} skipped) with {weights['name']} "
        f"into {cfg.out or '(no --out yet)'}; nothing was run",
        config=cfg.to_dict(),
        data={k: v for k, v in plan.items() if k != "text"},
        weights={k: v for k, v in weights.items() if k != "text"},
        outputs={k: v for k, v in outputs.items() if k != "text"},
    )
    return 0


def cmd_track(args: argparse.Namespace, out: Output) -> int:
    from leukray.io import tracking

    uri = tracking.resolve_uri(args.mlflow)
    if not uri:
        raise ConfigError("leukray track: give --mlflow URI (or 'env' for $MLFLOW_TRACKING_URI)")
    summary_path = storage.join(args.run, "summary.json")
    if not _exists(summary_path):  # the wrong folder: a user mistake (exit 2), not bad data
        raise InputNotFoundError(f"{summary_path} not found: only a finished run (its tune stage done) can be tracked")
    with _stage(out, "track"):
        logged = tracking.log_run_folder(args.run, uri, args.experiment)
    out.final(
        f"logged {args.run} to MLflow {uri}: run {logged['run_id']} in experiment {args.experiment!r}, "
        f"{logged['sweep_runs']} sweep and {logged['tuning_runs']} tuning runs, {len(logged['artifacts'])} artifacts",
        run_id=logged["run_id"],
        tracking_uri=uri,
    )
    return 0


def cmd_runs(args: argparse.Namespace, out: Output) -> int:
    from leukray.report.runs import format_runs, list_runs

    if not _exists(args.dir):
        raise InputNotFoundError(f"folder not found: {args.dir}")
    runs = list_runs(args.dir)
    for run in runs:
        out.event("run", **run)
    if runs:
        print(format_runs(runs))
    complete = sum(r["status"] == "complete" for r in runs)
    out.final(f"{len(runs)} run folders in {args.dir} ({complete} complete)", runs=len(runs), complete=complete)
    return 0


def cmd_report(args: argparse.Namespace, out: Output) -> int:
    from leukray.report.document import write_report

    run = args.run
    if not _exists(run):
        raise InputNotFoundError(f"run folder not found: {run}")
    if not any(_exists(storage.join(run, name)) for name in ("summary.json", "extract.json")):
        raise InputNotFoundError(f"{run} is not a run folder: no summary.json or extract.json")
    with _stage(out, "report"):
        written = write_report(run)
    figures = sum(name.startswith("figures/") for name in written)
    out.final(
        f"wrote {written['report.html']} and report.md ({figures} figures)",
        out=run,
        files=sorted(written),
    )
    return 0


# -- the parser ----------------------------------------------------------------------------


def _automation_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("automation (README: Automation)")
    modes = group.add_mutually_exclusive_group()
    modes.add_argument("--quiet", action="store_true", help="print only errors and the final line")
    modes.add_argument(
        "--json",
        action="store_true",
        help="JSON lines on stdout (stage events, then a `summary` object); human text on stderr",
    )
    return parent


def _ray_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("Ray runtime")
    group.add_argument(
        "--address",
        help="attach to this Ray cluster (host:port, ray://host:10001 or auto); default RAY_ADDRESS, else a new "
        "local Ray",
    )
    group.add_argument(
        "--num-cpus", dest="num_cpus", type=int, help="CPUs of the local Ray (default: all of this machine's)"
    )
    return parent


def _add_synth_command(sub, auto: argparse.ArgumentParser) -> None:
    """`synth`: the built-in synthetic cells."""
    synth = sub.add_parser(
        "synth", parents=[auto], help="write synthetic C-NMC-style cells (the built-in default data)"
    )
    synth.add_argument("--out", required=True, help="folder to write fold_<k>/{all,hem}/UID_*.bmp into")
    synth.add_argument("--cells", type=int, default=600, help="cells to write (default: 600)")
    synth.add_argument("--subjects", type=int, default=24, help="subjects they come from (default: 24)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    synth.add_argument("--folds", type=int, default=1, help="fold_<k> folders, subjects dealt across them (default: 1)")
    synth.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes writing subjects side by side; the files do not depend on it (default: this machine's CPUs)",
    )
    synth.set_defaults(func=cmd_synth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leukray",
        description="ALL screening of blood-cell microscopy on Ray.",
        epilog="exit codes: 0 ok, 2 user mistake (option, config, path), 3 bad data, 4 weights missing or "
        "unreadable, 5 Ray cluster trouble, 1 a bug (with a traceback)",
    )
    parser.add_argument("--version", action="version", version=f"leukray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    auto, ray = _automation_options(), _ray_options()

    _add_synth_command(sub, auto)

    data_help = (
        "dataset root, URI (s3://...) or CSV manifest (path,label[,subject]); data.path in --config; repeatable (folds)"
    )
    run = sub.add_parser(
        "run", parents=[auto, ray], help="preprocess, extract ResNet50 features and sweep classifiers on Ray"
    )
    run.add_argument("--data", action=_JoinRoots, help=data_help)
    _add_config_options(run)
    _add_existing_options(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", parents=[auto, ray], help="synthesise cells into RUN/data, then `run` on them")
    demo.add_argument("--cells", type=int, default=600, help="synthetic cells (default: 600)")
    demo.add_argument("--subjects", type=int, default=24, help="subjects they come from (default: 24)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default: 0)")
    _add_config_options(demo, DEMO_DEFAULTS)
    _add_existing_options(demo)
    demo.set_defaults(func=cmd_demo)

    extract = sub.add_parser(
        "extract",
        parents=[auto, ray],
        help="the first stage of `run`: discover, split, preprocess, extract ResNet50 features",
    )
    extract.add_argument("--data", action=_JoinRoots, help=data_help)
    _add_config_options(extract)
    _add_existing_options(extract)
    extract.set_defaults(func=cmd_extract)

    train = sub.add_parser(
        "train",
        parents=[auto, ray],
        help="train the custom ResNet50 (Table II head) on a run folder that `extract` wrote",
    )
    _add_config_options(train)
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser(
        "tune",
        parents=[auto, ray],
        help="classifier sweeps (Tables III/IV), model choice, bundle and report on a run folder that `extract` wrote",
    )
    _add_config_options(tune)
    tune.set_defaults(func=cmd_tune)

    _add_model_commands(sub, auto, ray)
    _add_folder_commands(sub, auto, data_help)
    return parser


def _add_model_commands(sub, auto: argparse.ArgumentParser, ray: argparse.ArgumentParser) -> None:
    """`predict`, `screen` and `classifiers`: the commands that apply or list models."""
    pred = sub.add_parser("predict", parents=[auto, ray], help="apply a model bundle (RUN/model) to new images")
    pred.add_argument("--model", required=True, help="a model bundle folder, e.g. RUN/model")
    pred.add_argument("--data", required=True, help="folder, URI or CSV manifest of images (labels optional)")
    pred.add_argument("--out", required=True, help="predictions file (.parquet)")
    pred.set_defaults(func=cmd_predict)

    scr = sub.add_parser(
        "screen",
        parents=[auto, ray],
        help="find leukocytes in whole smear fields and screen each cell and slide with a model bundle",
    )
    scr.add_argument("--model", help="a model bundle folder, e.g. RUN/model (or `model:` in --config)")
    scr.add_argument(
        "--data", help="folder or URI of smear-field images, searched recursively (or `data:` in --config)"
    )
    scr.add_argument("--out", help="output folder: cells.parquet, slides.csv, screen.json (or `out:` in --config)")
    scr.add_argument("--config", help="YAML with model/data/out and a `screen:` section (overridden by options)")
    _add_section_options(scr.add_argument_group("screening settings (screen.field)"), "screen", ScreenConfig)
    _add_existing_options(scr)  # default: a rerun into --out resumes; other bundle/data/settings are refused
    scr.set_defaults(func=cmd_screen)

    _add_smear_train(sub, [auto, ray])

    classifiers = sub.add_parser(
        "classifiers", parents=[auto], help="list the classifiers of the sweep (Lazy Predict's list)"
    )
    classifiers.set_defaults(func=cmd_classifiers)

    track = sub.add_parser(
        "track", parents=[auto], help="log a finished run folder to MLflow (what `--tracking.mlflow` does)"
    )
    track.add_argument("run", help="a run folder (local or URI) whose tune stage finished")
    track.add_argument("--mlflow", required=True, help="tracking URI, a folder (file store), or 'env'")
    track.add_argument("--experiment", default="leukray", help="MLflow experiment name (default: leukray)")
    track.set_defaults(func=cmd_track)


def _add_folder_commands(sub, auto: argparse.ArgumentParser, data_help: str) -> None:
    """`config show`, `runs` and `report`: look at a configuration or at run folders; no Ray."""
    config = sub.add_parser("config", help="`config show`: the resolved configuration and what a run would read")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser(
        "show",
        parents=[auto],
        help="print the resolved config, image counts per class/subject/split, weights and outputs; runs nothing",
    )
    show.add_argument("--data", action=_JoinRoots, help=data_help)
    _add_config_options(show)
    show.set_defaults(func=cmd_config_show)

    runs = sub.add_parser(
        "runs", parents=[auto], help="list the run folders under DIR: data, weights, chosen model, status"
    )
    runs.add_argument("dir", metavar="DIR", help="a folder (or URI) holding run folders, or one run folder")
    runs.set_defaults(func=cmd_runs)

    report = sub.add_parser(
        "report", parents=[auto], help="(re)render RUN/report.html, report.md and figures from the run's files"
    )
    report.add_argument("run", metavar="RUN", help="a run folder (local or s3://...)")
    report.set_defaults(func=cmd_report)


def _fail(out: Output, stderr: Any, code: int, message: str) -> int:
    print(f"leukray: error: {message}", file=stderr, flush=True)
    out.event("summary", status="error", exit_code=code, message=message)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's usage error (2) still ends --json with a summary
        if exc.code == 2 and "--json" in argv:
            Output("json", sys.stdout).event(
                "summary", status="error", exit_code=2, message="invalid command line (usage on stderr)"
            )
        raise
    mode = "json" if getattr(args, "json", False) else "quiet" if getattr(args, "quiet", False) else "text"
    out, stderr = Output(mode, sys.stdout), sys.stderr
    out.event("start", command=args.command, version=__version__)
    try:
        with _human_text(mode):
            return args.func(args, out)
    except LeukrayError as exc:
        return _fail(out, stderr, exit_code_of(exc), str(exc))
    except KeyboardInterrupt:
        print("leukray: interrupted", file=stderr)
        return 130
    except Exception as exc:
        from leukray.distributed.resources import cluster_failure

        why = cluster_failure(exc)
        if why is None:
            raise  # a bug: keep the traceback
        return _fail(out, stderr, EXIT_CLUSTER, why)


if __name__ == "__main__":
    sys.exit(main())
