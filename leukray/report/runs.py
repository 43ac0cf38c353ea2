"""`leukray runs DIR`: one line per run folder under DIR, from the files each run wrote —
data, trunk weights, the chosen model and its test balanced accuracy, and whether the run
is complete (summary.json and the model bundle written) or partial (which stages ran).

May import: pandas, yaml, `leukray.io`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd
import yaml

from leukray.io import storage

# The records a stage leaves; a folder with none of them is not a run folder.
RUN_MARKERS = ("config.yaml", "extract.json", "summary.json")
STAGE_RECORDS = (("extract", "extract.json"), ("train", "train.json"), ("tune", "summary.json"))
COLUMNS = ["run", "status", "data", "weights", "chosen model", "test bal.acc", "chosen by"]


def list_runs(root: str) -> list[dict[str, Any]]:
    """The run folders directly under `root` (or `root` itself when it is one), sorted by name."""
    candidates = [root] if _is_run(root) else storage.list_dirs(root)
    return [describe_run(path) for path in candidates if _is_run(path)]


def _is_run(path: str) -> bool:
    return any(storage.exists(storage.join(path, name)) for name in RUN_MARKERS)


def _read(path: str, name: str) -> tuple[dict[str, Any] | None, str]:
    """A JSON or YAML record as a mapping, or (None, why not)."""
    full = storage.join(path, name)
    if not storage.exists(full):
        return None, ""
    try:
        text = storage.read_bytes(full).decode("utf-8")
        value = yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)
    except Exception as exc:  # noqa: BLE001 - a damaged record is reported, not fatal to the listing
        return None, f"{name} unreadable ({type(exc).__name__})"
    return (value, "") if isinstance(value, dict) else (None, f"{name} is not a mapping")


def describe_run(path: str) -> dict[str, Any]:
    """What `leukray runs` shows for one run folder (the JSON event carries the same keys)."""
    config, config_problem = _read(path, "config.yaml")
    extract, extract_problem = _read(path, "extract.json")
    summary, summary_problem = _read(path, "summary.json")
    data_cfg = (config or {}).get("data") or {}
    data = (summary or {}).get("data") or data_cfg
    weights = (summary or extract or {}).get("weights") or {}
    chosen = (summary or {}).get("chosen_model") or (summary or {}).get("best_model") or {}
    stages = [stage for stage, record in STAGE_RECORDS if storage.exists(storage.join(path, record))]
    complete = summary is not None and storage.exists(storage.join(path, "model", "bundle.json"))
    problems = [p for p in (config_problem, extract_problem, summary_problem) if p]
    status = "complete" if complete and not problems else "partial"
    test = (chosen.get("test") or {}).get("Balanced Accuracy")
    return {
        "run": path,
        "status": status,
        "stages": stages,
        "problems": problems,
        "data": str(data.get("path") or "") + (f" + {data['test_path']}" if data.get("test_path") else ""),
        "weights": weights.get("name") or (config or {}).get("extract", {}).get("weights", ""),
        "pretrained": weights.get("is_pretrained"),
        "chosen_model": chosen.get("name"),
        "feature_source": chosen.get("feature_source"),
        "chosen_by": chosen.get("chosen_by"),
        "test_balanced_accuracy": test if isinstance(test, (int, float)) and not math.isnan(test) else None,
        "report": storage.exists(storage.join(path, "report.html")),
    }


def format_runs(runs: list[dict[str, Any]]) -> str:
    """The table `leukray runs` prints."""
    rows = []
    for run in runs:
        status = run["status"] if run["status"] == "complete" else f"partial ({'+'.join(run['stages']) or 'none'})"
        if run["problems"]:
            status += "; " + "; ".join(run["problems"])
        model = run["chosen_model"] or "-"
        if run["feature_source"]:
            model += f" on {run['feature_source']}"
        score = run["test_balanced_accuracy"]
        rows.append(
            {
                "run": run["run"],
                "status": status,
                "data": run["data"] or "-",
                "weights": run["weights"] or "-",
                "chosen model": model,
                "test bal.acc": "-" if score is None else f"{score:.4f}",
                "chosen by": run["chosen_by"] or "-",
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS).to_string(index=False)
