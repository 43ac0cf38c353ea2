"""The allocator setting (`leukray.ops.allocator`): raised only, restored by the block form,
yielding to the user's own variables, set by the torch actors, and what it is for: torch on a
CPU reusing freed batch memory instead of faulting in fresh pages. Each case runs in a fresh
process, so that this one's thresholds and glibc's start-up reading stay out of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and page faults are glibc's")


def run_fresh(code: str, **env: str) -> dict:
    """`code` in a fresh Python (no MALLOC_* variables but `env`); the JSON it prints last."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_thresholds_are_only_raised_and_the_block_form_restores_them():
    got = run_fresh(
        """
import json
from leukray.ops import allocator
from leukray.ops.preprocess import keep_freed_image_memory  # sets IMAGE on import
steps = {"after_preprocess_import": allocator.thresholds()}
with allocator.kept_freed_memory(*allocator.TENSOR) as kept:
    steps["in_block"] = allocator.thresholds()
    steps["kept"] = kept
steps["after_block"] = allocator.thresholds()
steps["raised"] = allocator.keep_freed_memory(*allocator.TENSOR)
steps["lower_asked"] = allocator.keep_freed_memory(*allocator.IMAGE)
steps["after_lower"] = allocator.thresholds()
steps["mixed"] = allocator.keep_freed_memory(2 << 30, 1 << 20)
steps["after_mixed"] = allocator.thresholds()
print(json.dumps(steps))
"""
    )
    image, tensor = [16 << 20, 64 << 20], [1 << 30, 1 << 30]
    assert got["after_preprocess_import"] == image
    assert got["kept"] is True and got["in_block"] == tensor
    assert got["after_block"] == image  # what the process had before the block
    assert got["raised"] is True and got["lower_asked"] is True and got["after_lower"] == tensor
    assert got["mixed"] is True and got["after_mixed"] == [2 << 30, 1 << 30]  # each the larger


def test_the_users_own_variables_win():
    got = run_fresh(
        """
import json
from leukray.ops import allocator
print(json.dumps({"set": allocator.keep_freed_memory(*allocator.TENSOR), "thresholds": allocator.thresholds()}))
""",
        MALLOC_MMAP_THRESHOLD_="131072",
    )
    assert got == {"set": False, "thresholds": None}


def test_the_extraction_actor_keeps_freed_batch_memory():
    """`FeatureExtractor` (extraction, predict, screen) sets TENSOR in the process that builds
    it; the trunk alone (`TrunkExtractor`, a library class) leaves the process as it is."""
    got = run_fresh(
        """
import json
from leukray.ops import allocator
from leukray.models.trunk import TrunkExtractor
steps = {}
TrunkExtractor("random", seed=0, device="cpu")
steps["trunk"] = allocator.thresholds()
from leukray.distributed.actors import FeatureExtractor
FeatureExtractor("random", seed=0, device="cpu")
steps["feature_extractor"] = allocator.thresholds()
print(json.dumps(steps))
"""
    )
    assert got == {"trunk": None, "feature_extractor": [1 << 30, 1 << 30]}


# Minor page faults of one training step of a big linear layer (a 100,352 x 512 weight, as the
# Table II head's first Dense: a 205 MB gradient each step), after two warm-up steps.
_STEP_FAULTS = """
import json, resource, sys, torch
from leukray.ops import allocator
if sys.argv[1] == "tensor":
    allocator.keep_freed_memory(*allocator.TENSOR)
torch.manual_seed(0)
torch.set_num_threads(1)
layer = torch.nn.Linear(100_352, 512)
x = torch.randn(8, 100_352)
def step():
    layer.zero_grad(set_to_none=True)
    layer(x).square().mean().backward()
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3))
"""


def test_torch_on_a_cpu_reuses_freed_gradients_instead_of_faulting_in_fresh_pages():
    def faults(setting: str) -> float:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        done = subprocess.run(
            [sys.executable, "-c", _STEP_FAULTS, setting], env=clean, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return float(done.stdout.strip().splitlines()[-1])

    # glibc's defaults map a fresh 205 MB gradient each step: ~50,000 faults of 4 KiB
    assert faults("glibc-default") > 20_000
    assert faults("tensor") < 2_000


def test_worker_env_is_one_arena_unless_the_user_chose(monkeypatch):
    from leukray.ops import allocator

    for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    assert allocator.worker_env() == {"MALLOC_ARENA_MAX": "1"}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert allocator.worker_env() == {}


def test_torch_actors_and_train_workers_start_with_one_arena(ray_local, tmp_path, monkeypatch):
    """The options `plan_actor_pool` hands every torch actor pool (extraction, embedding,
    predict, screen) and `make_trainer` hands Ray Train's workers reach their processes."""
    for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    import ray

    from leukray.config import TrainConfig
    from leukray.distributed.resources import plan_actor_pool
    from leukray.distributed.training import make_trainer

    class ReportingExtractor:  # defined here, so that Ray ships it by value
        """Sets TENSOR as FeatureExtractor's constructor does; reports, from the actor's
        call thread, what its process was started with and runs with."""

        def __init__(self):
            from leukray.ops import allocator

            allocator.keep_freed_memory(*allocator.TENSOR)

        def __call__(self, batch):
            from leukray.ops import allocator

            batch["arena_max"] = [os.environ.get("MALLOC_ARENA_MAX", "")] * len(batch["id"])
            batch["thresholds"] = [str(allocator.thresholds())] * len(batch["id"])
            return batch

    _, pool, resources, _ = plan_actor_pool("false", 1)
    assert resources["runtime_env"] == {"env_vars": {"MALLOC_ARENA_MAX": "1"}}
    rows = (
        ray.data.range(4)
        .map_batches(ReportingExtractor, compute=pool, batch_size=2, batch_format="pandas", **resources)
        .take_all()
    )
    assert {(r["arena_max"], r["thresholds"]) for r in rows} == {("1", str((1 << 30, 1 << 30)))}

    def loop(config):
        with open(config["out"], "w", encoding="utf-8") as handle:
            handle.write(os.environ.get("MALLOC_ARENA_MAX", "unset"))

    out = tmp_path / "arena.txt"
    trainer = make_trainer(
        {"out": str(out)}, TrainConfig(workers=1), storage_path=str(tmp_path), name="arena", use_gpu=False, loop=loop
    )
    trainer.fit()
    assert out.read_text() == "1"


def test_the_crop_map_and_the_extractor_stay_fusable(ray_local, monkeypatch):
    """The decode/crop map carries the extractor's runtime environment, so Ray Data's own
    fusion rule still lets it run inside the extraction actor (with different options the
    crops would queue in the object store: 8 -> 150 MB for 1,000 images, measured)."""
    import pandas as pd
    from ray.data._internal.logical.rules.operator_fusion import are_remote_args_compatible

    from leukray.config import RunConfig
    from leukray.distributed.streaming import _features_dataset

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    rows = pd.DataFrame({"path": ["a.bmp"], "label": ["all"], "subject": ["s"], "split": ["train"], "n_aug": [0]})
    ds, _ = _features_dataset(rows, RunConfig(), -1, ())
    extractor = ds._logical_plan.dag
    crop = extractor.input_dependencies[0]
    assert "FeatureExtractor" in extractor.name and "preprocess_batch" in crop.name
    assert extractor.ray_remote_args["runtime_env"] == crop.ray_remote_args["runtime_env"]
    assert are_remote_args_compatible(crop.ray_remote_args, extractor.ray_remote_args)
