"""The result parts of a screen (`OUT/parts/*.parquet`): each holds the finished slides of
one stretch of the stream — every row of each (cells, and the slide's own row when it could
not be read or had no cells), its thumbnail and its most suspicious crops — and names them,
with the identity of what produced them (bundle, data, detection settings), in its Parquet
metadata, with the slides among them that could not be read and why (a rerun reads those
again: on network storage a read error can be transient). A part is written whole under a
temporary name and renamed, so a screen killed at any moment leaves only complete parts; a
rerun skips their slides and screens the rest.

May import: pandas, pyarrow, `leukray.io.storage`, `leukray.io.tables`.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.parquet as pq

from leukray.io import storage
from leukray.io.tables import read_parquet, write_parquet

PARTS_DIR = "parts"
MEDIA_COLUMNS = ["slide", "cell_index", "thumbnail", "thumb_scale", "crop_jpeg"]


@dataclass(frozen=True)
class Part:
    """One part file: where it is, what produced it, the slides it holds, and those of them
    that could not be read (slide -> reason)."""

    path: str
    identity: str
    slides: tuple[str, ...]
    failed: dict[str, str] = field(default_factory=dict)


def part_name(attempt: str, index: int) -> str:
    """`<attempt>-<index>.parquet`: an attempt's parts never collide with another's."""
    return f"{attempt}-{index:05d}.parquet"


def new_attempt() -> str:
    return uuid.uuid4().hex[:10]


def write_part(
    out: str,
    name: str,
    rows: pd.DataFrame,
    identity: str,
    provenance: dict[str, str],
    failed: dict[str, str] | None = None,
) -> Part:
    """Write `rows` (whole slides only) as OUT/parts/`name`, atomically; `failed`: the slides
    among them that could not be read, with the reason."""
    slides = tuple(sorted(set(map(str, rows["slide"]))))
    failed = dict(sorted((failed or {}).items()))
    path = storage.join(out, PARTS_DIR, name)
    described = {**provenance, "part_identity": identity, "slides": json.dumps(slides), "failed": json.dumps(failed)}
    write_parquet(path, rows.reset_index(drop=True), described)
    return Part(path, identity, slides, failed)


def _read_part(path: str) -> Part | None:
    fs, inner = storage.resolve(path)
    try:
        meta = json.loads(pq.read_schema(inner, filesystem=fs).metadata[b"leukray"])
        failed = {str(k): str(v) for k, v in json.loads(meta.get("failed", "{}")).items()}
        return Part(path, str(meta["part_identity"]), tuple(json.loads(meta["slides"])), failed)
    except (OSError, KeyError, TypeError, ValueError):  # not a part (or cut short by a copy)
        return None


def list_parts(out: str) -> tuple[list[Part], list[str]]:
    """The parts in OUT/parts, sorted by name, and the other files there (temporary files
    of a killed attempt, unreadable parts), by path."""
    root = storage.join(out, PARTS_DIR)
    if not storage.exists(root):
        return [], []
    parts, other = [], []
    for path in storage.list_files(root):
        part = _read_part(path) if path.endswith(".parquet") else None
        if part is None:
            other.append(path)
        else:
            parts.append(part)
    return parts, other


def slide_owners(parts: list[Part], identity: str) -> tuple[dict[str, Part], list[tuple[str, str, Part]]]:
    """Which part holds each slide's result, among the parts of `identity`: the first (by
    name) that read it, else the first that holds it (every attempt failed to read it). Also
    every failed read in those parts, as (slide, reason, part), in part order."""
    owners: dict[str, Part] = {}
    failures = []
    for part in parts:
        if part.identity != identity:
            continue
        failures += [(slide, reason, part) for slide, reason in part.failed.items()]
        for slide in part.slides:
            if slide not in owners or (slide in owners[slide].failed and slide not in part.failed):
                owners[slide] = part
    return owners, failures


def read_rows(part: Part, columns: list[str]) -> pd.DataFrame:
    """A part's rows, `columns` only (the review's images stay on disk)."""
    return read_parquet(part.path, columns)


@functools.lru_cache(maxsize=4)
def _media(path: str) -> pd.DataFrame:
    # The review visits slides in its own order (flagged first): a few parts stay cached.
    media = read_parquet(path, MEDIA_COLUMNS)
    keep = (media["thumbnail"].str.len() > 0) | (media["crop_jpeg"].str.len() > 0)
    return media[keep].reset_index(drop=True)


def read_media(part_path: str, slide: str) -> tuple[bytes, float, dict[int, bytes]]:
    """One slide's thumbnail (JPEG, b"" when the field did not decode), its scale
    (thumbnail px per field px), and the JPEG crops the part kept, by cell index."""
    media = _media(part_path)
    own = media[media["slide"] == slide]
    thumbs = own[own["thumbnail"].str.len() > 0]
    thumb, scale = (
        (bytes(thumbs["thumbnail"].iloc[0]), float(thumbs["thumb_scale"].iloc[0])) if len(thumbs) else (b"", 0.0)
    )
    crops = own[own["crop_jpeg"].str.len() > 0]
    return thumb, scale, {int(i): bytes(c) for i, c in zip(crops["cell_index"], crops["crop_jpeg"])}


def forget_media() -> None:
    """Drop the cached parts (a part file rewritten under the same name is read again)."""
    _media.cache_clear()
