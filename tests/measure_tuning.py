"""Measure the model choice on the real C-NMC dev fold in ../shared/data by subject-grouped
cross-validation only (not a test; it prints a table): the best untuned classifier, the
Optuna search over the best `--top` of them, the soft-voting and the stacked ensembles, and
the decision threshold chosen on the chosen candidate's out-of-fold predictions, on the cell
features (morphology + colour + texture, 175-d) that tests/measure_cellfeatures.py caches:

    PYTHONPATH=. .venv/bin/python tests/measure_tuning.py [--trials 24] [--top 5] [--cpus 2]

or, with `--run RUN`, on the ResNet50 trunk features of a `leukray extract` run folder (its
original images, `aug_index` 0; e.g. `leukray extract --data ../shared/data/cnmc-dev --out RUN
--weights random --features resnet50 --augment.oversample 0`), the 2,048-d block reducible
by the search as in a run.

It uses leukray's own code paths: `run_cv_tune` (the choice's CV, one Ray Tune trial per
candidate), `run_search_tune` (Optuna TPE through Ray Tune, each trial a grouped CV on folds
shuffled with seed + 1), `soft_voting_row` (the ensemble from out-of-fold predictions),
`stacking_row` (the stacked ensemble, by the same grouped CV) and `threshold_record`.
Every number is a 5-fold StratifiedGroupKFold over the 28 subjects (shuffle, seed 42): no
fixed test split is looked at, so nothing is tuned to one. The cached features are checked
against the current `cell_features` on a sample of images first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CLASSIFIERS = [
    "LogisticRegression", "LGBMClassifier", "XGBClassifier", "RandomForestClassifier", "ExtraTreesClassifier",
    "KNeighborsClassifier", "LinearDiscriminantAnalysis", "GaussianNB", "AdaBoostClassifier",
    "QuadraticDiscriminantAnalysis",
]  # fmt: skip
SEED, FOLDS = 42, 5


def load_checked(sample: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from measure_cellfeatures import CACHE, featurise

    from leukray.ops.cellfeatures import FAMILIES, feature_names

    if not CACHE.exists():
        sys.exit(f"no cached features at {CACHE}: run tests/measure_cellfeatures.py first")
    z = np.load(CACHE, allow_pickle=False)
    assert list(z["names"]) == feature_names(FAMILIES), "the cache holds other features"
    rows = np.random.default_rng(0).choice(len(z["paths"]), sample, replace=False)
    diff = max(float(np.max(np.abs(featurise(str(z["paths"][i]))[0] - z["X"][i]))) for i in rows)
    print(f"cache check: {sample} images re-featurised with the current code, max |difference| {diff:.3g}")
    assert diff < 1e-3, "the cached features are stale: rerun tests/measure_cellfeatures.py --no-cache"
    return z["X"], z["y"], z["groups"]


def load_run(run: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trunk features of a run folder's original images: X, y (1 = ALL), subjects."""
    from leukray.io.features import load_features

    meta, matrix = load_features(str(Path(run) / "features.parquet"))
    keep = (meta["aug_index"] == 0).to_numpy()
    meta = meta[keep]
    return matrix[keep], (meta["label"] == "all").to_numpy().astype(np.int64), meta["subject"].to_numpy()


