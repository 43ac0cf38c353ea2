"""The run report (leukray.report.write_report) on a constructed run folder, and the
subject-level bootstrap of balanced accuracy on constructed predictions. No Ray."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from leukray.report import print_leaderboard, write_report
from leukray.report.console import failure_reason, final_line
from leukray.report.document import subject_bootstrap_ci

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = [
    "accuracy_per_epoch.png",
    "loss_per_epoch.png",
    "top_classifiers.png",
    "confusion_matrix.png",
    "roc_curve.png",
]
IMG_TAG = '<img src="data:image/png;base64,'
CHROMIUM = "/usr/bin/chromium"

# Model names unique to one leaderboard, so the report must show both tables to contain both.
TRUNK_MODELS = [
    "LogisticRegression",
    "SVC",
    "RandomForestClassifier",
    "QuadraticDiscriminantAnalysis",
    "ExtraTreesClassifier",
    "KNeighborsClassifier",
    "GaussianNB",
    "RidgeClassifier",
    "LinearSVC",
    "AdaBoostClassifier",
    "BernoulliNB",
    "StackingClassifier",
]
CUSTOM_MODELS = ["LogisticRegression", "SVC", "RandomForestClassifier", "NearestCentroid", "LGBMClassifier"]


def _leaderboard(models: list[str], seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for name in models:
        failed = name == "StackingClassifier"
        bal = np.nan if failed else float(rng.uniform(0.55, 0.95))
        rows.append(
            {
                "Model": name,
                "Accuracy": np.nan if failed else min(1.0, bal + 0.02),
                "Balanced Accuracy": bal,
                "ROC AUC": np.nan if failed else min(1.0, bal + 0.04),
                "F1 Score": np.nan if failed else bal,
                "Time Taken": float(rng.uniform(0.1, 30)),
                "status": "failed" if failed else "ok",
                "Val Balanced Accuracy": np.nan if failed else bal - 0.01,
                "detail": "TypeError: missing estimators" if failed else "",
                "weights": "random-init",
            }
        )
    return pd.DataFrame(rows).sort_values("Balanced Accuracy", ascending=False, na_position="last")


def make_run(
    root: Path,
    *,
    pretrained: bool = True,
    split_mode: str = "subject",
    history: bool = True,
    custom: bool = True,
    model_name: str = "LogisticRegression",
) -> Path:
    """A finished run folder with every input the report reads (seeded, ~300 cells)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    # 14 subjects, one class each (as C-NMC): ALL subjects A*, normal subjects H*.
    layout = {
        "train": (["A1", "A2", "A3", "A4"], ["H1", "H2"]),
        "val": (["A5"], ["H3"]),
        "test": (["A6", "A7", "A8"], ["H4", "H5", "H6"]),
    }
    for split, (all_subjects, hem_subjects) in layout.items():
        for subject in all_subjects + hem_subjects:
            label = "all" if subject.startswith("A") else "hem"
            for cell in range(20):
                rows.append(
                    {
                        "path": f"/data/{label}/UID_{subject}_{cell}_1_{label}.bmp",
                        "label": label,
                        "subject": subject,
                        "split": split,
                        "sha256": f"{len(rows):064x}",
                        "duplicate_of": "",
                        "dataset": "data",
                        "n_aug": 1 if split == "train" and label == "hem" else 0,
                    }
                )
    manifest = pd.DataFrame(rows)
    if split_mode == "image":  # one subject's cells on both sides
        manifest.loc[manifest["subject"] == "A1", "split"] = ["train", "test"] * 10
    extra = pd.DataFrame(
        [
            {
                "path": "/data/all/UID_A1_99_1_all.bmp",
                "label": "all",
                "subject": "A1",
                "split": "",
                "sha256": "0" * 64,
                "duplicate_of": "/data/all/UID_A1_0_1_all.bmp",
                "dataset": "data",
                "n_aug": 0,
            },
            {
                "path": "/data/hem/broken.bmp",
                "label": "hem",
                "subject": "H1",
                "split": "",
                "sha256": "",
                "duplicate_of": "",
                "dataset": "data",
                "n_aug": 0,
            },
        ]
    )
    manifest = pd.concat([manifest, extra], ignore_index=True)
    manifest.to_parquet(root / "manifest.parquet", index=False)

    pd.DataFrame(
        [
            {"path": "/data/hem/broken.bmp", "stage": "read", "reason": "cannot identify image file"},
            {"path": "/data/all/tiny.bmp", "stage": "preprocess", "reason": "image too small: 3x3"},
            {"path": "/data/all/blank.bmp", "stage": "preprocess", "reason": "blank image: Otsu found no foreground"},
        ]
    ).to_csv(root / "errors.csv", index=False)

    _leaderboard(TRUNK_MODELS, 1).to_csv(root / "leaderboard.csv", index=False)
    if custom:
        _leaderboard(CUSTOM_MODELS, 2).drop(columns="weights").to_csv(root / "custom_leaderboard.csv", index=False)
    if history:
        epochs = np.arange(1, 9)
        pd.DataFrame(
            {
                "epoch": epochs,
                "train_loss": 0.7 / epochs,
                "val_loss": 0.75 / epochs + 0.05,
                "train_accuracy": 1 - 0.4 / epochs,
                "val_accuracy": 0.95 - 0.4 / epochs,
                "train_balanced_accuracy": 0.98 - 0.4 / epochs,
                "val_balanced_accuracy": 0.9 - 0.4 / epochs,
            }
        ).to_csv(root / "history.csv", index=False)

    test = manifest[manifest["split"] == "test"]
    truth = (test["label"] == "all").to_numpy()
    prob = np.clip(np.where(truth, 0.7, 0.3) + rng.normal(0, 0.2, len(test)), 0, 1)
    pd.DataFrame(
        {
            "path": test["path"],
            "label": test["label"],
            "subject": test["subject"],
            "predicted_label": np.where(prob >= 0.5, "all", "hem"),
            "prob_all": prob,
        }
    ).to_parquet(root / "predictions.parquet", index=False)

    usable = manifest[manifest["split"] != ""]
    summary = {
        "leukray_version": "0.1.0",
        "weights": {
            "kind": "imagenet" if pretrained else "random",
            "name": "ResNet50_Weights.IMAGENET1K_V1" if pretrained else "random-init",
            "source": "https://download.pytorch.org/models/resnet50-0676ba61.pth"
            if pretrained
            else "torch.manual_seed(0)",
            "sha256": "0676ba61" + "0" * 56 if pretrained else "",
            "is_pretrained": pretrained,
        },
        "data": {"path": "/data", "test_path": "", "fingerprint": "abcdef0123456789"},
        "split": {
            "mode": split_mode,
            "description": "subject-level, stratified (no subject on two sides); groups: subject IDs"
            if split_mode == "subject"
            else "image-level (the paper's protocol): 1 subject(s) leak",
            "leaking_subjects": 0 if split_mode == "subject" else 1,
            "groups": "subject IDs",
        },
        "counts": {
            "found": len(manifest),
            "usable": len(usable),
            "duplicates_removed": 1,
            "errors": 3,
            "by_split_and_class": {
                s: usable[usable.split == s].label.value_counts().to_dict() for s in ("train", "val", "test")
            },
            "augmented_copies_by_class": {"hem": 40},
            "subjects_by_split": {"train": 6, "val": 2, "test": 6},
        },
        "duplicates": [{"path": "/data/all/UID_A1_99_1_all.bmp", "duplicate_of": "/data/all/UID_A1_0_1_all.bmp"}],
        "chosen_model": {
            "name": model_name,
            "feature_source": "custom",
            "chosen_by": "validation balanced accuracy",
            "test": {"Accuracy": 0.81, "Balanced Accuracy": 0.8, "ROC AUC": 0.88, "F1 Score": 0.8},
        },
        "positive_label": "all",
        "inference_seconds_per_image": {
            "decode_preprocess": 0.004,
            "trunk": 0.02,
            "head": 0.0005,
            "classifier": 0.0001,
        },
    }
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def _pngs_in_html(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_full_report_has_tables_figures_and_no_external_resources(tmp_path):
    run = make_run(tmp_path / "run")
    written = write_report(str(run), n_boot=300)

    assert set(written) == {"report.md", "report.html", *(f"figures/{n}" for n in ALL_FIGURES)}
    for name in ALL_FIGURES:
        png = (run / "figures" / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 5000, name
        import matplotlib.image

        pixels = matplotlib.image.imread(run / "figures" / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.std() > 0.05, name

    page = (run / "report.html").read_text()
    embedded = _pngs_in_html(page)
    assert page.count(IMG_TAG) == len(ALL_FIGURES) == len(embedded)
    assert all(png.startswith(PNG_SIGNATURE) for png in embedded)
    assert sorted(embedded) == sorted((run / "figures" / n).read_bytes() for n in ALL_FIGURES)
    lowered = page.lower()
    for external in ('src="http', "src='http", 'href="http', "<script", "<link", "@import", "url("):
        assert external not in lowered, external

    # Tables III and IV side by side: both inside the flex row, III first, each with its own models.
    row = page[page.index('<div class="row">') :]
    assert row.index("Table III") < row.index("Table IV")
    table_iii = row[row.index("Table III") : row.index("Table IV")]
    table_iv = row[row.index("Table IV") :]
    assert "QuadraticDiscriminantAnalysis" in table_iii and "NearestCentroid" not in table_iii
    assert (
        "NearestCentroid" in table_iv and "QuadraticDiscriminantAnalysis" not in table_iv[: table_iv.index("</table>")]
    )
    assert "failed" in table_iii  # StackingClassifier's row keeps its status
    for column in ["Balanced Accuracy", "ROC AUC", "F1 Score", "Time Taken", "status"]:
        assert f"<th>{column}</th>" in table_iii

    markdown = (run / "report.md").read_text()
    for name in ALL_FIGURES:
        assert f"](figures/{name})" in markdown
    assert "Table III" in markdown and "Table IV" in markdown and "NearestCentroid" in markdown


def test_report_facts_data_chosen_model_and_timing(tmp_path):
    run = make_run(tmp_path / "run")
    write_report(str(run), n_boot=200, seed=3)
    markdown = (run / "report.md").read_text()

    # Per-subject table from manifest.parquet: subject A6 is a test subject with 20 ALL cells.
    assert "| A6 | all | 0 | 0 | 20 | 0 |" in markdown
    assert "| H1 | hem | 20 | 0 | 0 | 20 |" in markdown  # 20 augmented copies of H1
    assert "/data/all/UID_A1_99_1_all.bmp" in markdown  # the removed duplicate
    assert "| preprocess | image too small: 3x3 | 1 |" in markdown
    # Inference: 4 ms/image = 250 images/s for decoding; the total of all stages as well.
    assert "| decode_preprocess | decode + Otsu crop + resize | 4.000 | 250.0 |" in markdown
    assert "24.600" in markdown
    # The balanced accuracy and CI come from predictions.parquet, resampled by subject.
    predictions = pd.read_parquet(run / "predictions.parquet")
    point, low, high, used = subject_bootstrap_ci(
        predictions.label, predictions.predicted_label, predictions.subject, n_boot=200, seed=3
    )
    assert f"Balanced accuracy {point:.4f}, 95% confidence interval {low:.4f} to {high:.4f}" in markdown
    assert "the 6 test subject(s)" in markdown and f"({used} of 200 resamples used" in markdown
    assert (
        "Subject-level split: no subject's cells appear in both training and test"
        in markdown.split("## Conclusions")[1]
    )
    assert "WARNING" not in markdown


@pytest.mark.parametrize("pretrained", [False, True])
def test_random_init_warning_only_without_pretrained_weights(tmp_path, pretrained):
    run = make_run(tmp_path / "run", pretrained=pretrained)
    write_report(str(run), n_boot=50)
    page = (run / "report.html").read_text()
    markdown = (run / "report.md").read_text()
    assert ('class="warning"' in page and "RANDOM-INIT TRUNK" in page) is (not pretrained)
    assert ("> **WARNING: RANDOM-INIT TRUNK" in markdown) is (not pretrained)
    assert ("not ImageNet-feature results" in markdown.split("## Conclusions")[1]) is (not pretrained)


def test_image_split_warns_that_subjects_leak(tmp_path):
    run = make_run(tmp_path / "run", split_mode="image")
    write_report(str(run), n_boot=50)
    page = (run / "report.html").read_text()
    markdown = (run / "report.md").read_text()
    assert 'class="warning" role="alert">WARNING: IMAGE-LEVEL SPLIT' in page
    assert "overstates accuracy on new patients" in markdown
    conclusions = markdown.split("## Conclusions")[1]
    assert conclusions.startswith("\n\n- Image-level split") and "Subject-level split" not in conclusions


def test_subject_split_that_leaks_in_manifest_is_flagged(tmp_path):
    run = make_run(tmp_path / "run", split_mode="image")
    summary = json.loads((run / "summary.json").read_text())
    summary["split"]["mode"] = "subject"  # the record claims subject-level, the manifest disagrees
    (run / "summary.json").write_text(json.dumps(summary))
    write_report(str(run), n_boot=50)
    markdown = (run / "report.md").read_text()
    assert "manifest.parquet shows 1 test subject(s) also in training" in markdown
    assert "no subject's cells appear in both" not in markdown


def test_report_without_training_outputs(tmp_path):
    run = make_run(tmp_path / "run", history=False, custom=False)
    written = write_report(str(run), n_boot=50)
    assert set(written) == {
        "report.md",
        "report.html",
        "figures/top_classifiers.png",
        "figures/confusion_matrix.png",
        "figures/roc_curve.png",
    }
    page = (run / "report.html").read_text()
    markdown = (run / "report.md").read_text()
    assert page.count(IMG_TAG) == 3
    assert "Training was not run: history.csv is not available (history.csv not found)" in markdown
    assert "custom_leaderboard.csv not found" in markdown and "Table IV" in page and "Table III" in page
    assert "QuadraticDiscriminantAnalysis" in page


def test_report_on_a_nearly_empty_folder_says_not_available(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"weights": {"is_pretrained": True}}))
    (run / "errors.csv").write_text('not,a\n"broken')  # unreadable
    written = write_report(str(run))
    assert set(written) == {"report.md", "report.html"}
    markdown = (run / "report.md").read_text()
    for phrase in [
        "Counts per split and class: not available",
        "Images per subject: not available",
        "Errors: not available (could not read errors.csv",
        "Training was not run",
        "Figure 6: not available",
        "Chosen model: not available",
        "Inference time per image: not available",
        "The split is not available",
    ]:
        assert phrase in markdown, phrase
    assert _pngs_in_html((run / "report.html").read_text()) == []


def test_text_is_escaped_in_html(tmp_path):
    run = make_run(tmp_path / "run", model_name="<script>alert('x')</script>")
    markup = "<i>m</i>"  # placed in every kind of block: list items, paragraphs, tables, warnings
    summary = json.loads((run / "summary.json").read_text())
    summary["split"]["description"] += markup
    summary["counts"]["augmented_copies_by_class"] = {f"hem{markup}": 40}
    summary["weights"].update(is_pretrained=False, source=f"seed{markup}")
    (run / "summary.json").write_text(json.dumps(summary))
    board = pd.read_csv(run / "leaderboard.csv")
    board.loc[0, "Model"] = f"Model{markup}"
    board.to_csv(run / "leaderboard.csv", index=False)
    with open(run / "errors.csv", "a") as handle:
        handle.write(f"/data/x.bmp,read,bad{markup}\n")
    write_report(str(run), n_boot=50)
    page = (run / "report.html").read_text()
    assert "<script" not in page.lower() and "<i>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count("&lt;i&gt;m&lt;/i&gt;") >= 6


def test_print_leaderboard_prints_the_trunk_leaderboard_and_the_chosen_model(tmp_path, capsys):
    run = make_run(tmp_path / "run", pretrained=False)
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("custom_model", None)  # a run without the custom model: Table III only
    summary["chosen_model"] = {
        "name": "SVC",
        "feature_source": "trunk",
        "chosen_by": "validation balanced accuracy",
        "test": summary["chosen_model"]["test"],
    }
    print_leaderboard(str(run), summary, top=3)
    printed = capsys.readouterr().out
    assert (
        "Table III — classifiers on ResNet50 trunk features (test-split metrics; Val Balanced Accuracy on the "
        "validation split; trunk weights: random-init):" in printed
    )
    assert "Table IV" not in printed
    # the failed classifier is named with why, in one line; the final line is the caller's
    assert "Not scored: StackingClassifier (failed: TypeError: missing estimators) in leaderboard.csv" in printed
    assert "Outputs in" not in printed
    assert (
        "NOTE: random-init trunk" in printed
        and "Chosen by validation balanced accuracy: SVC on trunk features" in printed
    )
    assert len([line for line in printed.splitlines() if line.strip().startswith(tuple(TRUNK_MODELS))]) == 3


# -- the subject-level bootstrap -----------------------------------------------------------


def _cells(n_subjects: int, cells: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subjects of one class each; each subject has its own error rate (errors cluster)."""
    rng = np.random.default_rng(seed)
    y_true, y_pred, subjects = [], [], []
    for s in range(n_subjects):
        label = s % 2
        error_rate = rng.beta(1, 4)
        wrong = rng.random(cells) < error_rate
        y_true += [label] * cells
        y_pred += list(np.where(wrong, 1 - label, label))
        subjects += [f"S{s}"] * cells
    return np.array(y_true), np.array(y_pred), np.array(subjects)


def test_bootstrap_perfect_predictions_give_one():
    y = np.array(["all"] * 30 + ["hem"] * 30)
    subjects = np.repeat([f"S{i}" for i in range(6)], 10)
    point, low, high, used = subject_bootstrap_ci(y, y, subjects, n_boot=500, seed=0)
    assert (point, low, high) == (1.0, 1.0, 1.0)
    # 3 subjects per class: a resample misses a class with probability 2 * 0.5**6 ~ 3%.
    assert 430 <= used < 500


def test_bootstrap_skips_resamples_missing_a_class_and_is_seeded():
    y_true = np.array([0] * 5 + [1] * 5)
    y_pred = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 0])
    subjects = np.array(["a"] * 5 + ["b"] * 5)  # two subjects: half the resamples lack a class
    point, low, high, used = subject_bootstrap_ci(y_true, y_pred, subjects, n_boot=2000, seed=1)
    assert point == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert 850 < used < 1150
    assert (low, high) == (point, point)  # both subjects in every usable resample, in some multiplicity
    assert subject_bootstrap_ci(y_true, y_pred, subjects, n_boot=2000, seed=1) == (point, low, high, used)


def test_bootstrap_point_estimate_is_balanced_accuracy_and_interval_narrows_with_subjects():
    widths = []
    for n_subjects in (20, 320):
        y_true, y_pred, subjects = _cells(n_subjects, 25, seed=n_subjects)
        point, low, high, used = subject_bootstrap_ci(y_true, y_pred, subjects, n_boot=1000, seed=0)
        assert point == pytest.approx(balanced_accuracy_score(y_true, y_pred))
        assert low < point < high and used == 1000
        widths.append(high - low)
    assert widths[1] < 0.5 * widths[0]  # ~sqrt(16) = 4x narrower in theory


def test_resampling_subjects_is_wider_than_resampling_cells_when_errors_cluster():
    # 40 subjects of 50 cells: each subject is classified either all right or all wrong.
    rng = np.random.default_rng(5)
    y_true = np.repeat(np.arange(40) % 2, 50)
    subjects = np.repeat(np.arange(40), 50)
    wrong_subject = rng.random(40) < 0.25
    y_pred = np.where(wrong_subject[subjects], 1 - y_true, y_true)
    _, s_low, s_high, _ = subject_bootstrap_ci(y_true, y_pred, subjects, n_boot=1000, seed=0)
    _, c_low, c_high, _ = subject_bootstrap_ci(y_true, y_pred, np.arange(len(y_true)), n_boot=1000, seed=0)
    assert (s_high - s_low) > 3 * (c_high - c_low)


def test_bootstrap_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="lengths differ"):
        subject_bootstrap_ci([0, 1], [0, 1, 1], ["a", "b"])
    with pytest.raises(ValueError, match="no cells"):
        subject_bootstrap_ci([], [], [])


# -- the page in a real browser --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    import matplotlib.image

    run = make_run(tmp_path / "run", pretrained=False)
    write_report(str(run), n_boot=200)
    # The HTML is self-contained: render a copy with no figures folder beside it.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run / "report.html", alone / "report.html")
    shot = Path(os.environ.get("LEUKRAY_SCREENSHOT", tmp_path / "report.png"))
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            f"file://{alone / 'report.html'}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert shot.read_bytes().startswith(PNG_SIGNATURE)
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 0.1
    # The red warning banner is near the top: reddish pixels exist in the first 400 rows.
    top = pixels[:400]
    assert ((top[..., 0] > 0.6) & (top[..., 1] < 0.3) & (top[..., 2] < 0.3)).sum() > 50


def test_final_line_lists_only_the_outputs_that_exist(tmp_path):
    run = make_run(tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    (run / "leaderboard.md").write_text("# sweep\n")
    (run / "report.html").unlink(missing_ok=True)  # e.g. the report failed
    line = final_line(str(run), summary)
    assert line.endswith(f"Outputs in {run} (leaderboard.md)"), line
    write_report(str(run), n_boot=20)
    (run / "model").mkdir()
    (run / "model" / "bundle.json").write_text("{}")
    assert final_line(str(run), summary).endswith("(leaderboard.md, report.html, model/)")


def test_failure_reason_explains_categorical_nb_on_standardised_features():
    raw = "ValueError: Negative values in data passed to CategoricalNB (input X)."
    assert failure_reason(raw).startswith("needs non-negative inputs") and "standardised" in failure_reason(raw)
    long = "RuntimeError: " + "x" * 300 + "\nsecond line"
    assert failure_reason(long).endswith("...") and len(failure_reason(long)) == 120
    assert failure_reason(float("nan")) == "no reason recorded"
