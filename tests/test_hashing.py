"""The discovery pass's content hashing (`leukray.data.discovery.hash_files`): per-file
sha256 in input order, unreadable files recorded with a reason, reads overlapped."""

from __future__ import annotations

import hashlib
import threading

import numpy as np

from leukray.data.discovery import hash_files


def test_hash_files_keeps_order_and_reasons_and_overlaps_reads():
    contents = {f"s3://bucket/cell_{i}.bmp": bytes([i]) * (3000 + i) for i in range(6)}
    both_in_flight = threading.Barrier(2, timeout=10)

    def read_bytes(path: str) -> bytes:
        if path.endswith("cell_0.bmp") or path.endswith("cell_1.bmp"):
            both_in_flight.wait()  # raises BrokenBarrierError unless two reads run at once
        if path.endswith("missing.bmp"):
            raise FileNotFoundError(path)
        if path.endswith("denied.bmp"):
            raise PermissionError("Access Denied")
        return contents[path]

    paths = [*contents, "s3://bucket/missing.bmp", "s3://bucket/denied.bmp"]
    out = hash_files({"path": np.asarray(paths, dtype=object)}, read_bytes)
    assert list(out["path"]) == paths
    expected = [hashlib.sha256(data).hexdigest() for data in contents.values()]
    assert list(out["sha256"]) == [*expected, "", ""]
    assert list(out["read_error"][:6]) == [""] * 6
    assert out["read_error"][6] == "file not found"
    assert out["read_error"][7] == "could not read: PermissionError: Access Denied"


def test_the_cluster_pass_and_the_local_one_hash_alike(ray_local, tiny_cells, tmp_path):
    import pandas as pd

    from leukray.distributed.streaming import hash_paths

    paths = sorted(str(p) for p in tiny_cells.rglob("*.bmp"))[:20] + [str(tmp_path / "gone.bmp")]
    local = hash_paths(pd.Series(paths), local_max=len(paths))
    spread = hash_paths(pd.Series(paths), local_max=0)  # a Ray Data pass
    assert list(local.index) == paths and sorted(spread.index) == sorted(paths)
    columns = ["sha256", "read_error"]
    pd.testing.assert_frame_equal(local[columns], spread.loc[paths, columns], check_index_type=False, check_dtype=False)
    assert local.loc[paths[0], "sha256"] == hashlib.sha256(open(paths[0], "rb").read()).hexdigest()
    assert local.loc[paths[-1], "read_error"] == "file not found"


def test_a_whole_output_pass_runs_without_reservation_and_leaves_other_passes_alone(ray_local, monkeypatch):
    """`whole_output_pass` switches Ray Data's per-operator reservation off for that pass
    only (it ran such passes one task at a time on 2 CPUs); the cluster hashing pass is one."""
    import pandas as pd
    import ray

    from leukray.distributed import streaming
    from leukray.distributed.resources import whole_output_pass

    whole = whole_output_pass(ray.data.range(8).map_batches(lambda b: {"id": b["id"] * 2}))
    other = ray.data.range(8).map_batches(lambda b: b)
    assert whole.context.op_resource_reservation_enabled is False
    assert other.context.op_resource_reservation_enabled is True
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled is True
    assert sorted(whole.to_pandas()["id"]) == list(range(0, 16, 2))

    passes = []
    monkeypatch.setattr(streaming, "whole_output_pass", lambda ds: passes.append(ds) or whole_output_pass(ds))
    hashed = streaming.hash_paths(pd.Series(["/nonexistent/a.bmp", "/nonexistent/b.bmp"]), local_max=0)
    assert len(passes) == 1 and passes[0].context.op_resource_reservation_enabled is False
    assert set(hashed["read_error"]) == {"file not found"}
