"""Local paths and filesystem URIs (s3://, gs://, ...) through one pyarrow.fs code path.

Outputs are written atomically: to a temporary name beside the target, then renamed, so a
failed job never leaves a half-written file that looks complete. (Object stores commit a
whole object on close, which is atomic already.)
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import tempfile
import uuid

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


@functools.lru_cache(maxsize=32)
def _filesystem_for(scheme_and_host: str) -> pafs.FileSystem:
    fs, _ = pafs.FileSystem.from_uri(scheme_and_host)
    return fs


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or URI."""
    if path.startswith("file://"):
        path = path[len("file://") :]
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    scheme, rest = path.split("://", 1)
    host = rest.split("/", 1)[0]
    if scheme in ("s3", "gs", "gcs"):
        # Bucket-addressed stores: the path inside is "bucket/key"; reuse one client per bucket.
        return _filesystem_for(f"{scheme}://{host}"), rest
    return pafs.FileSystem.from_uri(path)


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def full_name(fs: pafs.FileSystem, inner: str, like: str) -> str:
    """Turn a path inside `fs` back into what the user would write (URI or local path)."""
    if is_uri(like):
        return f"{like.split('://', 1)[0]}://{inner}"
    return inner


def _normalised(path: str) -> str:
    """A path or URI with `.`/`..` resolved (local: absolute)."""
    if is_uri(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
    return os.path.normpath(os.path.abspath(os.path.expanduser(path.removeprefix("file://"))))


def refused_path(path: str, folder: str, allowed: tuple[str, ...], extensions: tuple[str, ...]) -> str:
    """Why a path listed in a manifest file is refused ("" when it is not): it must lie in
    `folder` (the manifest's own) or under one of the `allowed` prefixes, and end in one of
    `extensions`. `../../etc/passwd`, absolute paths elsewhere and other buckets are refused.
    """
    if not path.lower().endswith(extensions):
        return f"not an image file extension (manifest entries must end in {', '.join(extensions)})"
    where = _normalised(path)
    for root in (folder, *allowed):
        base = _normalised(root).rstrip("/" if is_uri(root) else os.sep)
        sep = "/" if is_uri(root) else os.sep
        if where.startswith(base + sep):
            return ""
    return f"outside the manifest's folder {folder} (allow other places with data.allowed_prefixes)"


def file_info(path: str) -> pafs.FileInfo:
    fs, inner = resolve(path)
    return fs.get_file_info(inner)


def exists(path: str) -> bool:
    return file_info(path).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    return file_info(path).type == pafs.FileType.Directory


def list_files(root: str) -> list[str]:
    """Every file below `root` (recursive), as full paths/URIs, sorted."""
    fs, inner = resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    return sorted(full_name(fs, i.path, root) for i in infos if i.type == pafs.FileType.File)


def list_dirs(root: str) -> list[str]:
    """Immediate subdirectories of `root`, as full paths/URIs, sorted."""
    fs, inner = resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    return sorted(full_name(fs, i.path, root) for i in infos if i.type == pafs.FileType.Directory)


def file_signatures(root: str) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every file below `root`, keyed by its path relative to `root`
    ("/"-separated); empty when `root` does not exist."""
    fs, inner = resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    prefix = inner.rstrip("/") + "/"
    return {
        i.path[len(prefix) :]: (int(i.size or 0), int(i.mtime_ns or 0))
        for i in infos
        if i.type == pafs.FileType.File and i.path.startswith(prefix)
    }


def sha256_of(path: str) -> str:
    """sha256 of a file's bytes, streamed (feature files can be large)."""
    fs, inner = resolve(path)
    digest = hashlib.sha256()
    with fs.open_input_stream(inner) as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def delete_dir(path: str) -> None:
    """Remove a folder and everything below it (nothing when it does not exist)."""
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        fs.delete_dir(inner)


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as handle:
        return handle.read()


def delete(path: str) -> None:
    fs, inner = resolve(path)
    fs.delete_file(inner)


def makedirs(path: str) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary name, then rename)."""
    fs, inner = resolve(path)
    parent = inner.rsplit("/", 1)[0] if "/" in inner else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    if is_uri(path):
        with fs.open_output_stream(inner) as handle:
            handle.write(data)
        return
    tmp = f"{inner}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, inner)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


class AtomicLocalFile:
    """A local temporary file that becomes `path` only when the block ends without error.

    For writers that need a real file handle (pyarrow's ParquetWriter streaming row groups).
    """

    def __init__(self, path: str):
        self.path = path
        self.tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> str:
        if is_uri(self.path):
            self.tmp = os.path.join(tempfile.gettempdir(), f"leukray-{uuid.uuid4().hex}")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        local_tmp = self.tmp
        try:
            if exc_type is None:
                if is_uri(self.path):
                    with open(local_tmp, "rb") as handle:
                        write_bytes(self.path, handle.read())
                else:
                    os.replace(local_tmp, self.path)
        finally:
            if os.path.exists(local_tmp):
                os.unlink(local_tmp)
