"""Find the images of a dataset, their labels and subjects, and their duplicates.

Layouts:
- C-NMC: `fold_*/{all,hem}/UID_<subject>_<image>_<cell>_<all|hem>.<ext>` or `{all,hem}/...`;
- any class-per-folder tree: each immediate subfolder is a class (files below it, recursive);
- a CSV manifest with columns `path,label[,subject]` (relative paths are relative to the CSV).
Roots can be local paths or filesystem URIs (s3://, gs://), and several roots can be given at
once, comma-separated (`C-NMC/fold_0,C-NMC/fold_1`: C-NMC's folds as they ship).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from leukray.errors import DataError, InputNotFoundError
from leukray.io import storage

IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")
CNMC_NAME = re.compile(
    r"^UID_(?P<subject>[A-Za-z]*\d+)_(?P<image>\d+)_(?P<cell>\d+)_(?P<label>all|hem)$", re.IGNORECASE
)
CNMC_CLASSES = ("all", "hem")
NO_SUBJECT = ""


@dataclass(frozen=True)
class CnmcName:
    subject: str
    image: int
    cell: int
    label: str


def parse_cnmc_name(path: str) -> CnmcName | None:
    """Parse a C-NMC file name. Subjects are upper-cased: `UID_h3_…` and `UID_H3_…` are the
    same subject (real C-NMC mixes the two). Returns None for other names."""
    stem = posixpath.basename(str(path).replace("\\", "/")).rsplit(".", 1)[0]
    match = CNMC_NAME.match(stem)
    if match is None:
        return None
    return CnmcName(
        subject=match["subject"].upper(),
        image=int(match["image"]),
        cell=int(match["cell"]),
        label=match["label"].lower(),
    )


def _extension(path: str) -> str:
    base = posixpath.basename(path.replace("\\", "/"))
    return "." + base.rsplit(".", 1)[1].lower() if "." in base else ""


def _basename(path: str) -> str:
    return posixpath.basename(path.replace("\\", "/"))


def detect_layout(root: str) -> str:
    if root.lower().endswith(".csv"):
        return "csv"
    names = {_basename(d).lower() for d in storage.list_dirs(root)}
    if any(n.startswith("fold_") for n in names) or set(CNMC_CLASSES) <= names:
        return "cnmc"
    return "folders"


def split_roots(spec: str) -> list[str]:
    """The roots of a `data.path` / `data.test_path` value: one, or several comma-separated
    (`--data A --data B` on the command line gives "A,B").

    Raises:
        DataError: an empty entry, a root given twice, or one root inside another (its images
            would be listed twice).
    """
    roots = [root.strip() for root in spec.split(",")]
    if any(not root for root in roots):
        raise DataError(f"empty entry in the list of data roots {spec!r} (comma-separated, e.g. A,B)")
    bare = [root.rstrip("/") for root in roots]
    for i, outer in enumerate(bare):
        for inner in bare[i + 1 :]:
            if inner == outer or inner.startswith(outer + "/") or outer.startswith(inner + "/"):
                raise DataError(f"data roots overlap: {outer} and {inner} (each image must be listed once)")
    return roots


def discover(root: str, layout: str = "auto", allowed: tuple[str, ...] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List a dataset: one root, or several comma-separated (see `split_roots`).

    Returns:
        (images, skipped): `images` has columns path, label, subject (upper-case; "" when
        the layout carries none); `skipped` has path, stage, reason for files that are not
        images (e.g. `notes.txt`), so nothing is dropped silently.

    Raises:
        DataError: a root does not exist or holds no images, the roots overlap, or all of
            them together have fewer than two classes.
    """
    if not root:
        raise DataError("no data given: pass --data DIR (or a CSV manifest)")
    found = [_discover_root(one, layout, allowed) for one in split_roots(root)]
    images = pd.concat([f[0] for f in found], ignore_index=True)
    skipped = pd.concat([f[1] for f in found], ignore_index=True)
    labels = sorted(images["label"].unique())
    if len(labels) < 2:
        raise DataError(f"need at least two classes, found only {labels[0]!r} in {root}")
    images = images.sort_values("path", kind="stable").reset_index(drop=True)
    return images, skipped


