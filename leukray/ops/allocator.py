"""glibc's malloc thresholds for this process: reuse freed memory instead of faulting in
fresh pages.

Under glibc's defaults a buffer above the mmap threshold (128 KiB, adapting up to 32 MiB)
is mapped when it is allocated and unmapped when it is freed, so the kernel zeroes fresh
pages for the next one: a minor page fault per 4 KiB. Two kinds of leukray process
allocate and free the same large buffers over and over:

- preprocessing (`IMAGE`): a 450x450 image and its temporaries, a few 100-600 KB buffers;
  ~400 faults per image, ~40 % of decode + Otsu-crop's CPU time on 2 cores;
- torch on a CPU (`TENSOR`): a ResNet50 batch's activations (~100 MB each at batch 32) and
  the Table II head's 205 MB weight gradient, far above even glibc's adaptive 32 MiB. On
  2 cores the trunk extracted 9 images/s with the image thresholds and 16 with these, and
  the head trained 68 maps/s and 124 (docs/measurements.md, "Torch on a CPU").

Thresholds govern the main arena only. A thread with its own malloc arena (glibc gives each
new thread one, up to 8 per core) gets its memory from 64 MiB heaps and maps anything
larger afresh whatever the thresholds, and Ray runs torch in such threads: a Ray Data actor's
calls in a thread pool, Ray Train's loop in its training thread. `worker_env` is the
environment for those processes: one arena (``MALLOC_ARENA_MAX=1``, read by glibc when the
process starts), so that every thread's batches come from the heap the thresholds keep
(measured: the trunk in a thread 12.3 images/s, with one arena 17.1, on the main thread 16.6).

`keep_freed_memory` only ever raises the thresholds, so a process that preprocesses and
runs the trunk keeps the larger pair; the user's own ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` always wins, and a C library without ``mallopt`` (not glibc) is
left alone.

May import: the standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Iterator

__all__ = ["IMAGE", "TENSOR", "keep_freed_memory", "kept_freed_memory", "thresholds", "worker_env"]

IMAGE = (16 << 20, 64 << 20)
"""(mmap, trim) thresholds for preprocessing: allocations below 16 MiB come from the heap,
and freed heap above 64 MiB goes back to the kernel."""
TENSOR = (1 << 30, 1 << 30)
"""(mmap, trim) thresholds for a process that runs torch on a CPU: batches' activations and
gradients up to 1 GiB come from the heap and stay there for the next batch."""

ONE_ARENA = {"MALLOC_ARENA_MAX": "1"}
"""`worker_env`'s variables."""

_GLIBC_DEFAULT = (128 << 10, 128 << 10)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_set: tuple[int, int] | None = None  # what this module last set; None: glibc's own


def thresholds() -> tuple[int, int] | None:
    """The (mmap, trim) thresholds this module set in this process, or None (glibc's own)."""
    return _set


def worker_env() -> dict[str, str]:
    """Environment variables for a process started to run torch from a thread other than its
    main one (a Ray actor's ``runtime_env``): one malloc arena, so that `TENSOR`'s
    thresholds hold in every thread. Empty where this process's user chose
    ``MALLOC_ARENA_MAX`` (or the thresholds) themselves: their setting is theirs to pass on."""
    if any(name in os.environ for name in (*ONE_ARENA, *_USER_VARIABLES)):
        return {}
    return dict(ONE_ARENA)


def _mallopt():
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None


def _apply(mmap_threshold: int, trim_threshold: int) -> bool:
    global _set
    mallopt = _mallopt()
    if mallopt is None:  # pragma: no cover - not glibc
        return False
    if not (mallopt(_M_TRIM_THRESHOLD, trim_threshold) and mallopt(_M_MMAP_THRESHOLD, mmap_threshold)):
        return False  # a C library that caps the thresholds lower: leave the record as it was
    _set = (mmap_threshold, trim_threshold)
    return True


def keep_freed_memory(mmap_threshold: int, trim_threshold: int) -> bool:
    """Raises this process's mmap and trim thresholds to at least these (bytes).

    Returns:
        True when the process now runs with thresholds at least this large (set here or
        before); False where the user's own variables or the C library decide.
    """
    if any(name in os.environ for name in _USER_VARIABLES):
        return False
    if _set is not None and _set[0] >= mmap_threshold and _set[1] >= trim_threshold:
        return True
    current = _set or (0, 0)
    return _apply(max(mmap_threshold, current[0]), max(trim_threshold, current[1]))


@contextlib.contextmanager
def kept_freed_memory(mmap_threshold: int, trim_threshold: int) -> Iterator[bool]:
    """`keep_freed_memory` for a block, then the thresholds as they were before it (and the
    freed heap handed back): for a process that runs torch briefly, such as a driver
    measuring a baseline, whose memory is measured afterwards."""
    global _set
    before = _set
    try:
        yield keep_freed_memory(mmap_threshold, trim_threshold)
    finally:
        if _set != before and _apply(*(before or _GLIBC_DEFAULT)):
            _set = before  # None again where glibc's own were in force before
            ctypes.CDLL(None).malloc_trim(0)
