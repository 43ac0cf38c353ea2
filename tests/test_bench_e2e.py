"""The benchmark's end-to-end section (`leukray.tools.bench_e2e`, issue 9): its figures are
consistent with each other (ratios are the figures divided), never timing thresholds."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from leukray.distributed.resources import AUTO_BATCH_SIZE, extract_batch_size
from leukray.tools import bench
from leukray.tools.bench_e2e import (
    STORE_FLOOR_BYTES,
    Sampler,
    e2e_ratios,
    extract_argv,
    maps_ratios,
    measure_e2e,
    ready_out,
    train_argv,
)


def _run(rss: int, store: int | None, stage: float, command: float) -> dict:
    return {
        "peak_driver_rss_bytes": rss,
        "peak_object_store_bytes": store,
        "stage_images_per_s": stage,
        "command_images_per_s": command,
        "stage_seconds": 10.0,
        "discover_hash_split_seconds": 0.5,
        "gpu_busy": None,
    }


def test_ratios_divide_by_the_smaller_ceiling_and_floor_the_object_store():
    cpu, extractor = {"images_per_s": 400.0}, {"images_per_s": 100.0}
    small = _run(1_000, 1_000, 40.0, 30.0)
    large = _run(1_200, 3 * STORE_FLOOR_BYTES, 80.0, 60.0)
    ratios = e2e_ratios(cpu, extractor, small, large)
    assert ratios["bottleneck"] == "extractor"
    assert ratios["stage_ratio"] == pytest.approx(0.8)
    assert ratios["command_ratio"] == pytest.approx(0.6)
    assert ratios["stage_ratio_at_n"] == pytest.approx(0.4)
    assert ratios["hash_fraction"] == pytest.approx(0.05)
    # 1 KB -> 192 MiB of object store is growth from the 64 MiB floor: 3x, more than the RSS's 1.2x
    assert ratios["object_store_growth"] == pytest.approx(3.0)
    assert ratios["driver_rss_growth"] == pytest.approx(1.2)
    assert ratios["memory_growth"] == pytest.approx(3.0)
    # a few blocks in flight (1 KB -> 600 KB) are not growth; the RSS then decides
    assert e2e_ratios(cpu, extractor, small, _run(1_500, 600_000, 80.0, 60.0))["memory_growth"] == pytest.approx(1.5)
    # without an object-store figure, the RSS alone
    assert e2e_ratios(cpu, extractor, _run(10, None, 1, 1), _run(20, None, 1, 1))["memory_growth"] == pytest.approx(2)


def test_maps_growth_is_the_larger_of_the_train_commands_growths():
    small, large = _run(1_000, 1_000, 1, 1), _run(1_250, 2 * STORE_FLOOR_BYTES, 1, 1)
    ratios = maps_ratios(small, large)
    assert ratios["maps_driver_rss_growth"] == pytest.approx(1.25)
    assert ratios["maps_object_store_growth"] == pytest.approx(2.0)  # from the 64 MiB floor
    assert ratios["maps_memory_growth"] == pytest.approx(2.0)
    assert train_argv("RUN", 1) == ["train", "--out", "RUN", "--train.epochs", "1", "--quiet"]


def test_extract_batch_size_is_chosen_by_device_unless_given():
    assert extract_batch_size(0, on_gpu=True) == AUTO_BATCH_SIZE["gpu"] == 256
    assert extract_batch_size(0, on_gpu=False) == AUTO_BATCH_SIZE["cpu"] == 32
    assert extract_batch_size(8, on_gpu=True) == 8


def test_the_command_is_the_stage_without_augmentation_or_cell_features():
    argv = extract_argv("DATA", "OUT", "random", 0)
    assert argv[:5] == ["extract", "--data", "DATA", "--out", "OUT"]
    assert "--extract.batch_size" not in argv  # auto: the stage's own choice
    assert argv[argv.index("--augment.oversample") + 1] == "0"
    assert extract_argv("D", "O", "random", 16)[-2:] == ["--extract.batch_size", "16"]


@pytest.mark.slow
def test_the_out_folder_is_made_up_front_and_a_bad_out_stops_before_any_measuring(tmp_path, capsys):
    ready_out(str(tmp_path / "new" / "deeper" / "bench.json"))
    assert (tmp_path / "new" / "deeper").is_dir()
    with pytest.raises(SystemExit, match="is not a file this user can write"):
        ready_out(str(tmp_path / "new"))
    (tmp_path / "plain").write_text("")
    with pytest.raises(SystemExit, match="cannot make the folder of --out"):
        ready_out(str(tmp_path / "plain" / "bench.json"))  # a file where the folder would go
    with pytest.raises(SystemExit, match="cannot make the folder"):  # before Ray starts or anything runs
        bench.main(["--out", str(tmp_path / "plain" / "x" / "bench.json")])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="VmHWM and its reset are Linux's")
def test_the_driver_peak_is_the_kernels_exact_one_not_a_sampled_one():
    import mmap

    with Sampler(interval=60) as sampler:  # one sample, at the start
        while not sampler.rss:
            time.sleep(0.01)
        # 300 MB of fresh pages touched, then unmapped between samples (mapped directly: a
        # heap that an earlier test's torch left large could serve numpy without new pages)
        with mmap.mmap(-1, 300_000_000) as block:
            for offset in range(0, len(block), mmap.PAGESIZE):
                block[offset] = 1
    summary = sampler.summary()
    assert summary["peak_driver_rss_source"] == "VmHWM"
    assert summary["peak_driver_rss_bytes"] >= summary["sampled_peak_driver_rss_bytes"] + 250_000_000
    assert summary["peak_object_store_bytes"] is None  # no Ray here, and none started


def test_e2e_section_figures_are_consistent(ray_local, tmp_path):
    e2e = measure_e2e(images=12, scale=2, weights="random", batch_size=0, cpus=2, tmp=str(tmp_path), warm_up=False)
    assert {"stage_ratio", "command_ratio", "memory_growth", "gpu_busy", "hash_fraction"} <= set(e2e)
    assert "maps_memory_growth" in e2e
    cpu, extractor = e2e["cpu_ceiling"], e2e["extractor_ceiling"]
    at_n, scaled = e2e["extract_at_n"], e2e["extract_at_scale"]
    assert cpu["images"] == extractor["images"] == 12 and cpu["processes"] == 2
    assert at_n["images"] == 12 and scaled["images"] == 24  # every synthetic cell became a feature row
    assert extractor["device"] == scaled["extract_device"] == "cpu"  # no GPU here
    assert extractor["batch_size"] == scaled["extract_batch_size"] == 32  # auto on a CPU
    assert e2e["gpu_busy"] is None
    share = e2e["hash_cpu_ms_per_image"] / e2e["preprocess_cpu_ms_per_image"]
    assert e2e["hash_cpu_share"] == pytest.approx(share, rel=1e-2)
    ceiling = min(cpu["images_per_s"], extractor["images_per_s"])
    assert e2e["ceiling_images_per_s"] == pytest.approx(ceiling, rel=1e-3)
    assert e2e["stage_ratio"] == pytest.approx(scaled["stage_images_per_s"] / ceiling, rel=1e-2)
    assert e2e["command_ratio"] == pytest.approx(scaled["command_images_per_s"] / ceiling, rel=1e-2)
    assert scaled["stage_images_per_s"] == pytest.approx(24 / scaled["stage_seconds"], rel=1e-2)
    # the command includes the stage, so it cannot be faster
    assert scaled["command_seconds"] >= scaled["stage_seconds"]
    assert e2e["command_ratio"] <= e2e["stage_ratio"] * 1.01
    assert at_n["peak_driver_rss_bytes"] > 0 and at_n["samples"] >= 1
    assert at_n["peak_object_store_bytes"] is not None
    growths = [e2e["driver_rss_growth"], e2e["object_store_growth"]]
    assert e2e["memory_growth"] == pytest.approx(max(growths), rel=1e-3)
    # the maps path: a train command on each extract's run folder, every usable row embedded,
    # the shards removed after; its growth is its peaks' ratio like the extract's
    maps_n, maps_scaled = e2e["maps_at_n"], e2e["maps_at_scale"]
    assert maps_n["maps_rows"] == 12 and maps_scaled["maps_rows"] == 24
    assert not maps_n["maps_left"] and not maps_scaled["maps_left"]
    assert maps_n["peak_driver_rss_bytes"] > 0 and maps_scaled["peak_object_store_bytes"] is not None
    maps_growths = [e2e["maps_driver_rss_growth"], e2e["maps_object_store_growth"]]
    assert e2e["maps_memory_growth"] == pytest.approx(max(maps_growths), rel=1e-3)
    assert e2e["maps_memory_growth"] > 0
    verdicts = bench.e2e_verdicts(e2e)
    assert set(verdicts) == {"stage_ratio", "command_ratio", "memory_growth", "maps_memory_growth"}
    json.dumps(e2e)  # bench.json can hold it


def test_preprocess_section_measures_the_machines_ceiling_beside_ray(ray_local, tmp_path):
    frame = bench.synthetic_images(str(tmp_path / "cells"), 16)
    results, crops, labels = bench.measure_preprocess(
        frame, bench.PreprocessConfig(), repeats=1, rows_per_block=4, batch_size=4
    )
    assert crops.shape == (16, 224, 224, 3) and len(labels) == 16
    assert {len(v) for v in results["preprocess_runs_s"].values()} == {1}
    # seconds are rounded to 10 us in bench.json, the ratios to 3 digits; both taken before
    loop_s, ray_s, pool_s = (results[f"preprocess_{side}_s"] for side in ("loop", "ray", "pool"))
    assert results["preprocess_pool_images_per_s"] == pytest.approx(16 / pool_s, rel=0.05, abs=1e-3)
    assert results["preprocess_speedup"] == pytest.approx(loop_s / ray_s, rel=0.05, abs=1e-3)
    assert results["preprocess_pool_speedup"] == pytest.approx(loop_s / pool_s, rel=0.05, abs=1e-3)
    assert results["preprocess_ray_vs_pool"] == pytest.approx(pool_s / ray_s, rel=0.05, abs=1e-3)
    table = bench.format_table(results)
    assert "ceiling: Pool(all CPUs) / loop" in table
    assert f"{results['preprocess_ray_vs_pool']:.2f}x of it" in table
    assert results["preprocess_ray_setup"]["op_resource_reservation"] is False  # a whole_output_pass
    # timed to the crops held in the object store (as the trunk's are kept); the untimed
    # read-back is what measure_preprocess compares with the loop's crops, pixel for pixel
    assert results["preprocess_ray_setup"]["consumed_with"].startswith("materialize")
    loop_crops = bench.preprocess_loop_seconds(frame["path"].tolist(), bench.PreprocessConfig())[1]
    assert np.array_equal(crops, loop_crops)