def _discover_root(root: str, layout: str, allowed: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    info = storage.file_info(root)
    if info.type.name == "NotFound":
        raise InputNotFoundError(f"data path not found: {root}")
    if layout == "auto":
        layout = "csv" if info.type.name == "File" else detect_layout(root)
    if layout == "csv":
        images, skipped = _discover_csv(root, allowed)
    else:
        if info.type.name != "Directory":
            raise DataError(f"data path is not a folder: {root} (use a CSV manifest ending in .csv)")
        images, skipped = _discover_tree(root, cnmc=(layout == "cnmc"))
    if images.empty:
        raise DataError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return images, skipped


def _discover_tree(root: str, cnmc: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    class_dirs: list[tuple[str, str]] = []  # (label, directory)
    if cnmc:
        top = storage.list_dirs(root)
        folds = [d for d in top if _basename(d).lower().startswith("fold_")]
        for parent in folds or [root]:
            for d in storage.list_dirs(parent):
                if _basename(d).lower() in CNMC_CLASSES:
                    class_dirs.append((_basename(d).lower(), d))
    else:
        class_dirs = [(_basename(d), d) for d in storage.list_dirs(root) if not _basename(d).startswith(".")]
    rows, skipped = [], []
    for label, directory in class_dirs:
        for path in storage.list_files(directory):
            ext = _extension(path)
            if ext not in IMAGE_EXTENSIONS:
                skipped.append((path, "discover", f"not an image file extension ({ext or 'none'})"))
                continue
            parsed = parse_cnmc_name(path)
            if parsed is not None and cnmc and parsed.label != label:
                skipped.append(
                    (path, "discover", f"label in the file name ({parsed.label}) contradicts its folder ({label})")
                )
                continue
            rows.append((path, label, parsed.subject if parsed else NO_SUBJECT))
    if not class_dirs:
        hint = "fold_*/{all,hem}/ or {all,hem}/" if cnmc else "one subfolder per class"
        raise DataError(f"no class folders in {root} (expected {hint})")
    return (
        pd.DataFrame(rows, columns=["path", "label", "subject"]),
        pd.DataFrame(skipped, columns=["path", "stage", "reason"]),
    )


def _discover_csv(manifest: str, allowed: tuple[str, ...] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    import io

    try:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(manifest)), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(
            f"cannot read manifest {manifest}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise DataError(
            f"manifest {manifest} lacks column(s) {', '.join(sorted(missing))} (needs path,label[,subject])"
        )
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."

    def absolute(p: str) -> str:
        if storage.is_uri(p) or p.startswith("/"):
            return p
        return storage.join(base, p) if storage.is_uri(base) else str(storage.resolve(storage.join(base, p))[1])

    paths = table["path"].map(absolute)
    subjects = (
        table["subject"].str.upper()
        if "subject" in table.columns
        else paths.map(lambda p: parse_cnmc_name(p).subject if parse_cnmc_name(p) else NO_SUBJECT)
    )
    images = pd.DataFrame({"path": paths, "label": table["label"].str.strip(), "subject": subjects.fillna(NO_SUBJECT)})
    reasons = images["path"].map(lambda p: storage.refused_path(p, base, allowed, IMAGE_EXTENSIONS))
    reasons = reasons.where(reasons != "", images["label"].map(lambda x: "" if x else "empty label in manifest"))
    bad = reasons != ""
    skipped = pd.DataFrame({"path": images.loc[bad, "path"], "stage": "discover", "reason": reasons[bad]})
    return images[~bad], skipped


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Files read and hashed at once in one hashing task: an object store answers each read
# after tens of milliseconds, and reads and sha256 both release the GIL, so a task's reads
# overlap instead of queueing (s3:// data); on local files it changes little.
HASH_THREADS = 8


def _hash_one(path: str, read_bytes) -> tuple[str, str]:
    """(sha256, "") of one file, or ("", the reason it could not be read)."""
    try:
        return content_hash(read_bytes(path)), ""
    except FileNotFoundError:
        return "", "file not found"
    except OSError as exc:
        return "", f"could not read: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def hash_files(batch: dict[str, np.ndarray], read_bytes) -> dict[str, np.ndarray]:
    """Ray Data batch function: sha256 of each file's bytes ("" and an error when unreadable),
    up to `HASH_THREADS` files at once."""
    paths = [str(p) for p in batch["path"]]
    with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(paths)))) as pool:
        results = list(pool.map(lambda p: _hash_one(p, read_bytes), paths))
    return {
        "path": batch["path"],
        "sha256": np.asarray([h for h, _ in results], dtype=object),
        "read_error": np.asarray([e for _, e in results], dtype=object),
    }


