"""The hyperparameter search, the ensembles, the CPU-time limits and the subject-bootstrap
intervals (leukray.distributed.tuning, leukray.models.classifiers)."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest

from leukray.models.classifiers import (
    GroupedData,
    fold_ids,
    fold_scores,
    grouped_cv,
    make_pipeline,
    run_grouped_cv,
    run_limited,
    soft_voting,
    subject_bootstrap,
)


def subjects_data(n_subjects: int = 12, per_subject: int = 15, dim: int = 10, seed: int = 0) -> GroupedData:
    """Cells of `n_subjects` subjects (half ALL = 1), a subject offset shared by its cells,
    the class shifting the first two features; every third training cell has an augmented
    copy (original False)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_subjects) % 2, per_subject)
    groups = np.repeat([f"s{i}" for i in range(n_subjects)], per_subject)
    X = rng.normal(size=(len(labels), dim)) + np.repeat(rng.normal(scale=0.5, size=(n_subjects, dim)), per_subject, 0)
    X[:, :2] += 2.0 * labels[:, None]
    copies = np.arange(0, len(labels), 3)
    X = np.vstack([X, X[copies] + rng.normal(scale=0.05, size=(len(copies), dim))])
    return GroupedData(
        X.astype(np.float32),
        np.concatenate([labels, labels[copies]]),
        np.concatenate([groups, groups[copies]]),
        np.concatenate([np.ones(len(labels), bool), np.zeros(len(copies), bool)]),
    )


def _burn_cpu() -> int:
    total = 0
    while True:  # computes until the CPU-time limit stops it
        total += sum(range(10_000))


