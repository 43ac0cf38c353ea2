"""The GPU paths: the extractor in bf16 + channels_last against the fp32 CPU trunk, Ray Train
on a GPU, and a whole run whose extractor actors and training ask Ray for GPUs (marker
`gpu`: skipped without CUDA; run on a GPU machine with `pytest -m gpu`). How the actor pools
ask a GPU cluster for resources is checked everywhere (no device needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from leukray.cli import main
from leukray.distributed.actors import FeatureExtractor
from leukray.distributed.resources import plan_pool
from leukray.errors import ConfigError


class TestPoolPlans:
    """The resources an extractor pool asks for, from the cluster's resources alone."""

    def test_gpu_actors_take_no_cpu_slot_so_preprocessing_cannot_starve_them(self):
        # the box: 16 CPUs, 1 GPU; preprocessing tasks take a CPU slot each, so a GPU
        # actor that also wanted one waited until preprocessing had finished
        plan = plan_pool("auto", 0, "", {"CPU": 16.0, "GPU": 1.0})
        assert plan.on_gpu and (plan.min_size, plan.max_size) == (1, 1)
        assert plan.resources == {"num_gpus": 1, "num_cpus": 0.0}
        # every CPU slot is then left to preprocessing, and the actor is schedulable when all are taken
        assert plan_pool("auto", 0, "", {"CPU": 16.0, "GPU": 4.0}).max_size == 4

    def test_cpu_pools_and_explicit_choices(self):
        # up to one actor per CPU node, a torch thread per core, one CPU slot left free on its node
        cpu = plan_pool("auto", 0, "", {"CPU": 2.0})
        assert not cpu.on_gpu and (cpu.min_size, cpu.max_size) == (1, 1)
        assert cpu.resources == {"num_cpus": 1} and cpu.threads == 2
        nodes = plan_pool("auto", 0, "", {"CPU": 48.0}, node_cpus=(16.0, 16.0, 16.0))
        assert (nodes.min_size, nodes.max_size) == (1, 3) and nodes.resources == {"num_cpus": 15}
        assert nodes.threads == 16  # a second actor would not fit a node: one each
        mixed = plan_pool("auto", 0, "", {"CPU": 10.0}, node_cpus=(8.0, 2.0))
        assert mixed.threads == 2 and mixed.resources == {"num_cpus": 1} and mixed.max_size == 2  # fits the small one
        assert plan_pool("auto", 0, "", {"CPU": 1.0}).resources == {"num_cpus": 1}
        assert plan_pool("auto", 3, "", {"CPU": 8.0}).threads == 0  # explicit actors: 1 CPU, 1 thread each
        assert plan_pool("false", 0, "", {"CPU": 8.0, "GPU": 1.0}).on_gpu is False
        assert plan_pool("auto", 3, "", {"CPU": 8.0}).max_size == 3
        acc = plan_pool("auto", 0, "neuron", {"CPU": 8.0, "neuron": 2.0})
        assert acc.resources == {"num_cpus": 1, "resources": {"neuron": 1}} and acc.max_size == 2
        with pytest.raises(ConfigError, match="no GPUs"):
            plan_pool("true", 0, "", {"CPU": 8.0})


@pytest.mark.gpu
def test_bf16_gpu_features_match_the_fp32_cpu_trunk():
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (24, 224, 224, 3), dtype=np.uint8)
    gpu = FeatureExtractor("random", seed=3, device="cuda", maps_stage=0)
    cpu = FeatureExtractor("random", seed=3, device="cpu", maps_stage=0)
    assert gpu.on_gpu and not cpu.on_gpu
    f_gpu, maps_gpu = gpu.extract(crops)
    f_cpu, maps_cpu = cpu.extract(crops)
    assert f_gpu.dtype == np.float32 and f_gpu.shape == (24, 2048) and maps_gpu.shape == (24, 2048, 7, 7)
    cosine = (f_gpu * f_cpu).sum(1) / (np.linalg.norm(f_gpu, axis=1) * np.linalg.norm(f_cpu, axis=1))
    assert cosine.min() > 0.99, cosine.min()  # bf16 autocast changes digits, not the features
    rel = (
        np.abs(maps_gpu.astype(np.float32) - maps_cpu.astype(np.float32)).mean()
        / np.abs(maps_cpu.astype(np.float32)).mean()
    )
    assert rel < 0.05, rel


@pytest.mark.gpu
@pytest.mark.slow
def test_a_run_puts_the_extractor_and_training_on_the_gpu(ray_local, tiny_cells, tmp_path):
    import ray

    assert ray.cluster_resources().get("GPU", 0) >= 1  # Ray found the GPU by itself
    out = tmp_path / "run"
    argv = [
        "run", "--data", str(tiny_cells), "--out", str(out), "--weights", "random",
        "--classifiers", "LogisticRegression,GaussianNB", "--sweep.tune_trials", "2",
        "--train.epochs", "3", "--train.batch_size", "16",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ray"]["extract_device"] == "gpu" and summary["ray"]["cluster_gpus"] >= 1
    assert summary["custom_model"]["epochs"] == 3
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 4  # header + 3 epochs
    # predict reuses the bundle on the GPU and agrees with the run's own test predictions
    preds = tmp_path / "preds.parquet"
    assert main(["predict", "--model", str(out / "model"), "--data", str(tiny_cells), "--out", str(preds)]) == 0
    import pandas as pd

    ran = pd.read_parquet(out / "predictions.parquet").set_index("path")
    again = pd.read_parquet(preds).set_index("path").loc[ran.index]
    assert (again["predicted_label"] == ran["predicted_label"]).mean() >= 0.95
    assert np.abs(again["prob_all"] - ran["prob_all"]).max() < 0.05
