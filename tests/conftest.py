"""Shared fixtures: one local Ray runtime per module, tiny synthetic data, real data paths.

Markers (declared in pyproject.toml): `slow` (end-to-end through Ray), `gpu` (skipped without
CUDA), `cluster` (multi-node local cluster), `realdata` (skipped when ../shared/data is absent).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LEUKRAY_SHARED_DATA", REPO.parent / "shared" / "data"))
CNMC_DEV = SHARED_DATA / "cnmc-dev"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "realdata" in item.keywords and not CNMC_DEV.is_dir():
            item.add_marker(pytest.mark.skip(reason=f"real C-NMC data not found at {CNMC_DEV}"))


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray runtime with 2 CPUs for the module's tests."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # address="local": always a new runtime, never a `ray start` cluster left on the machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_cells(tmp_path_factory):
    """A small synthetic C-NMC-layout dataset (seeded): 72 cells of 9 subjects."""
    from leukray.tools.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, cells=72, subjects=9, seed=7)
    return root
