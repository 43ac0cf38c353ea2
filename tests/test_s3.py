"""`leukray run` reading from and writing to s3:// through the same pyarrow.fs code path users
get, against an S3-compatible server (moto) on loopback."""

from __future__ import annotations

import io
import json
import os

import pandas as pd
import pytest

from leukray.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tiny_cells):
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "leukray-test",
        "AWS_SECRET_ACCESS_KEY": "leukray-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before Ray starts, so its workers inherit the endpoint
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="cells")
    for path in sorted(tiny_cells.rglob("*.bmp")):
        client.upload_file(str(path), "cells", f"cnmc/{path.relative_to(tiny_cells).as_posix()}")
    try:
        yield client
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_run_from_and_to_s3(s3, ray_local, tiny_cells):
    code = main(
        [
            "run", "--data", "s3://cells/cnmc", "--out", "s3://cells/runs/r1", "--weights", "random",
            "--preprocess.size", "64", "--classifiers", "GaussianNB,LogisticRegression",
            "--train.epochs", "1", "--sweep.tune_trials", "2",
        ]
    )  # fmt: skip
    assert code == 0
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="cells", Prefix="runs/r1/")["Contents"]}
    for name in [
        "config.yaml",
        "manifest.parquet",
        "features.parquet",
        "leaderboard.csv",
        "errors.csv",
        "summary.json",
        "report.html",  # rendered from the run's files and uploaded
    ]:
        assert f"runs/r1/{name}" in keys
    assert not any(".tmp-" in k for k in keys)  # atomic writes leave no temporary objects
    # Ray Train checkpoints and the model bundle's weights went to the bucket too
    assert any(k.startswith("runs/r1/train/") and k.endswith("/state.pt") for k in keys)
    assert "runs/r1/custom_model/custom_resnet50.pt" in keys  # the train stage's head
    assert any(k.startswith("runs/r1/model/v-") and k.endswith("/trunk.pt") for k in keys)  # the random trunk
    assert "runs/r1/run.json" in keys  # the journal that says which stages finished
    summary = json.loads(s3.get_object(Bucket="cells", Key="runs/r1/summary.json")["Body"].read())
    assert summary["counts"]["usable"] == len(list(tiny_cells.rglob("*.bmp")))
    manifest = pd.read_parquet(io.BytesIO(s3.get_object(Bucket="cells", Key="runs/r1/manifest.parquet")["Body"].read()))
    assert manifest["path"].str.startswith("s3://cells/cnmc/").all()
