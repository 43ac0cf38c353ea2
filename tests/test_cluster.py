"""A real multi-node Ray cluster on this machine: a head started with `ray start --head`
(token authentication on) and two worker nodes, one advertising a custom resource that stands
in for a GPU. The pipeline job is submitted with `ray job submit`, as platform teams do."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ACCEL = "leukray_accel"

pytestmark = pytest.mark.cluster


def test_cluster_yaml_passes_rays_schema_validation():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # Ray's own cluster-config schema, after its defaults
    assert config["head_node_type"] == "head"
    assert {"cpu_worker", "gpu_worker"} <= set(config["available_node_types"])
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "secretsmanager" in starts
    assert "--dashboard-host=127.0.0.1" in starts  # dashboard/job API never on a public interface
    # SSH, the security group and IAM: tests/test_cluster_config.py
    broken = dict(config, available_node_types={"head": {"resources": {}, "node_config": {}, "typo": 1}})
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def free_port() -> int:
    """A port that was free a moment ago: only a guess, so whoever uses it retries on failure."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_cli(*args: str, env: dict[str, str], timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # no ~/.ray/auth_token from other local clusters
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "RAY_DEDUP_LOGS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    gcs_port = start_head(env)
    address = f"127.0.0.1:{gcs_port}"
    try:
        start_worker(env, address)
        start_worker(env, address, f"--resources={json.dumps({ACCEL: 1})}")
        url = cluster_facts(env, address)["dashboard_url"]  # where this cluster's job API really is
        deadline = time.time() + 420  # a loaded machine: the agents can take minutes
        while True:  # the job agents come up a little after `ray start` returns
            probe = ray_cli(
                "job",
                "submit",
                f"--address={url}",
                "--",
                "python",
                "-c",
                "print('ready')",
                env=env,
                check=False,
                timeout=120,
            )
            if probe.returncode == 0 and "ready" in probe.stdout:
                break
            if time.time() > deadline:
                raise AssertionError(
                    f"the job API never accepted a job:\n{probe.stdout[-2000:]}\n{probe.stderr[-2000:]}"
                )
            time.sleep(3)
        started = nodes({"env": env, "address": address})
        accel = [n["id"] for n in started if n["res"].get(ACCEL)]
        assert len(started) >= 3 and len(accel) == 1, started
        yield {"env": env, "url": url, "address": address, "token": token, "nodes": {n["id"] for n in started}}
    finally:
        stop_cluster(gcs_port)


