"""The run journal (`RUN/run.json`): which stages of a run folder finished, with which
settings, and the sha256 of every file each one wrote. Readers trust the journal over loose
files, so a stage killed half-way, a rerun with other settings or a table left by an earlier
run can never be mistaken for this run's results.

A stage `begin`s (its entry and those of the stages after it are dropped first, and their
files deleted, before anything is written), writes its files (each one atomically), and
`commit`s (the files that appeared or changed since it began, hashed). This works the same
on local folders and object stores: the only thing that must be atomic is one small write
of run.json.

Kept out of any stage's files: config.yaml and run.json (every stage rewrites them),
`model/` (the bundle, replaced whole by its own writer only once the new one is complete),
Ray Train/Tune's storage (`train/`, `tune/`, named by identity) and the trunk maps' shards
(`maps/<identity>/`, `leukray.io.mapshards`: their own manifest, removed after training). Files that were in the
folder before a stage began (e.g. `RUN/data` of `leukray demo`) are never touched.

May import: `leukray.errors`, `leukray.io.storage`.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from leukray.errors import ConfigError, DataError, InputNotFoundError
from leukray.io import storage

JOURNAL_FILE = "run.json"
STAGES = ("extract", "train", "tune")
UNTRACKED_FILES = ("config.yaml", JOURNAL_FILE)
UNTRACKED_DIRS = ("model/", "train/", "tune/", "maps/")
EXISTING_MODES = ("refuse", "overwrite", "resume")


def identity_of(*parts: Any) -> str:
    """A stable hash of JSON-able parts (settings, fingerprints, upstream identities)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def read_journal(out: str) -> dict[str, Any] | None:
    path = storage.join(out, JOURNAL_FILE)
    if not storage.exists(path):
        return None
    try:
        journal = json.loads(storage.read_bytes(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON: pass --overwrite to start the run again") from None
    if not isinstance(journal, dict) or not isinstance(journal.get("stages"), dict):
        raise DataError(f"{path} is not a leukray run journal: pass --overwrite to start the run again")
    return journal


def _write(out: str, journal: dict[str, Any]) -> None:
    storage.write_text(storage.join(out, JOURNAL_FILE), json.dumps(journal, indent=1, sort_keys=True) + "\n")


def _tracked(name: str) -> bool:
    return name not in UNTRACKED_FILES and not name.startswith(UNTRACKED_DIRS) and ".tmp-" not in name


def open_run(out: str, settings: dict[str, Any], existing: str) -> None:
    """Claim `out` for a run (`leukray run`/`extract`) with these settings, before any work.

    Args:
        settings: the flat settings that decide the results (`runfolder.result_settings`).
        existing: what to do with a run of other settings in `out`: refuse (one-line
            error), overwrite (delete its stages' files and start clean) or resume (keep
            the stages whose identity still matches; the others are redone).

    Raises:
        ConfigError: `out` holds a run of other settings (or a run without a journal) and
            `existing` is refuse.
    """
    if existing not in EXISTING_MODES:
        raise ConfigError(f"unknown mode {existing!r} for an existing run folder (expected {EXISTING_MODES})")
    try:
        journal = read_journal(out)
    except DataError:
        if existing != "overwrite":
            raise
        journal = None  # a broken journal: start clean like a folder from before journals
    if journal is None and storage.exists(storage.join(out, "config.yaml")) and existing != "overwrite":
        raise ConfigError(
            f"{out} holds a run without a journal (run.json), from another leukray version or another tool; "
            "pass --overwrite to start it again, or choose another --out"
        )
    if existing == "overwrite":
        _discard(out, journal, STAGES)
        if journal is None:  # a folder from before journals: its outputs sit at the top and in figures/
            _delete_legacy_outputs(out)
        journal = None
    elif journal is not None and existing == "refuse":
        changed = [
            k
            for k in sorted(set(settings) | set(journal.get("settings", {})))
            if settings.get(k) != journal.get("settings", {}).get(k)
        ]
        if changed:
            before = journal.get("settings", {})
            shown = ", ".join(f"{k} {before.get(k)!r} -> {settings.get(k)!r}" for k in changed[:3])
            raise ConfigError(
                f"{out} holds a run made with other data or settings ({shown}{', ...' if len(changed) > 3 else ''}); "
                "pass --overwrite to start it again, --resume to reuse the stages that still match, "
                "or choose another --out"
            )
    journal = journal or {"format": 1, "stages": {}}
    journal["settings"] = settings
    storage.makedirs(out)
    _write(out, journal)


def refuse_other(out: str, stage: str, identity: str, what: str) -> None:
    """One-line refusal when `stage` of `out` finished with another identity (`what` says
    what differs, e.g. the data's fingerprint)."""
    entry = ((read_journal(out) or {"stages": {}})["stages"]).get(stage)
    if entry and entry.get("state") == "done" and entry.get("identity") != identity:
        raise ConfigError(
            f"{out} holds a run made with other data or settings ({what}); pass --overwrite to start it again, "
            "--resume to reuse the stages that still match, or choose another --out"
        )


def committed(out: str, stage: str, identity: str) -> bool:
    """Whether `stage` finished in `out` with this identity (and its files are intact)."""
    journal = read_journal(out)
    entry = (journal or {"stages": {}})["stages"].get(stage)
    if not entry or entry.get("state") != "done" or entry.get("identity") != identity:
        return False
    try:
        verify(out, stage, "resume")
    except DataError:
        return False
    return True


def begin(out: str, stage: str, identity: str, facts: dict[str, Any] | None = None) -> None:
    """Start `stage`: drop it and the later stages from the journal and delete their files
    (and whatever an unfinished attempt left), then record it as running."""
    journal = read_journal(out) or {"format": 1, "stages": {}, "settings": {}}
    later = STAGES[STAGES.index(stage) :]
    _discard(out, journal, later)
    journal["stages"][stage] = {
        "state": "running",
        "identity": identity,
        "started": time.time(),
        "before": {k: list(v) for k, v in storage.file_signatures(out).items() if _tracked(k)},
        **({"facts": facts} if facts else {}),
    }
    _write(out, journal)


def discard(out: str, stage: str) -> None:
    """Forget `stage` and the stages after it and delete their files (e.g. the custom model
    of an earlier run when this one does not train)."""
    journal = read_journal(out)
    if journal is not None:
        _discard(out, journal, STAGES[STAGES.index(stage) :])
        _write(out, journal)


def _discard(out: str, journal: dict[str, Any] | None, stages: tuple[str, ...]) -> None:
    """Delete the files of `stages` (committed, or left by an unfinished attempt) and drop
    their entries; the journal is written first, so a crash in between loses nothing."""
    if journal is None:
        return
    now = storage.file_signatures(out)
    doomed: set[str] = set()
    for stage in stages:
        entry = journal["stages"].pop(stage, None) or {}
        doomed |= set(entry.get("files", {}))
        if entry.get("state") == "running":
            before = {k: tuple(v) for k, v in entry.get("before", {}).items()}
            doomed |= {k for k, sig in now.items() if _tracked(k) and before.get(k) != sig}
    _write(out, journal)
    for name in sorted(doomed & set(now)):
        storage.delete(storage.join(out, name))


def _delete_legacy_outputs(out: str) -> None:
    for name in storage.file_signatures(out):
        if _tracked(name) and ("/" not in name or name.startswith(("figures/", "custom_model/"))):
            storage.delete(storage.join(out, name))


def commit(out: str, stage: str) -> dict[str, str]:
    """Finish `stage`: hash the files it wrote (those that appeared or changed since it
    began) into the journal. Returns {relative path: sha256}."""
    journal = read_journal(out)
    entry = (journal or {"stages": {}})["stages"].get(stage)
    if entry is None or entry.get("state") != "running":
        raise DataError(f"{out}: the {stage} stage was not begun in this run folder's journal (another job took over?)")
    before = {k: tuple(v) for k, v in entry.pop("before", {}).items()}
    now = storage.file_signatures(out)
    files = {
        k: storage.sha256_of(storage.join(out, k))
        for k, sig in sorted(now.items())
        if _tracked(k) and before.get(k) != sig
    }
    entry.update(state="done", files=files, finished=time.time())
    _write(out, journal)
    return files


def verify(out: str, stage: str, needed_by: str) -> dict[str, Any]:
    """The journal entry of a finished stage whose files are all intact.

    Raises:
        DataError: the stage never finished (killed, still running, or never run), or one
            of its files is missing or changed since (one line, naming what to rerun).
    """
    journal = read_journal(out)
    entry = (journal or {"stages": {}})["stages"].get(stage)
    rerun = f"rerun `leukray {stage} --out {out}`"
    if journal is None:
        path = storage.join(out, JOURNAL_FILE)
        raise InputNotFoundError(
            f"{path} not found: `leukray {needed_by}` needs a run folder that `leukray {stage}` wrote"
        )
    if entry is None or entry.get("state") != "done":
        state = "never ran" if entry is None else "did not finish (killed, or still running)"
        raise DataError(f"the {stage} stage of {out} {state}: {rerun}")
    for name, digest in entry["files"].items():
        path = storage.join(out, name)
        if not storage.exists(path):
            raise DataError(f"{path} not found: it was written by the {stage} stage of {out}; {rerun}")
        if storage.sha256_of(path) != digest:
            raise DataError(f"{path} changed after the {stage} stage finished; {rerun}")
    return entry