def _sleep_then_answer(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


class TestCpuTimeLimit:
    def test_a_fit_past_its_cpu_seconds_is_a_timeout(self):
        status, detail, _ = run_limited(_burn_cpu, (), 1.0)
        assert status == "timeout" and "1 s of CPU time" in detail

    def test_waiting_on_the_clock_is_not_cpu_time(self):
        # 2.5 s of wall time that uses no CPU: a wall-time limit of 1 s would stop it, the
        # CPU-time limit does not (this is what a loaded machine looks like to a fit)
        assert run_limited(_sleep_then_answer, (2.5,), 1.0)[:2] == ("ok", "done")

    def test_an_error_is_failed_with_its_message(self):
        status, detail, _ = run_limited(int, ("not a number",), 5.0)
        assert status == "failed" and "ValueError" in detail

    def test_grouped_cv_past_its_limit_is_a_timeout_row(self):
        rng = np.random.default_rng(1)
        # 3,000 rows fitted within the 1 s on a faster CPU (2026-12-01); 9,000 took 8 s for both folds
        # uncapped (2026-12-02), too close for a test that must not pass on a fast machine. SVC's fit
        # grows ~n^2: 9,000 a fold, ~4x that.
        n = 18000
        noise = GroupedData(
            rng.normal(size=(n, 200)).astype(np.float32), rng.integers(0, 2, n),
            np.repeat(np.arange(30), n // 30).astype(str), np.ones(n, bool),
        )  # fmt: skip
        row = run_grouped_cv("SVC", noise, 0, 2, timeout_s=0.2)  # 2 folds x 0.2 -> 1 CPU s: far too little for SVC
        assert row["status"] == "timeout" and "CPU s" in row["detail"] and np.isnan(row["CV Balanced Accuracy"])


class TestPipelineSettings:
    def test_pca_on_the_trunk_block_keeps_the_other_columns(self):
        data = subjects_data(dim=12)
        params = {"prep_reduce": "pca", "prep_dim": 3, "prep_block": 8, "class_weight": "balanced", "C": 0.5}
        model = make_pipeline("LogisticRegression", 0, params=params).fit(data.X, data.y)
        reduced = model[:-1].transform(data.X[:5])
        assert reduced.shape == (5, 3 + 4)  # 8 block columns -> 3 components, 4 passed through
        clf = model.named_steps["classifier"]
        assert clf.class_weight == "balanced" and clf.C == 0.5 and clf.n_features_in_ == 7

    def test_robust_scaler_and_kbest(self):
        from sklearn.preprocessing import RobustScaler

        model = make_pipeline("GaussianNB", 0, params={"prep_scaler": "robust", "prep_reduce": "kbest", "prep_dim": 2,
                                                       "prep_block": 10})  # fmt: skip
        data = subjects_data()
        model.fit(data.X, data.y)
        assert isinstance(model.named_steps["scaler"], RobustScaler)
        assert model.named_steps["classifier"].n_features_in_ == 2

    def test_every_search_space_draws_settings_its_pipeline_accepts(self):
        import optuna

        from leukray.distributed.tuning import search_space, suggest
        from leukray.models.classifiers import PREP_KEYS, lazypredict_classifiers

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        spaces = {n: search_space(n, block=10) for n in lazypredict_classifiers() if search_space(n) is not None}
        assert {"LogisticRegression", "RandomForestClassifier", "XGBClassifier", "LGBMClassifier"} <= set(spaces)
        assert spaces["LogisticRegression"]["class_weight"] == ("choice", [None, "balanced"])
        assert "class_weight" not in spaces["GaussianNB"] and "prep_reduce" not in search_space("GaussianNB")
        assert spaces["GaussianNB"]["prep_dim"] == ("choice", [8])  # below the block of 10 columns
        assert "prep_reduce" not in search_space("GaussianNB", block=2048, rows=15)  # too few rows to reduce
        data = subjects_data(dim=12)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for name, space in spaces.items():
            for _ in range(1):
                drawn = suggest(study.ask(), space, prefix=name + "__")
                model = make_pipeline(name, 0, params=drawn)
                got = model.named_steps["classifier"].get_params()
                assert all(got[k] == v for k, v in drawn.items() if k not in PREP_KEYS), name  # real hyperparameters
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    assert model.fit(data.X, data.y).predict_proba(data.X).shape == (len(data.y), 2), name


class TestGroupedCvAndEnsembles:
    def test_folds_keep_subjects_whole_and_copies_out_of_scoring(self):
        data = subjects_data()
        fold = fold_ids(data, seed=3, folds=4)
        assert (fold[~data.original] == -1).all() and set(fold[data.original]) == {0, 1, 2, 3}
        for subject in np.unique(data.groups):
            assert len(set(fold[(data.groups == subject) & data.original])) == 1

    def test_out_of_fold_probabilities_give_the_reported_score(self):
        data = subjects_data()
        result = grouped_cv("LogisticRegression", data, 0, 4, oof=True)
        orig = data.original
        assert np.isfinite(result["oof"][orig]).all() and np.isnan(result["oof"][~orig]).all()
        again = fold_scores(data.y, np.nan_to_num(result["oof"]), result["fold"])
        assert again["CV Balanced Accuracy"] == pytest.approx(result["CV Balanced Accuracy"])
        assert result["CV Balanced Accuracy"] > 0.75  # the classes are separable across subjects

    def test_mean_of_members_oof_is_the_soft_voting_ensemble_cv(self):
        """The shortcut `soft_voting_row` relies on: averaging the members' out-of-fold
        probabilities equals cross-validating the VotingClassifier itself on those folds."""
        data = subjects_data(dim=6)
        members = [
            {"model": "LogisticRegression", "params": {"C": 0.1}},
            {"model": "GaussianNB", "params": None},
            {"model": "KNeighborsClassifier", "params": {"n_neighbors": 7}},
        ]
        oofs = [grouped_cv(m["model"], data, 5, 3, m["params"], oof=True) for m in members]
        fold = oofs[0]["fold"]
        mean = np.mean([o["oof"] for o in oofs], axis=0)
        ensemble = np.full_like(mean, np.nan)
        for i in range(3):
            held_out = np.isin(data.groups, np.unique(data.groups[fold == i]))
            model = soft_voting(members, 5).fit(data.X[~held_out], data.y[~held_out])
            ensemble[fold == i] = model.predict_proba(data.X[fold == i])
        rows = data.original
        np.testing.assert_allclose(ensemble[rows], mean[rows], rtol=1e-6, atol=1e-9)


class TestSubjectBootstrap:
    def test_perfect_predictions_have_a_degenerate_interval(self):
        y = np.repeat([0, 1], 20)
        probs = np.stack([1 - y, y], axis=1).astype(float)
        ci = subject_bootstrap(y, probs, np.repeat(np.arange(8), 5), n_boot=200, seed=0)
        assert ci["Balanced Accuracy"] == [1.0, 1.0] and ci["ROC AUC"] == [1.0, 1.0] and ci["subjects"] == 8

    def test_resamples_subjects_not_cells(self):
        # one subject per class: every resample that has both classes has both subjects, so
        # the interval is the point estimate; a cell bootstrap would spread around it
        y = np.repeat([0, 1], 50)
        rng = np.random.default_rng(0)
        p1 = np.clip(y * 0.3 + rng.random(100) * 0.7, 0, 1)
        probs = np.stack([1 - p1, p1], axis=1)
        ci = subject_bootstrap(y, probs, np.repeat(["a", "b"], 50), n_boot=300, seed=1)
        from sklearn.metrics import balanced_accuracy_score

        point = balanced_accuracy_score(y, probs.argmax(1))
        assert ci["Balanced Accuracy"] == pytest.approx([point, point])
        assert 0 < ci["resamples"] < 300  # draws of a single subject hold one class and are skipped

    def test_intervals_cover_the_point_and_are_reproducible(self):
        rng = np.random.default_rng(2)
        y = np.repeat([0, 1], 60)
        p1 = np.clip(0.35 * y + rng.random(120) * 0.65, 0, 1)
        probs = np.stack([1 - p1, p1], axis=1)
        groups = np.repeat(list("abcdefghijkl"), 10)  # sorted as the bootstrap codes them
        a = subject_bootstrap(y, probs, groups, n_boot=300, seed=4)
        assert a == subject_bootstrap(y, probs, groups, n_boot=300, seed=4)
        lo, hi = a["ROC AUC"]
        from sklearn.metrics import roc_auc_score

        assert lo < roc_auc_score(y, p1) < hi and hi - lo > 0.01
        # the resampling arithmetic agrees with scikit-learn on one resample's weights
        from sklearn.metrics import balanced_accuracy_score

        one = subject_bootstrap(y, probs, groups, n_boot=1, seed=0)
        code = np.repeat(np.arange(12), 10)
        draw = np.bincount(np.random.default_rng(0).integers(0, 12, size=(1, 12))[0], minlength=12)[code]
        assert one["Balanced Accuracy"][0] == pytest.approx(
            balanced_accuracy_score(y, probs.argmax(1), sample_weight=draw)
        )
        assert one["ROC AUC"][0] == pytest.approx(roc_auc_score(y, p1, sample_weight=draw))


@pytest.mark.usefixtures("ray_local")
class TestSearch:
    def test_optuna_search_scores_by_grouped_cv_and_resumes(self, tmp_path):
        from leukray.distributed.tuning import run_search_tune, search_fingerprint, search_space

        data = {"cells": subjects_data(dim=12)}
        candidates = [{"source": "cells", "Model": "LogisticRegression", "block": 10},
                      {"source": "cells", "Model": "GaussianNB", "block": 0}]  # fmt: skip
        kwargs = dict(seed=0, folds=3, timeout_s=60, cpus_per_trial=1, storage_path=str(tmp_path))
        first = run_search_tune(candidates, data, 4, **kwargs)
        assert len(first) == 4 and (first["status"] == "ok").all()
        assert first["trial_id"].nunique() == 4 and (first["cv_folds"] == 3).all()
        for _, trial in first.iterrows():
            params = json.loads(trial["params"])
            assert set(params) == set(
                search_space(trial["Model"], 10 if trial["Model"] == "LogisticRegression" else 0, 240)
            )
            # the score is the grouped CV of that very setting (folds shuffled with seed + 1)
            again = grouped_cv(trial["Model"], data["cells"], 1, 3, params)
            assert trial["CV Balanced Accuracy"] == pytest.approx(again["CV Balanced Accuracy"])
        assert first["CV Balanced Accuracy"].is_monotonic_decreasing
        # the same search again is restored from RUN/tune, not rerun: the same trials come back
        second = run_search_tune(candidates, data, 4, **kwargs)
        assert sorted(second["trial_id"]) == sorted(first["trial_id"])
        assert len(list(tmp_path.glob("tuning-*"))) == 1
        # another search (other settings or other data) would be a new experiment
        labels = ["LogisticRegression on cells", "GaussianNB on cells"]
        settings = {"trials": 4, "seed": 0, "folds": 3, "timeout_s": 60, "n_jobs": 1}
        name = search_fingerprint(labels, data, settings)
        assert (tmp_path / f"tuning-{name}").is_dir()
        assert search_fingerprint(labels, data, {**settings, "trials": 5}) != name
        changed = subjects_data(dim=12)
        changed.y[0] = 1 - changed.y[0]
        assert search_fingerprint(labels, {"cells": changed}, settings) != name

    def test_the_same_search_elsewhere_suggests_and_scores_the_same_settings(self, tmp_path):
        """TPE conditions on whole finished batches, so two runs of one search agree however
        their trials happened to finish (2 CPUs: batches of 2; the first 2 trials are random)."""
        from leukray.distributed.tuning import run_search_tune

        data = {"cells": subjects_data(dim=12)}
        candidates = [{"source": "cells", "Model": "LogisticRegression", "block": 10},
                      {"source": "cells", "Model": "GaussianNB", "block": 0}]  # fmt: skip
        kwargs = dict(seed=3, folds=3, timeout_s=60, cpus_per_trial=1)
        runs = [run_search_tune(candidates, data, 6, storage_path=str(tmp_path / k), **kwargs) for k in "ab"]
        for run in runs:
            assert len(run) == 6 and (run["status"] == "ok").all()
        a, b = (r.sort_values("params").reset_index(drop=True) for r in runs)
        assert a["params"].tolist() == b["params"].tolist() and a["Model"].tolist() == b["Model"].tolist()
        assert a["CV Balanced Accuracy"].tolist() == b["CV Balanced Accuracy"].tolist()


def test_the_custom_heads_features_are_never_cross_validated_for_the_choice():
    """The head learned its features from the training subjects' labels: a CV over train+val
    would score them on subjects they were fitted to, so neither the CV pool nor the search
    sees them, however well they did on validation."""
    import pandas as pd

    from leukray.stages.tune import Sweeps, _cv_pool, _pool_rows

    def board(val: list[float]) -> pd.DataFrame:
        return pd.DataFrame(
            {"Model": ["LogisticRegression", "GaussianNB"][: len(val)], "status": "ok", "Val Balanced Accuracy": val}
        )

    sweeps = Sweeps(
        data={}, boards={"trunk": board([0.6, 0.55]), "custom": board([0.99, 0.98])},
        candidates=[], has_val=True, classes=["hem", "all"], tables=[],
    )  # fmt: skip
    assert {s for s, _ in _pool_rows(sweeps)} == {"trunk"}
    pool = _cv_pool(sweeps, top=5, seed=0)
    assert [(c["source"], c["Model"]) for c in pool] == [("trunk", "LogisticRegression"), ("trunk", "GaussianNB")]


# -- the decision threshold and the stacked ensemble ----------------------------------------------

# Out-of-fold P(ALL) of a constructed case: the best balanced accuracy is 0.875, at every
# threshold in the gap (0.65, 0.7] (3 of 4 ALL cells above, all 5 normal ones below); at 0.5
# it is 0.675 (3/4 and 3/5); keeping every ALL cell needs a threshold in (0.3, 0.45].
OOF_POSITIVE = np.array([0.45, 0.7, 0.8, 0.9, 0.1, 0.2, 0.3, 0.6, 0.65])
OOF_TRUTH = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])


