"""Measure how much ALL-vs-normal signal the hand-crafted cell features carry on the real
C-NMC dev fold in ../shared/data (not a test; it prints a table):

    PYTHONPATH=. .venv/bin/python tests/measure_cellfeatures.py [--processes 2] [--no-cache]

Every image is segmented as the preprocessing stage does it (Otsu on gray, largest connected
component, bounding-box crop at original resolution), featurised with
`leukray.ops.cellfeatures.cell_features`, and cached in /tmp (never in the repository: the
data's licence is not ours). Then 5-fold StratifiedGroupKFold over SUBJECTS (shuffle,
random_state=0) scores a few untuned classifiers per feature family. This is the dev set:
the numbers are for choosing feature families, not for tuning hyper-parameters.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
import warnings
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import leukray.ops.cellfeatures as ops
from leukray.ops.cellfeatures import FAMILIES, cell_features, feature_dim, feature_names

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnmc-dev" / "fold_0"
if not DATA.is_dir():
    DATA = Path("/work/shared/data/cnmc-dev/fold_0")
CACHE = Path("/tmp/leukray-cellfeatures-cnmc-fold0.npz")
SUBJECT = re.compile(r"UID_([^_]+)_", re.IGNORECASE)


def segment(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode, Otsu on gray, largest component -> (bbox crop RGB, bbox mask)."""
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode {path}")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    _, fg = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if count <= 1:
        return rgb[:1, :1], np.zeros((1, 1), bool)
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[k, :4])
    return np.ascontiguousarray(rgb[y : y + h, x : x + w]), labels[y : y + h, x : x + w] == k


def featurise(path: str) -> tuple[np.ndarray, float]:
    cv2.setNumThreads(1)  # one image per process; OpenCV's own threads would oversubscribe
    image, mask = segment(path)
    # CPU time of this process, not wall time: the measurement shares its cores with the
    # other worker (and whatever else runs), which would inflate a wall clock.
    t0 = time.process_time()
    vec = cell_features(image, mask)
    return vec, time.process_time() - t0


def load(processes: int, use_cache: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    paths = sorted(str(p) for p in DATA.glob("*/*") if p.suffix.lower() in (".png", ".bmp"))
    names = feature_names(FAMILIES)
    # The cache is valid only for this exact feature code.
    code = hashlib.sha256(Path(ops.__file__).read_bytes()).hexdigest()
    if use_cache and CACHE.exists():
        z = np.load(CACHE, allow_pickle=False)
        if list(z["paths"]) == paths and list(z["names"]) == names and str(z["code"]) == code:
            return z["X"], z["y"], z["groups"], z["seconds"]
    y = np.array([Path(p).parent.name == "all" for p in paths], dtype=np.int64)  # 1 = ALL
    groups = np.array([SUBJECT.search(Path(p).name).group(1).upper() for p in paths])
    t0 = time.perf_counter()
    with Pool(processes) as pool:
        out = pool.map(featurise, paths, chunksize=32)
    print(f"featurised {len(paths)} images in {time.perf_counter() - t0:.1f} s with {processes} processes")
    X = np.stack([v for v, _ in out])
    seconds = np.array([s for _, s in out])
    np.savez(
        CACHE,
        X=X,
        y=y,
        groups=groups,
        seconds=seconds,
        paths=np.array(paths),
        names=np.array(names),
        code=np.array(code),
    )
    return X, y, groups, seconds


def models() -> dict:
    from lightgbm import LGBMClassifier
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    # Library defaults apart from class balancing: untuned on purpose (this is the dev set).
    return {
        "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000)),
        "svc-rbf": lambda: make_pipeline(StandardScaler(), SVC(kernel="rbf", class_weight="balanced")),
        "lightgbm": lambda: LGBMClassifier(class_weight="balanced", verbose=-1, n_jobs=2, random_state=0),
        "rf": lambda: RandomForestClassifier(n_estimators=300, class_weight="balanced", n_jobs=2, random_state=0),
    }


def cross_validate(X, y, groups, make) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    bacc, auc = [], []
    for train, test in StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0).split(X, y, groups):
        model = make().fit(X[train], y[train])
        bacc.append(balanced_accuracy_score(y[test], model.predict(X[test])))
        score = (
            model.decision_function(X[test])
            if hasattr(model, "decision_function")
            else model.predict_proba(X[test])[:, 1]
        )
        auc.append(roc_auc_score(y[test], score))
    return np.array(bacc), np.array(auc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"no data at {DATA}")
    X, y, groups, seconds = load(args.processes, not args.no_cache)
    print(
        f"{len(y)} cells ({y.sum()} ALL / {(1 - y).sum()} normal), {len(set(groups))} subjects, {X.shape[1]} features"
    )
    print(
        f"cell_features CPU time per image: mean {seconds.mean() * 1e3:.2f} ms, "
        f"median {np.median(seconds) * 1e3:.2f} ms, p95 {np.percentile(seconds, 95) * 1e3:.2f} ms"
    )
    assert np.isfinite(X).all()
    sets = {fam: [fam] for fam in FAMILIES}
    sets["all three"] = list(FAMILIES)
    names = feature_names(FAMILIES)
    print("\n5-fold StratifiedGroupKFold by subject (shuffle, random_state=0); mean ± sd over folds")
    print(f"{'features':<12} {'dim':>4} {'model':<9} {'balanced acc':>15} {'ROC AUC':>15}")
    warnings.filterwarnings("ignore")
    for label, fams in sets.items():
        cols = [i for i, n in enumerate(names) if n in set(feature_names(fams))]
        assert len(cols) == feature_dim(fams)
        for model_name, make in models().items():
            bacc, auc = cross_validate(X[:, cols], y, groups, make)
            print(
                f"{label:<12} {len(cols):>4} {model_name:<9} {bacc.mean():.3f} ± {bacc.std():.3f}   "
                f"{auc.mean():.3f} ± {auc.std():.3f}",
                flush=True,
            )
    # Single-feature reference: the README names area as the strongest single cue.
    from sklearn.metrics import roc_auc_score

    area = X[:, names.index("morph_area")]
    print(f"\nreference: morph_area alone, pooled ROC AUC {roc_auc_score(y, area):.3f}")


if __name__ == "__main__":
    main()
