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