def _balanced(threshold: float) -> float:
    called = OOF_POSITIVE >= threshold
    return (called[OOF_TRUTH == 1].mean() + (~called[OOF_TRUTH == 0]).mean()) / 2


class TestDecisionThreshold:
    def test_the_threshold_is_the_out_of_fold_optimum(self):
        from leukray.models.classifiers import oof_threshold

        positive = OOF_TRUTH == 1
        best = oof_threshold(positive, OOF_POSITIVE, ("balanced", np.nan))
        assert best == pytest.approx(0.675)  # half-way across the optimal gap
        grid = np.linspace(0, 1, 1001)
        assert _balanced(best) == pytest.approx(max(_balanced(t) for t in grid)) == pytest.approx(0.875)
        assert _balanced(0.5) == pytest.approx(0.675)
        assert oof_threshold(positive, OOF_POSITIVE, ("sensitivity", 1.0)) == pytest.approx(0.375)
        assert oof_threshold(positive, OOF_POSITIVE, ("sensitivity", 0.75)) == pytest.approx(0.675)
        assert oof_threshold(positive, OOF_POSITIVE, ("fixed", 0.3)) == 0.3

    def test_the_record_says_what_the_threshold_gives_and_an_honest_estimate(self):
        from leukray.models.classifiers import threshold_record

        probs = np.stack([1 - OOF_POSITIVE, OOF_POSITIVE], axis=1)
        fold = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
        record = threshold_record(OOF_TRUTH, probs, fold, ("balanced", np.nan), positive_code=1)
        assert record["value"] == pytest.approx(0.675) and record["rule"] == "balanced"
        assert record["oof"] == pytest.approx({"balanced_accuracy": 0.875, "sensitivity": 0.75, "specificity": 1.0})
        assert record["oof_at_0.5"]["balanced_accuracy"] == pytest.approx(0.675)
        assert 0 <= record["crossfit_cv_balanced_accuracy"] <= 1 and record["crossfit_cv_sd"] >= 0

    def test_the_tune_stage_takes_it_from_the_chosen_models_out_of_fold_predictions(self):
        import pandas as pd

        from leukray.config import RunConfig, SweepConfig
        from leukray.errors import ConfigError
        from leukray.stages.tune import Sweeps, decision_threshold

        sweeps = Sweeps(data={}, boards={}, candidates=[], has_val=True, classes=["hem", "all"], tables=[])
        probs = np.stack([1 - OOF_POSITIVE, OOF_POSITIVE], axis=1)
        sweeps.oof[("cells", "LDA")] = (OOF_TRUTH, probs, np.array([0, 1, 2] * 3))
        choice = ("cells", pd.Series({"Model": "LDA"}))

        def threshold(rule: str, chosen=choice) -> dict:
            return decision_threshold(RunConfig(sweep=SweepConfig(threshold=rule)), sweeps, chosen)

        assert threshold("balanced")["value"] == pytest.approx(0.675)
        assert "out-of-fold probabilities of LDA" in threshold("balanced")["chosen_on"]
        assert threshold("sensitivity:1")["value"] == pytest.approx(0.375)
        assert threshold("0.3")["value"] == 0.3
        # a model chosen without the grouped CV has no out-of-fold predictions: 0.5, and why
        unscored = threshold("balanced", ("cells", pd.Series({"Model": "GaussianNB"})))
        assert unscored["value"] == 0.5 and "no out-of-fold" in unscored["chosen_on"]
        with pytest.raises(ConfigError, match="sweep.threshold"):
            SweepConfig(threshold="sensitivity:high")

    def test_labels_at_the_threshold(self):
        from leukray.models.classifiers import threshold_labels

        probs = np.array([[0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
        assert threshold_labels(probs, ["hem", "all"], 1, 0.675).tolist() == ["hem", "all", "hem"]
        assert threshold_labels(probs, ["hem", "all"], 1, None).tolist() == ["all", "all", "hem"]

    def test_screen_flags_at_the_bundles_threshold_unless_one_is_set(self):
        from leukray.config import ScreenConfig

        assert ScreenConfig().cell_threshold(0.675) == 0.675
        assert ScreenConfig().cell_threshold(None) == 0.5  # a bundle without a threshold: as before
        assert ScreenConfig(blast_threshold=0.5).cell_threshold(0.675) == 0.5  # the user's choice wins


@pytest.mark.usefixtures("ray_local")
def test_predict_calls_all_at_the_bundles_threshold_not_at_half(tiny_cells, tmp_path):
    """A model whose P(ALL) is 0.6 for every cell: the most probable class would be ALL, but
    with the bundle's threshold 0.675 `leukray predict` calls every cell normal."""
    import pandas as pd
    from sklearn.dummy import DummyClassifier

    from leukray.config import PreprocessConfig
    from leukray.models.bundle import load_bundle, save_bundle
    from leukray.stages.predict import predict
    from leukray.stages.smeartrain import NO_TRUNK

    prior = DummyClassifier(strategy="prior").fit(np.zeros((10, 1)), [1] * 6 + [0] * 4)  # P(ALL) = 0.6
    model_dir = tmp_path / "model"
    save_bundle(
        str(model_dir), classes=["hem", "all"], positive_label="all", preprocess=PreprocessConfig(size=64),
        weights=NO_TRUNK, weights_seed=0, feature_source="morphology", classifier_name="DummyClassifier",
        classifier=prior, extra={"decision_threshold": {"value": 0.675, "rule": "balanced"}},
    )  # fmt: skip
    bundle = load_bundle(str(model_dir))
    assert bundle.decision_threshold == 0.675
    out = tmp_path / "predictions.parquet"
    predict(str(model_dir), str(tiny_cells), str(out))
    preds = pd.read_parquet(out)
    ok = preds[preds["error"] == ""]
    assert len(ok) > 0 and np.allclose(ok["prob_all"], 0.6)
    assert (ok["predicted_label"] == "hem").all()
    assert (np.asarray(prior.classes_)[prior.predict_proba(np.zeros((1, 1))).argmax(1)] == 1).all()  # argmax: ALL


@pytest.mark.usefixtures("ray_local")
def test_the_stacked_ensemble_is_scored_by_the_grouped_cv_and_bundled(tmp_path):
    import pandas as pd

    from leukray.config import PreprocessConfig, RunConfig, SweepConfig
    from leukray.distributed.tuning import run_cv_tune
    from leukray.models.bundle import load_bundle, save_bundle
    from leukray.models.classifiers import STACKING, build_model
    from leukray.stages.smeartrain import NO_TRUNK
    from leukray.stages.tune import _oof_by_candidate, stacking_row

    data = {"cells": subjects_data(dim=6)}
    pool = [
        {"source": "cells", "Model": m, "base_model": m, "params": p}
        for m, p in (("LogisticRegression", json.dumps({"C": 0.1})), ("GaussianNB", None))
    ]
    table = run_cv_tune(pool, data, 5, 3, 1, str(tmp_path / "tune"), timeout_s=60)
    cfg = RunConfig(out=str(tmp_path), sweep=SweepConfig(seed=5, ensemble_size=3, timeout_s=60))
    row = stacking_row(table, data, cfg, 3)
    assert row["status"] == "ok" and row["ensemble"] == "stacking" and row["Model"].startswith("Stacking: ")
    assert [m["model"] for m in row["members"]] == table["base_model"].tolist()
    # its score is the grouped CV of the real StackingClassifier on the candidates' folds
    params = json.loads(row["params"])
    direct = grouped_cv(STACKING, data["cells"], 5, 3, params, oof=True)
    assert row["CV Balanced Accuracy"] == pytest.approx(direct["CV Balanced Accuracy"])
    assert row["fold"] == table["fold"].iloc[0]  # the members' folds: comparable with them
    full = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
    assert ("cells", row["Model"]) in _oof_by_candidate(full, data)
    # the fitted ensemble's inner folds keep subjects whole, and it survives the bundle
    train = data["cells"]
    model = build_model(STACKING, 5, params=params, groups=train.groups, y=train.y).fit(train.X, train.y)
    for fit_rows, meta_rows in model.cv:
        assert not set(train.groups[fit_rows]) & set(train.groups[meta_rows])
    save_bundle(
        str(tmp_path / "model"), classes=["hem", "all"], positive_label="all", preprocess=PreprocessConfig(size=64),
        weights=NO_TRUNK, weights_seed=0, feature_source="morphology", classifier_name=row["Model"], classifier=model,
    )  # fmt: skip
    loaded = load_bundle(str(tmp_path / "model")).classifier
    assert type(loaded).__name__ == "StackingClassifier"
    np.testing.assert_allclose(loaded.predict_proba(train.X), model.predict_proba(train.X))


def test_a_bundle_with_a_threshold_outside_0_1_is_refused_and_the_report_states_it(tmp_path):
    from sklearn.dummy import DummyClassifier

    from leukray.config import PreprocessConfig
    from leukray.models.bundle import BundleError, load_bundle, save_bundle
    from leukray.report.document import _threshold_lines
    from leukray.stages.smeartrain import NO_TRUNK

    prior = DummyClassifier(strategy="prior").fit(np.zeros((4, 1)), [0, 1, 1, 1])
    kwargs = dict(
        classes=["hem", "all"], positive_label="all", preprocess=PreprocessConfig(size=64), weights=NO_TRUNK,
        weights_seed=0, feature_source="morphology", classifier_name="DummyClassifier", classifier=prior,
    )  # fmt: skip
    save_bundle(str(tmp_path / "bad"), **kwargs, extra={"decision_threshold": {"value": 1.5}})
    with pytest.raises(BundleError, match="decision_threshold"):
        load_bundle(str(tmp_path / "bad"))
    save_bundle(str(tmp_path / "old"), **kwargs)  # a bundle of an earlier leukray: the most probable class
    old = load_bundle(str(tmp_path / "old"))
    assert old.decision_threshold is None and old.predicted_labels(np.array([[0.45, 0.55]])).tolist() == ["all"]
    record = {"value": 0.675, "rule": "balanced", "chosen_on": "out-of-fold probabilities of LDA",
              "oof": {"balanced_accuracy": 0.875, "sensitivity": 0.75, "specificity": 1.0},
              "oof_at_0.5": {"balanced_accuracy": 0.675}, "crossfit_cv_balanced_accuracy": 0.8}  # fmt: skip
    (line,) = _threshold_lines(record, {"Balanced Accuracy": 0.9}, {"Balanced Accuracy": 0.85})
    assert "0.675 (balanced" in line and "0.8750" in line and "0.6750 at 0.5" in line and "0.9000 at it" in line


def test_a_chosen_stacked_ensemble_is_refitted_on_the_training_subjects_with_inner_folds():
    """`fit_chosen` builds the stacked ensemble on the training split only, its inner folds
    grouped by the training subjects, and gives probabilities on the test split."""
    import pandas as pd

    from leukray.config import RunConfig
    from leukray.models.classifiers import sweep_data
    from leukray.stages.extract import Extracted
    from leukray.stages.tune import Sweeps, fit_chosen

    data = subjects_data(n_subjects=12, dim=6)
    subject = data.groups
    split = np.select([np.isin(subject, ["s0", "s1"]), np.isin(subject, ["s2", "s3"])], ["test", "val"], "train")
    keep = data.original | (split == "train")  # augmented copies only ever train
    meta = pd.DataFrame({
        "path": [f"{s}/{i}.png" for i, s in enumerate(subject)], "label": np.where(data.y == 1, "all", "hem"),
        "subject": subject, "split": split, "aug_index": (~data.original).astype(int),
    })[keep].reset_index(drop=True)  # fmt: skip
    extracted = Extracted(RunConfig(), {}, meta, meta, data.X[keep], pd.DataFrame())
    sweeps = Sweeps({"cells": sweep_data(meta, data.X[keep])}, {}, [], True, ["hem", "all"], [])
    members = [{"model": "LogisticRegression", "params": None}, {"model": "GaussianNB", "params": None}]
    row = pd.Series({"Model": "Stacking: LR + NB", "ensemble": "stacking", "members": members,
                     "params": json.dumps({"members": members, "folds": 3})})  # fmt: skip
    chosen = fit_chosen(extracted, None, sweeps, ("cells", row), "cv")
    model = chosen.classifier
    assert type(model).__name__ == "StackingClassifier" and len(model.cv) == 3
    train_subjects = meta.loc[meta["split"] == "train", "subject"].to_numpy()
    assert set(train_subjects) == {f"s{i}" for i in range(4, 12)}
    for fit_rows, meta_rows in model.cv:  # indices into the training split's rows, subjects whole
        assert not set(train_subjects[fit_rows]) & set(train_subjects[meta_rows])
    assert chosen.test_probs.shape == (int(((meta["split"] == "test") & (meta["aug_index"] == 0)).sum()), 2)
    assert chosen.params == {"members": members, "folds": 3}
