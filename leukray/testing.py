"""Test plumbing that has to run inside Ray workers, kept out of the library's code paths.

Nothing in `leukray` imports this module; tests hand these objects to the library's public
hooks:

- `KillWorkerOnce`: an `on_epoch_end` callback for `train_head` that logs which process ran
  each epoch and SIGKILLs the Ray Train worker once, after an epoch's checkpoint (the resume
  test).
- `install_extract_hook`: a Ray `worker_process_setup_hook` (given in a job's runtime env)
  that makes every extractor batch leave a file DIR/<node id>-<pid>-<n> and sleep, so a test
  sees which node is extracting and can kill it mid-stage. DIR and the seconds come from the
  job's `LEUKRAY_TEST_EXTRACT_HOOK=DIR:SECONDS` environment variable.
- `install_screen_hook`: the same for `leukray screen`'s detection of each field or tile,
  wherever it runs (a Ray Data task, or the classifier actor it is fused into), from
  `LEUKRAY_TEST_SCREEN_HOOK`.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from typing import Any, Callable

EXTRACT_HOOK_ENV = "LEUKRAY_TEST_EXTRACT_HOOK"
EXTRACT_SETUP_HOOK = "leukray.testing.install_extract_hook"
SCREEN_HOOK_ENV = "LEUKRAY_TEST_SCREEN_HOOK"
SCREEN_SETUP_HOOK = "leukray.testing.install_screen_hook"


class KillWorkerOnce:
    """An `on_epoch_end` callback that logs every finished epoch and SIGKILLs the worker once.

    Every call appends "<epoch> <rank> <pid>" to `log` (when given), so a test sees which
    process ran which epoch: a worker that resumed from its checkpoint never runs a
    finished epoch again. After epoch `at_epoch` the worker waits `grace_s` (Ray Train's
    controller collects a reported checkpoint when it polls the workers, every 2 s by
    default; a worker killed before that loses the report) and kills itself; `marker`
    records that it happened, so the restarted worker does not die again.
    """

    def __init__(self, marker: str, at_epoch: int, log: str = "", grace_s: float = 6.0):
        self.marker, self.at_epoch, self.log, self.grace_s = marker, at_epoch, log, grace_s

    def __call__(self, epoch: int, rank: int) -> None:
        if self.log:
            with open(self.log, "a", encoding="utf-8") as handle:
                handle.write(f"{epoch} {rank} {os.getpid()}\n")
        if epoch == self.at_epoch and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(self.grace_s)
            os.kill(os.getpid(), signal.SIGKILL)


def install_extract_hook() -> None:
    """Wrap `FeatureExtractor.__call__` in this worker process (see the module docstring)."""
    spec = os.environ.get(EXTRACT_HOOK_ENV, "")
    if spec:  # workers of jobs without the hook do not pay for importing the actors
        from leukray.distributed import actors

        actors.FeatureExtractor.__call__ = _stamped(actors.FeatureExtractor.__call__, spec)


def install_screen_hook() -> None:
    """Wrap the detection `leukray screen`'s batch function calls, for every field or tile
    (`actors.detect_and_crop`), in this worker process (see the module docstring)."""
    spec = os.environ.get(SCREEN_HOOK_ENV, "")
    if spec:
        from leukray.distributed import actors

        actors.detect_and_crop = _stamped(actors.detect_and_crop, spec)


def _stamped(original: Callable[..., Any], spec: str) -> Callable[..., Any]:
    """`original`, made to leave a file DIR/<node id>-<pid>-<n> (the n-th call in this
    process) and sleep SECONDS before each call (`spec` = DIR:SECONDS)."""
    folder, _, seconds = spec.rpartition(":")
    calls = itertools.count(1)

    def stamped(*args: Any, **kwargs: Any) -> Any:
        from leukray.distributed.resources import ray_node_id

        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f"{ray_node_id()}-{os.getpid()}-{next(calls)}"), "w").close()
        time.sleep(float(seconds or 0))
        return original(*args, **kwargs)

    return stamped