def mark_duplicates(images: pd.DataFrame) -> pd.Series:
    """For each row, the path of the first (by path) byte-identical image, or "" if it is
    the first. Real C-NMC holds byte-identical images under different subject IDs; they
    must be kept once before a subject-level split, or the split leaks.

    Args:
        images: columns path and sha256 ("" = unreadable, never a duplicate).
    """
    ordered = images.sort_values("path", kind="stable")
    readable = ordered[ordered["sha256"] != ""]
    first = readable.groupby("sha256")["path"].transform("first")
    dup_of = pd.Series("", index=images.index, dtype=object)
    is_dup = first != readable["path"]
    dup_of.loc[readable.index[is_dup.to_numpy()]] = first[is_dup].to_numpy()
    return dup_of


def assign_groups(images: pd.DataFrame) -> tuple[pd.Series, str]:
    """The grouping used by subject-level splits: the subject, or the image itself where no
    subject is known. Returns (groups, description of the source)."""
    has_subject = images["subject"] != NO_SUBJECT
    groups = images["subject"].where(has_subject, "image:" + images["path"])
    if has_subject.all():
        return groups, "subject IDs"
    if not has_subject.any():
        return (
            groups,
            "none: no subject IDs found, each image is its own group (a subject-level split cannot be guaranteed)",
        )
    return (
        groups,
        f"subject IDs for {int(has_subject.sum())} images; "
        f"the other {int((~has_subject).sum())} are each their own group",
    )


def list_images(root: str, known_labels: list[str], allowed: tuple[str, ...] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every image below `root` (or in a CSV manifest), labelled where the layout says so,
    for prediction: no class folders are required. A label comes from a C-NMC name, else
    from the parent folder when that is one of `known_labels`, else it is "".

    Raises:
        DataError: the path does not exist or holds no images.
    """
    if not root:
        raise DataError("no data given: pass --data DIR (or a CSV manifest)")
    info = storage.file_info(root)
    if info.type.name == "NotFound":
        raise InputNotFoundError(f"data path not found: {root}")
    if info.type.name == "File" and root.lower().endswith(".csv"):
        return _discover_csv(root, allowed)
    paths = [root] if info.type.name == "File" else storage.list_files(root)
    rows, skipped = [], []
    for path in paths:
        ext = _extension(path)
        if ext not in IMAGE_EXTENSIONS:
            skipped.append((path, "discover", f"not an image file extension ({ext or 'none'})"))
            continue
        parsed = parse_cnmc_name(path)
        parent = _basename(posixpath.dirname(path.replace("\\", "/")))
        label = parsed.label if parsed else (parent if parent in known_labels else "")
        rows.append((path, label, parsed.subject if parsed else NO_SUBJECT))
    if not rows:
        raise DataError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return (
        pd.DataFrame(rows, columns=["path", "label", "subject"])
        .sort_values("path", kind="stable")
        .reset_index(drop=True),
        pd.DataFrame(skipped, columns=["path", "stage", "reason"]),
    )