def start_head(env: dict[str, str], attempts: int = 5) -> int:
    """`ray start --head` on ports that were free a moment ago; another process can take one
    in between, so a failed start is cleaned up and retried on other ports. (The GCS port is
    chosen here, not by Ray, because it marks this cluster's processes for `stop_cluster`.) The
    dashboard agent gets its own port too: Ray's default (52365) is shared by every Ray on the
    host, and a head whose agent lost it cannot accept jobs. Returns the GCS port."""
    for _ in range(attempts):
        gcs_port = free_port()
        result = ray_cli(
            "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=1",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", env=env, check=False,
        )  # fmt: skip
        if result.returncode == 0:
            return gcs_port
        stop_cluster(gcs_port)  # whatever the failed start left running
    raise AssertionError(f"ray start --head failed {attempts} times:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def start_worker(env: dict[str, str], address: str, *extra: str, attempts: int = 3) -> None:
    """`ray start --address …` for one more node; on a loaded machine the GCS can miss its RPC
    deadline, so a failed start is retried."""
    for attempt in range(attempts):
        result = ray_cli(
            "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            f"--dashboard-agent-listen-port={free_port()}", *extra, env=env, check=attempt == attempts - 1,
        )  # fmt: skip
        if result.returncode == 0:
            return


def cluster_facts(env: dict[str, str], address: str) -> dict:
    """The running cluster's own account of itself (dashboard URL), from a driver attached to it."""
    code = (
        "import json, ray; ctx = ray.init(address='auto', logging_level='ERROR'); "
        "print(json.dumps({'dashboard_url': 'http://' + ctx.dashboard_url}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def kill_process_trees(matches) -> int:
    """SIGKILL every process whose command line `matches`, and all their descendants (found
    before anything is killed: agents whose process title hides the address are orphaned
    once their raylet is gone). Returns how many processes were killed."""
    import signal

    parents: dict[int, int] = {}
    doomed: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if matches(cmdline):
            doomed.add(int(proc.name))
    while children := {pid for pid, ppid in parents.items() if ppid in doomed} - doomed:
        doomed |= children
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(doomed)


def stop_cluster(gcs_port: int) -> None:
    """Kill this cluster's processes and their children only (`ray stop` would kill every
    Ray on the machine)."""
    mark = re.compile(rf"(gcs_server_port={gcs_port}|[0-9.]+:{gcs_port})(\s|$)")
    for _ in range(3):
        if not kill_process_trees(lambda cmdline: bool(mark.search(cmdline))):
            break
        time.sleep(1)
    # `ray start` recorded this cluster as the machine's current one; `ray stop` would remove
    # the record, so a later `ray.init()` does not try to join a cluster that is gone.
    record = Path("/tmp/ray/ray_current_cluster")
    try:
        if f":{gcs_port}" in record.read_text():
            record.unlink()
    except OSError:
        pass


def nodes(cluster, alive: bool = True) -> list[dict]:
    """The cluster's nodes as Ray's GCS lists them (only the live ones unless alive=False)."""
    code = (
        "import json, ray; ray.init(address='auto', logging_level='ERROR'); "
        "print(json.dumps([{'id': n['NodeID'], 'res': n['Resources'], 'alive': n['Alive']} for n in ray.nodes()]))"
    )
    env = {**cluster["env"], "RAY_ADDRESS": cluster["address"]}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = json.loads(out.stdout.strip().splitlines()[-1])
    return [n for n in listed if n["alive"] or not alive]


@pytest.mark.slow
def test_pipeline_job_runs_across_nodes(cluster, tiny_cells, tmp_path):
    alive = nodes(cluster)
    assert cluster["nodes"] <= {n["id"] for n in alive}  # the fixture's three nodes (other tests may add more)
    accel_nodes = {n["id"] for n in alive if n["res"].get(ACCEL)}
    assert len(accel_nodes) == 1
    out = tmp_path / "run"
    # All three nodes share this host's /tmp/ray session folder, where a `--working-dir`
    # package unpacked for one node can be swept away under another node's running driver
    # (not a setup real clusters have); leukray is installed in the environment every node
    # runs, so the job is submitted without one here.
    result = ray_cli(
        "job", "submit", f"--address={cluster['url']}",
        "--", "python", str(REPO / "jobs" / "pipeline.py"), "--data", str(tiny_cells), "--out", str(out),
        "--weights", "random", "--preprocess.size", "64",
        "--classifiers", "GaussianNB,LogisticRegression,RidgeClassifier", "--sweep.tune_trials", "2",
        "--train.epochs", "1", "--extract.accelerator_resource", ACCEL,
        env=cluster["env"], timeout=900,
    )  # fmt: skip
    assert "succeeded" in result.stdout, result.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    used = summary["ray"]["node_ids"]
    assert set(used["extract"]) == accel_nodes  # the stand-in accelerator got the extractor actors
    assert len(set(used["preprocess"]) | set(used["extract"])) >= 2  # work ran on more than one node
    known = {n["id"] for n in nodes(cluster, alive=False)}
    assert set(used["preprocess"]) | set(used["extract"]) <= known  # real node IDs of this cluster
    assert (out / "report.html").is_file() and (out / "model" / "bundle.json").is_file()


def http_status(url: str, token: str | None) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


REFUSALS = {
    # a client that does not know the cluster wants a token sends none: the job API answers 401
    "no token": ({}, "Authentication required: Unauthorized: Missing authentication token", 401),
    # the right token without RAY_AUTH_MODE=token: Ray's job client sends no token either (401)
    "token without the mode": (
        {"RAY_AUTH_TOKEN": "the cluster's"},
        "Authentication required: Unauthorized: Missing authentication token",
        401,
    ),
    # the right mode, a wrong token: 403
    "wrong token": (
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        "Authentication failed: Forbidden: Invalid authentication token",
        403,
    ),
    # token mode without any token: Ray's client refuses before sending anything
    "token mode, no token": (
        {"RAY_AUTH_MODE": "token"},
        "Token authentication is enabled but Ray couldn't find an authentication token",
        None,
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_submission_without_the_right_token_is_refused(cluster, tmp_path, case):
    given, refusal, status = REFUSALS[case]
    env = {k: v for k, v in cluster["env"].items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env.update(given, HOME=str(tmp_path))  # no ~/.ray/auth_token either
    if env.get("RAY_AUTH_TOKEN") == "the cluster's":
        env["RAY_AUTH_TOKEN"] = cluster["token"]
    marker = f"should-not-run-{secrets.token_hex(4)}"
    result = ray_cli(
        "job", "submit", f"--address={cluster['url']}", "--", "python", "-c", f"print('{marker}')",
        env=env, check=False, timeout=120,
    )  # fmt: skip
    text = plain(result.stdout + result.stderr)
    assert result.returncode != 0 and refusal in text, text[-3000:]
    assert marker not in ray_cli("job", "list", f"--address={cluster['url']}", env=cluster["env"]).stdout
    if status:  # the same refusal over plain HTTP, from the endpoint that accepts the right token
        jobs = f"{cluster['url']}/api/jobs/"
        assert http_status(jobs, None if status == 401 else env["RAY_AUTH_TOKEN"]) == status
        assert http_status(jobs, cluster["token"]) == 200


def kill_node(node_id: str) -> int:
    """SIGKILL one node: its raylet (found by its node ID, on its command line) and everything
    under it — as a machine that loses power would. Returns how many processes died."""
    killed = kill_process_trees(lambda cmdline: "raylet" in cmdline and f"--node_id={node_id} " in cmdline + " ")
    assert killed, f"no raylet of node {node_id}"
    return killed


def plain(text: str) -> str:
    """Ray's CLI output without its colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def job_status(cluster, job_id: str) -> str:
    result = ray_cli("job", "status", f"--address={cluster['url']}", job_id, env=cluster["env"], timeout=120)
    text = plain(result.stdout + result.stderr).upper()  # Ray colours it, on stderr
    for status in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
        if status in text:
            return status
    raise AssertionError(f"no job status in: {text[-2000:]}")


@pytest.mark.slow
def test_a_worker_node_killed_during_extraction_loses_and_duplicates_nothing(cluster, tiny_cells, tmp_path):
    """The extractor's node is killed mid-stage and a replacement joins, as an autoscaler
    would bring one: Ray restarts the actor on the new node, retries its tasks and rebuilds
    lost blocks, and features.parquet still holds every image and every augmented copy once.

    The extractor actors ask for a custom resource that only the victim node has (and later
    its replacement), so the victim is sure to be extracting when it dies."""
    from leukray.io.features import load_features
    from leukray.testing import EXTRACT_HOOK_ENV, EXTRACT_SETUP_HOOK

    pool = {"leukray_extract_pool": 1}

    def add_node() -> str:
        known = {n["id"] for n in nodes(cluster)}
        ray_cli(
            "start", f"--address={cluster['address']}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            f"--resources={json.dumps(pool)}", f"--dashboard-agent-listen-port={free_port()}", env=cluster["env"],
        )  # fmt: skip
        deadline = time.time() + 120
        while not (new := {n["id"] for n in nodes(cluster) if n["res"].get("leukray_extract_pool")} - known):
            assert time.time() < deadline, "the new node never joined"
            time.sleep(2)
        return new.pop()

    victim = add_node()
    hook = tmp_path / "extractor-batches"
    out = tmp_path / "run"
    job_id = f"leukray-node-kill-{secrets.token_hex(4)}"
    ray_cli(
        "job", "submit", "--no-wait", f"--address={cluster['url']}", f"--submission-id={job_id}",
        "--runtime-env-json",
        json.dumps({"env_vars": {EXTRACT_HOOK_ENV: f"{hook}:1"}, "worker_process_setup_hook": EXTRACT_SETUP_HOOK}),
        "--", "python", str(REPO / "jobs" / "extract.py"), "--data", str(tiny_cells), "--out", str(out),
        "--weights", "random", "--preprocess.size", "64", "--extract.batch_size", "4",
        "--extract.accelerator_resource", *pool,
        env=cluster["env"], timeout=300,
    )  # fmt: skip

    deadline = time.time() + 300
    next_status = time.time() + 10
    while not any(p.name.startswith(victim) for p in hook.glob("*")):
        if time.time() > next_status:  # `ray job status` takes a second or two: not every poll
            assert job_status(cluster, job_id) in ("PENDING", "RUNNING"), (
                "the job ended before the victim node extracted anything"
            )
            next_status = time.time() + 10
        assert time.time() < deadline, "no extractor batch ran on the victim node"
        time.sleep(0.2)
    assert kill_node(victim) >= 2  # the raylet and at least the extractor worker under it
    killed_at = time.time()
    replacement = add_node()

    deadline = time.time() + 600
    while (status := job_status(cluster, job_id)) in ("PENDING", "RUNNING"):
        assert time.time() < deadline, "the job did not finish after the node was killed"
        time.sleep(3)
    logs = ray_cli("job", "logs", f"--address={cluster['url']}", job_id, env=cluster["env"], timeout=120).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert victim not in {n["id"] for n in nodes(cluster)}  # the node really is gone

    manifest = pd.read_parquet(out / "manifest.parquet")
    usable = manifest[manifest["split"] != ""]
    meta, matrix = load_features(str(out / "features.parquet"))
    keys = list(zip(meta["path"], meta["aug_index"]))
    assert len(keys) == len(set(keys)), "an image or augmented copy was written twice"
    expected = {(p, k) for p, n in zip(usable["path"], usable["n_aug"]) for k in range(int(n) + 1)}
    assert set(keys) == expected, f"lost: {len(expected - set(keys))}, unexpected: {len(set(keys) - expected)}"
    assert np.isfinite(matrix).all()
    # the restarted extractor went on on the replacement node, after the kill
    assert any(p.name.startswith(replacement) and p.stat().st_mtime > killed_at for p in hook.glob("*"))
    record = json.loads((out / "extract.json").read_text())
    assert replacement in record["ray"]["node_ids"]["extract"]


JOBS = ["pipeline", "extract", "train", "tune", "predict", "screen", "smear_train"]


@pytest.mark.parametrize("job", JOBS)
def test_each_job_entry_point_is_its_leukray_subcommand(job):
    from leukray.cli import build_parser

    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / f"{job}.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    command = {"pipeline": "run", "smear_train": "smear-train"}.get(job, job)
    assert result.stdout.startswith(f"usage: leukray {command} ")
    flags = {
        a
        for action in build_parser()._subparsers._group_actions[0].choices[command]._actions
        for a in action.option_strings
    }
    assert flags and all(flag in result.stdout for flag in flags)  # the job takes exactly the subcommand's flags


def test_kuberay_manifests_ask_for_token_auth_and_run_a_valid_job():
    import shlex

    from leukray.cli import build_parser
    from leukray.config import load_yaml

    cluster = yaml.safe_load((REPO / "jobs" / "kuberay" / "raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["authOptions"]["mode"] == "token" and spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # the job API is not exposed
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"} and all(g["minReplicas"] <= g["maxReplicas"] for g in groups.values())
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    assert spec["enableInTreeAutoscaling"] is True

    job = yaml.safe_load((REPO / "jobs" / "kuberay" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/pipeline.py"] and (REPO / argv[1]).is_file()
    args = build_parser().parse_args(["run", *argv[2:]])  # the entrypoint's flags are leukray's
    assert args.out.startswith("s3://") and load_yaml(REPO / args.config)["data"]["path"].startswith("s3://")


PRINT_CWD_THEN_RUN_TUNE_HELP = (
    "import os, json, runpy, sys; "
    "files = sorted(os.path.relpath(os.path.join(d, f)) for d, _, fs in os.walk('.') for f in fs); "
    "print(json.dumps([os.getcwd(), files]), flush=True); "
    "sys.argv = ['jobs/tune.py', '--help']; runpy.run_path('jobs/tune.py', run_name='__main__')"
)


def test_make_submit_style_upload_excludes_the_venv_and_runs_the_job(cluster):
    """`make submit` uploads the checkout with `--working-dir . --runtime-env jobs/runtime_env.yaml`;
    the excludes must keep .venv (gigabytes) and run folders out, and the job must find leukray
    through the uploaded source. (`--help` runs on the head only, so the one-host session-folder
    sharing noted above does not come into it.)"""
    result = ray_cli(
        "job", "submit", f"--address={cluster['url']}", f"--working-dir={REPO}",
        f"--runtime-env={REPO / 'jobs' / 'runtime_env.yaml'}",
        "--", "python", "-c", PRINT_CWD_THEN_RUN_TUNE_HELP,
        env=cluster["env"], timeout=300,
    )  # fmt: skip
    text = plain(result.stdout + result.stderr)
    assert "usage: leukray tune" in text and "succeeded" in text, text[-3000:]
    cwd, files = json.loads(next(line for line in text.splitlines() if line.startswith('["')))
    assert "_ray_pkg_" in cwd  # the job ran in the uploaded package, not in the checkout
    assert {"jobs/tune.py", "leukray/cli.py", "pyproject.toml"} <= set(files)
    leaked = [f for f in files if f.split("/")[0] in {".venv", "runs", ".git", "data"} or f == "bench.json"]
    assert not leaked, leaked[:20]


def test_make_submit_as_documented_runs_the_job(cluster):
    """`make submit JOB=… ARGS=…` itself, with Ray's client from this environment (RAY=…) in
    place of the submit-only venv it would otherwise make."""
    result = subprocess.run(
        ["make", "-s", "submit", f"RAY={Path(sys.executable).parent / 'ray'}", f"RAY_ADDRESS={cluster['url']}",
         "JOB=tune", "ARGS=--help"],
        cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    text = plain(result.stdout + result.stderr)
    assert result.returncode == 0 and "usage: leukray tune" in text and "succeeded" in text, text[-3000:]


# -- a worker node killed during `leukray screen` -----------------------------------------------


def screen_fields_and_bundle(root: Path, fields: int) -> tuple[Path, Path]:
    """`fields` constructed smear fields (seeded blasts and lymphocytes) and a bundle on the
    hand-crafted cell features, its logistic regression fitted on those fields' own detected
    cells (a cell holding a blast centre is a blast), so its probabilities vary and mean
    something. Returns (fields folder, bundle folder)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from test_smeartrain import encode, field_with_cells

    from leukray.config import CELL_FAMILIES, PreprocessConfig, ScreenConfig
    from leukray.models.bundle import save_bundle
    from leukray.ops.smear import detect_and_crop
    from leukray.stages.smeartrain import CLASSES, NO_TRUNK

    (root / "fields").mkdir(parents=True)
    features, labels = [], []
    for k in range(fields):
        image, blasts = field_with_cells(100 + k, k % 3, 1 + k % 2)
        path = root / "fields" / f"field-{k:02d}.png"
        path.write_bytes(encode(image))
        cells = detect_and_crop(
            {"path": np.asarray([str(path)])}, ScreenConfig(), PreprocessConfig(size=64),
            lambda p: Path(p).read_bytes(), CELL_FAMILIES,
        )  # fmt: skip
        for x0, y0, x1, y1, row in zip(cells["x0"], cells["y0"], cells["x1"], cells["y1"], cells["cell_features"]):
            features.append(row)
            labels.append(any(x0 <= x < x1 and y0 <= y < y1 for x, y in blasts))
    assert 0 < sum(labels) < len(labels), labels
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    model.fit(np.asarray(features), np.asarray(labels, int))
    save_bundle(
        str(root / "model"), classes=CLASSES, positive_label="all", preprocess=PreprocessConfig(size=64),
        weights=NO_TRUNK, weights_seed=0, feature_source="+".join(CELL_FAMILIES),
        classifier_name="LogisticRegression", classifier=model, extra={"extract_batch_size": 2},
    )  # fmt: skip
    return root / "fields", root / "model"


def add_worker_node(cluster, resource: str) -> str:
    """One more 1-CPU node advertising `resource`; returns its node ID once the GCS lists it."""
    known = {n["id"] for n in nodes(cluster)}
    start_worker(cluster["env"], cluster["address"], f"--resources={json.dumps({resource: 1})}")
    deadline = time.time() + 120
    while not (new := {n["id"] for n in nodes(cluster) if n["res"].get(resource)} - known):
        assert time.time() < deadline, "the new node never joined"
        time.sleep(2)
    return new.pop()


def submit_screen(cluster, fields: Path, model: Path, out: Path, *extra: str, runtime_env: dict | None = None) -> str:
    """`ray job submit` of jobs/screen.py, one field per detection batch; waits for the job
    only without a runtime env (the kill test polls its own). Returns the job's ID."""
    job_id = f"leukray-screen-{secrets.token_hex(4)}"
    env_args = ["--no-wait", "--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
    result = ray_cli(
        "job", "submit", f"--address={cluster['url']}", f"--submission-id={job_id}", *env_args,
        "--", "python", str(REPO / "jobs" / "screen.py"), "--model", str(model), "--data", str(fields),
        "--out", str(out), "--screen.batch_size", "1", "--screen.part_slides", "2", *extra,
        env=cluster["env"], timeout=600,
    )  # fmt: skip
    assert runtime_env or "succeeded" in plain(result.stdout), result.stdout[-3000:]
    return job_id


HOLD_HEAD_CPU = """
import time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address="auto", logging_level="ERROR")
head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
Holder = ray.remote(num_cpus=1)(type("Holder", (), {"ready": lambda self: True}))
holder = Holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
ray.get(holder.ready.remote())
print("holding", flush=True)
time.sleep(3600)
"""


def hold_head_cpu(cluster) -> subprocess.Popen:
    """A driver whose actor holds the head node's one CPU until the driver is killed, so the
    screen's tasks and actors all run on worker nodes (one of which the test kills)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_HEAD_CPU], env={**cluster["env"], "RAY_ADDRESS": cluster["address"]},
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    return holder


@pytest.mark.slow
def test_a_worker_node_killed_during_screening_loses_and_duplicates_no_slide(cluster, tmp_path):
    """A worker node detecting cells is killed mid-screen (while it detects a field) and a
    replacement joins: the screen still finishes, every field is in exactly one part
    and once in the tables, and cells.parquet and slides.csv equal an uninterrupted screen's
    (but for the node that classified each cell)."""
    from leukray.io import screenparts
    from leukray.testing import SCREEN_HOOK_ENV, SCREEN_SETUP_HOOK

    fields, model = screen_fields_and_bundle(tmp_path, 10)
    reference = tmp_path / "reference"
    submit_screen(cluster, fields, model, reference)

    add_worker_node(cluster, "leukray_screen_pool")
    workers = {n["id"] for n in nodes(cluster) if "node:__internal_head__" not in n["res"]}
    hook, out = tmp_path / "detections", tmp_path / "screen"
    runtime_env = {"env_vars": {SCREEN_HOOK_ENV: f"{hook}:2"}, "worker_process_setup_hook": SCREEN_SETUP_HOOK}
    holder = hold_head_cpu(cluster)
    try:
        job_id = submit_screen(cluster, fields, model, out, runtime_env=runtime_env)
        killed_at, status, logs = kill_a_detecting_worker(cluster, job_id, hook, workers)
    finally:
        holder.kill()
    assert status == "SUCCEEDED", logs[-4000:]
    assert any(p.stat().st_mtime > killed_at for p in hook.glob("*"))  # fields were detected after the kill

    held = [s for part in screenparts.list_parts(str(out))[0] for s in part.slides]
    want = sorted(str(p) for p in fields.glob("*.png"))
    assert sorted(held) == want  # every field in exactly one part
    cells, want_cells = (pd.read_parquet(d / "cells.parquet").drop(columns="node_id") for d in (out, reference))
    assert not cells.duplicated(["slide", "cell_index"]).any() and len(want_cells) > len(want)
    pd.testing.assert_frame_equal(cells, want_cells)
    slides, want_slides = (pd.read_csv(d / "slides.csv", keep_default_na=False) for d in (out, reference))
    pd.testing.assert_frame_equal(slides, want_slides)
    assert sorted(slides["slide"]) == want


def kill_a_detecting_worker(cluster, job_id: str, hook: Path, workers: set[str]) -> tuple[float, str, str]:
    """Kill the first of `workers` seen detecting a field of the job (its stamp in `hook`),
    add a replacement node, and wait for the job: (when the node was killed, the job's final
    status, its logs)."""
    deadline, next_status = time.time() + 300, time.time() + 10
    # the victim: the first worker node (not the head, which runs the driver) seen detecting
    while not (detecting := sorted({p.name.split("-")[0] for p in hook.glob("*")} & workers)):
        if time.time() > next_status:
            assert job_status(cluster, job_id) in ("PENDING", "RUNNING"), "the screen ended before a worker detected"
            next_status = time.time() + 10
        assert time.time() < deadline, f"no field was detected on a worker node: {sorted(hook.glob('*'))}"
        time.sleep(0.2)
    victim = detecting[0]
    assert kill_node(victim) >= 2  # the raylet and at least the worker detecting under it
    killed_at = time.time()
    add_worker_node(cluster, "leukray_screen_pool")

    deadline = time.time() + 600
    while (status := job_status(cluster, job_id)) in ("PENDING", "RUNNING"):
        assert time.time() < deadline, "the screen did not finish after the node was killed"
        time.sleep(3)
    assert victim not in {n["id"] for n in nodes(cluster)}
    logs = ray_cli("job", "logs", f"--address={cluster['url']}", job_id, env=cluster["env"], timeout=120).stdout
    return killed_at, status, logs