def show(title: str, table) -> None:
    print(f"\n{title}")
    for _, r in table.iterrows():
        score = f"{r['CV Balanced Accuracy']:.3f} ± {r['CV sd']:.3f}" if r["status"] == "ok" else r["status"]
        print(f"  {r['Model']:<70} {score}  {r.get('detail') or ''}"[:160], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0, help="CPU seconds per fit")
    parser.add_argument("--run", help="a run folder whose trunk features to use instead of the cell features")
    args = parser.parse_args()

    import ray

    from leukray.config import RunConfig, SweepConfig
    from leukray.distributed.tuning import run_cv_tune, run_search_tune, tunable
    from leukray.models.classifiers import GroupedData, threshold_record
    from leukray.stages.tune import _oof_by_candidate, _ranked, soft_voting_row, stacking_row

    X, y, groups = load_run(args.run) if args.run else load_checked(16)
    block = X.shape[1] if args.run else 0  # the trunk block the search may reduce
    data = {"cells": GroupedData(X.astype(np.float32), y, groups, np.ones(len(y), bool))}
    print(
        f"{len(y)} cells ({y.sum()} ALL / {(1 - y).sum()} normal), {len(set(groups))} subjects, {X.shape[1]} features"
    )
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    store = tempfile.mkdtemp(prefix="leukray-measure-tuning-")
    seconds = {}

    def candidate(model: str, params: str | None = None, name: str | None = None) -> dict:
        return {"source": "cells", "Model": name or model, "base_model": model, "params": params}

    tick = time.perf_counter()
    untuned = run_cv_tune([candidate(m) for m in CLASSIFIERS], data, SEED, FOLDS, 1, store, timeout_s=args.timeout)
    seconds["untuned"] = time.perf_counter() - tick
    show(f"untuned classifiers, {FOLDS}-fold subject-grouped CV", untuned)

    top = [m for m in untuned[untuned["status"] == "ok"]["Model"] if tunable(m)][: args.top]
    tick = time.perf_counter()
    trials = run_search_tune(
        [{"source": "cells", "Model": m, "block": block} for m in top], data, args.trials, seed=SEED, folds=FOLDS,
        timeout_s=args.timeout, cpus_per_trial=1, storage_path=store,
    )  # fmt: skip
    seconds["search"] = time.perf_counter() - tick
    print(f"\nsearch: {len(trials)} trials over {top}; per classifier: {trials['Model'].value_counts().to_dict()}")
    best = trials.iloc[0]
    print(f"best trial (search folds, seed {SEED + 1}): {best['Model']} {best['CV Balanced Accuracy']:.3f}")

    # the model choice: the top untuned + the tuned best, re-scored on the choice's folds, + the ensemble
    pool = [candidate(m) for m in untuned[untuned["status"] == "ok"]["Model"][: args.top]]
    pool.append(candidate(best["Model"], best["params"], f"{best['Model']} (tuned)"))
    tick = time.perf_counter()
    choice = run_cv_tune(pool, data, SEED, FOLDS, 1, store, timeout_s=args.timeout)
    ensembles = [soft_voting_row(choice, data, 3)]
    seconds["choice"] = time.perf_counter() - tick
    tick = time.perf_counter()
    cfg = RunConfig(out=store, sweep=SweepConfig(seed=SEED, ensemble_size=3, timeout_s=args.timeout))
    ensembles.append(stacking_row(choice, data, cfg, FOLDS))
    seconds["stacking"] = time.perf_counter() - tick
    import pandas as pd

    table = _ranked(pd.concat([choice, pd.DataFrame([e for e in ensembles if e is not None])], ignore_index=True))
    show(f"model choice, {FOLDS}-fold subject-grouped CV (seed {SEED})", table.drop(columns=["oof", "fold", "members"]))
    print(f"\ntuned settings: {json.loads(best['params'])}")
    # the decision threshold on the out-of-fold predictions of the best single model and of each ensemble
    oof = _oof_by_candidate(table, data)
    singles = table[(table["status"] == "ok") & table["ensemble"].isna()]
    for name in [singles.iloc[0]["Model"], *[e["Model"] for e in ensembles if e is not None]]:
        y_, probs, fold = oof[("cells", name)]
        for rule in (("balanced", float("nan")), ("sensitivity", 0.95)):
            rec = threshold_record(y_, probs, fold, rule, 1)
            print(
                f"threshold {rec['rule']:<17} {rec['value']:.3f} for {name[:60]}: OOF bal.acc "
                f"{rec['oof']['balanced_accuracy']:.3f} (sens {rec['oof']['sensitivity']:.3f}, spec "
                f"{rec['oof']['specificity']:.3f}) vs {rec['oof_at_0.5']['balanced_accuracy']:.3f} at 0.5; "
                f"fold mean {rec['cv_balanced_accuracy']:.3f} ± {rec['cv_sd']:.3f}; chosen on the other folds "
                f"{rec['crossfit_cv_balanced_accuracy']:.3f} ± {rec['crossfit_cv_sd']:.3f}"
            )
    print(f"seconds: { ({k: round(v) for k, v in seconds.items()}) }")


if __name__ == "__main__":
    main()
