"""The CLI as automation sees it: help that explains every option, `config show` (no Ray),
the exit codes, --json / --quiet, `runs` and `report` on real run folders."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from leukray.cli import ALIASES, build_parser, field_docs, main
from leukray.config import ScreenConfig, sections

REPO = Path(__file__).resolve().parents[1]


def _help(*argv: str) -> str:
    """`leukray ... --help` as one whitespace-normalised string."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return " ".join(out.getvalue().split())


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "leukray.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


# -- help ------------------------------------------------------------------------------------


def test_every_config_field_has_a_meaning():
    for section, cls in [*sections().items(), ("screen", ScreenConfig)]:
        missing = [f.name for f in dataclasses.fields(cls) if not field_docs(cls).get(f.name)]
        assert not missing, f"{section}: fields without a docstring: {missing}"


def test_help_shows_each_options_meaning_and_default():
    text = _help("run")
    assert "--sweep.timeout_s FLOAT CPU-time limit per classifier fit, in CPU seconds summed over" in text
    assert "does not change which classifiers finish. (default: 600.0)" in text
    assert "--train.epochs INT Training epochs of the head (the paper: 50). (default: 50)" in text
    assert "--preprocess.keep_aspect BOOL Pad the crop to a square" in text and "(default: true)" in text
    assert (
        "--weights WEIGHTS imagenet | imagenet:IMAGENET1K_V2 | random" in text and "PATH. (default: imagenet)" in text
    )
    # every --section.field option of run has a meaning and a default, and shows them
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    fields = [a for a in run._actions if a.dest.startswith("cfg:")]
    expected = sum(len(dataclasses.fields(cls)) for cls in sections().values()) - len(ALIASES)
    assert len(fields) == expected
    for action in fields:
        assert re.fullmatch(r".{10,} \(default: .+\)", action.help, re.S), action.dest
        assert f"{action.option_strings[0]} {action.metavar} {action.help[:20]}" in text
    # the demo shows its own defaults, not run's
    demo = _help("demo")
    assert "--train.epochs INT Training epochs of the head (the paper: 50). (default: 8)" in demo
    assert "--screen.min_cells INT A slide with fewer detected cells" in _help("screen")


# -- config show ------------------------------------------------------------------------------


def test_config_show_counts_what_a_run_would_read_without_starting_ray(tiny_cells, tmp_path):
    (tmp_path / "cfg.yaml").write_text(f"out: {tmp_path / 'from-yaml'}\nsplit: {{seed: 3}}\n")
    code = (
        "import sys; from leukray.cli import main; code = main(sys.argv[1:]); "
        "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY', file=sys.stderr); sys.exit(code)"
    )
    args = ["config", "show", "--data", str(tiny_cells), "--config", "cfg.yaml", "--weights", "random", "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "NO_RAY" in result.stderr
    summary = _json_lines(result.stdout)[-1]
    assert summary["event"] == "summary" and summary["status"] == "ok"
    files = {label: len(list(tiny_cells.rglob(f"{label}/*.bmp"))) for label in ("all", "hem")}
    images, subjects = summary["data"]["images"], summary["data"]["subjects"]
    for label, n in files.items():  # every image in exactly one split
        assert sum(images[split].get(label, 0) for split in ("train", "val", "test")) == n
    assert sum(sum(by_label.values()) for by_label in subjects.values()) == 9  # 9 subjects, none on two sides
    assert summary["data"]["counts"]["usable"] == sum(files.values())
    assert summary["config"]["split"]["seed"] == 3 and summary["weights"]["kind"] == "random"
    assert summary["outputs"]["out"] == str(tmp_path / "from-yaml")  # the YAML's out:
    assert not (tmp_path / "from-yaml").exists()  # nothing written
    # the human text (stderr under --json) carries the resolved YAML and the table
    assert "out: " + str(tmp_path / "from-yaml") in result.stderr and "train " in result.stderr


def test_quiet_prints_only_the_final_line(tiny_cells, capsys):
    assert main(["config", "show", "--data", str(tiny_cells), "--weights", "random", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.strip().splitlines() == [
        f"would read {len(list(tiny_cells.rglob('*.bmp')))} images (0 skipped) with random-init into "
        "(no --out yet); nothing was run"
    ]


# -- exit codes -----------------------------------------------------------------------------


def test_a_missing_data_path_is_exit_2_before_any_weights_check(tmp_path, capsys):
    # default weights (imagenet, not cached here) would be exit 4: the path is checked first
    assert main(["run", "--data", str(tmp_path / "does-not-exist"), "--out", str(tmp_path / "X")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"leukray: error: data path not found: {tmp_path / 'does-not-exist'}"
    assert not (tmp_path / "X").exists()


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--data", "EMPTY", "--weights", "random"], 3, "no class folders"),
        (["--data", "SINGLE", "--weights", "random"], 3, "at least two classes"),
        (["--data", "TINY", "--weights", "nope.pth"], 4, "no such file"),
        (["--data", "TINY", "--weights", "random", "--sweep.timeout_s", "soon"], 2, "must be a number"),
        (["--data", "TINY", "--weights", "random", "--address", "h:1", "--num-cpus", "2"], 2, "--num-cpus"),
        (["--weights", "random"], 2, "no data given"),
    ],
)
def test_exit_codes_say_whose_problem_it_is(tiny_cells, tmp_path, capsys, argv, code, message):
    (tmp_path / "empty").mkdir()
    shutil.copytree(tiny_cells / "fold_0" / "all", tmp_path / "single" / "all")
    places = {"EMPTY": tmp_path / "empty", "SINGLE": tmp_path / "single", "TINY": tiny_cells}
    argv = [str(places.get(a, a)) for a in argv]
    assert main(["run", "--out", str(tmp_path / "run"), *argv, "--json"]) == code
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and message in captured.err
    final = _json_lines(captured.out)[-1]
    assert final["status"] == "error" and final["exit_code"] == code and message in final["message"]


def test_a_usage_error_under_json_still_ends_with_a_summary(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "--json", "--no-such-option", "1"])
    assert exited.value.code == 2
    final = _json_lines(capsys.readouterr().out)[-1]
    assert final["event"] == "summary" and final["exit_code"] == 2 and final["status"] == "error"


def test_ray_that_cannot_attach_is_exit_5(tiny_cells, tmp_path):
    result = _cli(
        "run", "--data", str(tiny_cells), "--out", "run", "--weights", "random", "--address", "localhost:notaport",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 5, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("leukray: error: ")]
    assert line == [line[0]] and "cannot attach to the Ray cluster at localhost:notaport" in line[0]


# -- a real run under --json, then `runs` and `report` on it ------------------------------------

FAST = [
    "--weights", "random", "--preprocess.size", "64", "--extract.batch_size", "16",
    "--classifiers", "GaussianNB,LogisticRegression,CategoricalNB", "--train.enabled", "false",
    "--sweep.tune_trials", "0", "--sweep.cv_folds", "0", "--sweep.timeout_s", "120",
]  # fmt: skip


@pytest.fixture(scope="module")
def json_run(ray_local, tiny_cells, tmp_path_factory):
    """`leukray run --json` with the run folder from the YAML's `out:` (no --out)."""
    root = tmp_path_factory.mktemp("runs")
    (root / "cfg.yaml").write_text(f"out: {root / 'r1'}\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["run", "--data", str(tiny_cells), "--config", str(root / "cfg.yaml"), *FAST, "--json"])
    assert code == 0, stderr.getvalue()[-3000:]
    return root, stdout.getvalue(), stderr.getvalue()


@pytest.mark.slow
class TestRunFolders:
    def test_json_lines_carry_stage_events_and_the_summary(self, json_run):
        root, stdout, _ = json_run
        events = _json_lines(stdout)  # every stdout line is JSON
        names = [(e["event"], e.get("stage")) for e in events]
        assert names[0] == ("start", None) and names[-1] == ("summary", None)
        for stage in ("extract", "tune"):
            assert names.index(("stage_start", stage)) < names.index(("stage_end", stage))
        assert ("stage_start", "train") not in names  # train.enabled false
        summary = json.loads((root / "r1" / "summary.json").read_text())
        final = events[-1]
        assert final["status"] == "ok" and final["exit_code"] == 0 and final["out"] == str(root / "r1")
        assert final["chosen_model"]["name"] == summary["chosen_model"]["name"]
        assert final["files"] == ["leaderboard.md", "report.html", "model/"]

    def test_human_text_goes_to_stderr_with_test_and_validation_labelled(self, json_run):
        _, _, stderr = json_run
        sweep = [ln for ln in stderr.splitlines() if ln.startswith("[sweep] GaussianNB")]
        assert sweep and "val bal.acc" in sweep[0] and "test bal.acc" in sweep[0]
        assert "(test-split metrics; Val Balanced Accuracy on the validation split; trunk weights: random-init)" in (
            stderr
        )
        assert "Not scored: CategoricalNB (failed: needs non-negative inputs" in stderr

    def test_runs_lists_complete_and_partial_folders(self, json_run, tmp_path, capsys):
        root, _, _ = json_run
        shutil.copytree(root / "r1", tmp_path / "a-complete")
        shutil.copytree(root / "r1", tmp_path / "b-partial", ignore=shutil.ignore_patterns("summary.json", "model"))
        (tmp_path / "not-a-run").mkdir()
        assert main(["runs", str(tmp_path), "--json"]) == 0
        events = _json_lines(capsys.readouterr().out)
        runs = {Path(e["run"]).name: e for e in events if e["event"] == "run"}
        assert set(runs) == {"a-complete", "b-partial"}
        summary = json.loads((root / "r1" / "summary.json").read_text())
        complete = runs["a-complete"]
        assert complete["status"] == "complete" and complete["weights"] == "random-init"
        assert complete["chosen_model"] == summary["chosen_model"]["name"]
        assert complete["test_balanced_accuracy"] == pytest.approx(summary["chosen_model"]["test"]["Balanced Accuracy"])
        assert runs["b-partial"]["status"] == "partial" and runs["b-partial"]["stages"] == ["extract"]
        assert events[-1]["runs"] == 2 and events[-1]["complete"] == 1
        assert main(["runs", str(tmp_path)]) == 0
        table = capsys.readouterr().out
        assert "partial (extract)" in table and summary["chosen_model"]["name"] in table

    def test_report_rerenders_a_run(self, json_run, tmp_path, capsys):
        root, _, _ = json_run
        run = tmp_path / "run"
        shutil.copytree(root / "r1", run)
        (run / "report.html").unlink()
        shutil.rmtree(run / "figures")
        assert main(["report", str(run)]) == 0
        page = (run / "report.html").read_text()
        summary = json.loads((run / "summary.json").read_text())
        assert summary["chosen_model"]["name"] in page and (run / "figures" / "confusion_matrix.png").is_file()
        assert capsys.readouterr().out.strip().startswith(f"wrote {run / 'report.html'}")
        assert main(["report", str(tmp_path / "nothing")]) == 2
        (tmp_path / "plain").mkdir()
        assert main(["report", str(tmp_path / "plain")]) == 2
        assert "not a run folder" in capsys.readouterr().err

    def test_report_of_an_s3_run_is_rendered_and_uploaded(self, json_run, monkeypatch, capsys):
        boto3 = pytest.importorskip("boto3")
        server_mod = pytest.importorskip("moto.server")
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            env = {
                "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                "AWS_ACCESS_KEY_ID": "leukray-test",
                "AWS_SECRET_ACCESS_KEY": "leukray-test",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
            client.create_bucket(Bucket="reports")
            root, _, _ = json_run
            for path in sorted((root / "r1").rglob("*")):
                if path.is_file() and path.name != "report.html" and "figures" not in path.parts:
                    client.upload_file(str(path), "reports", f"runs/r1/{path.relative_to(root / 'r1').as_posix()}")
            assert main(["report", "s3://reports/runs/r1", "--json"]) == 0
            final = _json_lines(capsys.readouterr().out)[-1]
            keys = {o["Key"] for o in client.list_objects_v2(Bucket="reports", Prefix="runs/r1/")["Contents"]}
            assert {"runs/r1/report.html", "runs/r1/report.md", "runs/r1/figures/confusion_matrix.png"} <= keys
            assert "report.html" in final["files"]
            page = client.get_object(Bucket="reports", Key="runs/r1/report.html")["Body"].read().decode()
            summary = json.loads((root / "r1" / "summary.json").read_text())
            assert summary["chosen_model"]["name"] in page
        finally:
            server.stop()


@pytest.mark.parametrize("stage", ["train", "tune"])
def test_later_stages_take_the_run_folder_from_the_yaml(stage, tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text(f"out: {tmp_path / 'yaml-run'}\n")
    assert main([stage, "--config", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path / 'yaml-run' / 'config.yaml'} not found" in err and "leukray extract" in err
    assert main([stage]) == 2
    assert "no output folder: pass --out RUN or set `out:`" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--cells", "0"], "cells must be at least 4, got 0"), (["--workers", "0"], "workers must be at least 1, got 0")],
)
def test_synth_counts_that_cannot_make_a_data_set_are_one_line_exit_2(tmp_path, capsys, flags, message):
    assert main(["synth", "--out", str(tmp_path / "cells"), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"leukray: error: synth: {message}"
    assert not (tmp_path / "cells").exists()
