"""The cluster files as deployed: cluster.yaml (AWS launcher), jobs/aws/*.sh, jobs/iam/*.json,
jobs/kuberay/*.yaml, jobs/configs/*.yaml and the Makefile's submit path. Each test parses a
file and checks one security or consistency property, with Ray's own launcher code where it
decides (no cloud account is reachable here: the AWS CLI is replaced by a recorder)."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DIGEST = re.compile(r"^[^\s@]+@sha256:[0-9a-f]{64}$")


def load(path: str):
    return yaml.safe_load((REPO / path).read_text())


def load_all(path: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((REPO / path).read_text()) if doc]


# -- AWS launcher: SSH only from a configured CIDR ---------------------------------------------


def test_rays_aws_launcher_leaves_the_security_group_alone(monkeypatch):
    """Ray's launcher adds 'tcp 22 from 0.0.0.0/0' to any group it creates; with SecurityGroupIds
    on every node type it creates and edits none (checked with Ray's own code path)."""
    from ray.autoscaler._private.aws import config as aws
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert aws._create_default_ssh_inbound_rules()[0]["IpRanges"] == [{"CidrIp": "0.0.0.0/0"}]  # why
    touched = []
    monkeypatch.setattr(aws, "_upsert_security_groups", lambda conf, types: touched.append(types) or {})
    config = prepare_config(load("cluster.yaml"))
    validate_config(config)
    groups = {name: t["node_config"].get("SecurityGroupIds") for name, t in config["available_node_types"].items()}
    assert set(groups) == {"head", "cpu_worker", "gpu_worker"}
    assert all(g and len(g) == 1 for g in groups.values()) and len({g[0] for g in groups.values()}) == 1
    before = copy.deepcopy(config)
    assert aws._configure_security_group(config) == before and touched == []
    without = copy.deepcopy(before)  # the control: one node type without its group is configured by Ray
    del without["available_node_types"]["cpu_worker"]["node_config"]["SecurityGroupIds"]
    with pytest.raises(Exception):  # noqa: B017 - the recorder returns no group, Ray then fails
        aws._configure_security_group(without)
    assert touched == [["cpu_worker"]]
    assert "security_group" not in config["provider"]
    assert "0.0.0.0/0" not in yaml.safe_dump(config)


@pytest.fixture
def aws_recorder(tmp_path):
    """An `aws` command on PATH that records its arguments (one JSON list per line, a
    `file://` argument replaced by the file's content) and answers like the AWS CLI where the
    scripts read an answer."""
    log = tmp_path / "aws-calls.jsonl"
    fake = tmp_path / "bin" / "aws"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "args = [open(a[7:]).read() if a.startswith('file://') else a for a in sys.argv[1:]]\n"
        f"open({str(log)!r}, 'a').write(json.dumps(args) + '\\n')\n"
        "if args[:2] == ['ec2', 'create-security-group']: print('sg-0123456789abcdef0')\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


def test_the_security_group_script_opens_ssh_to_one_cidr_only(aws_recorder):
    env, calls = aws_recorder
    script = str(REPO / "jobs" / "aws" / "create-security-group.sh")
    made = subprocess.run([script, "vpc-0abc", "203.0.113.0/24"], env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == "sg-0123456789abcdef0"
    ingress = [c[c.index("--ip-permissions") + 1] for c in calls() if "authorize-security-group-ingress" in c]
    assert ingress == [
        "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=203.0.113.0/24,Description=SSH}]",
        "IpProtocol=-1,UserIdGroupPairs=[{GroupId=sg-0123456789abcdef0,Description=intra-cluster}]",
    ]
    assert not any("egress" in " ".join(c) or "0.0.0.0/0" in " ".join(c) for c in calls())
    for wide in ("0.0.0.0/0", "10.0.0.0/4", "not-a-cidr"):
        refused = subprocess.run([script, "vpc-0abc", wide], env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "error:" in refused.stderr, (wide, refused.stderr)
    assert len(calls()) == 3  # the refusals called nothing


# -- IAM: separate head and worker profiles, least privilege ---------------------------------


def statements(role: str) -> list[dict]:
    policy = json.loads((REPO / "jobs" / "iam" / f"{role}-policy.json").read_text())
    assert policy["Version"] == "2012-10-17"
    return policy["Statement"]


def allowed(role: str, action: str, resource: str) -> bool:
    """Whether an Allow statement of the role's policy grants `action` on `resource`
    (IAM's wildcard matching; conditions make a grant partial, counted as granted)."""
    for st in statements(role):
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if st["Effect"] == "Allow" and any(fnmatch.fnmatchcase(action, a) for a in actions):
            if any(fnmatch.fnmatchcase(resource, r) for r in resources):
                return True
    return False


def test_head_and_workers_have_separate_instance_profiles():
    types = load("cluster.yaml")["available_node_types"]
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Name"] for name, t in types.items()}
    assert profiles == {
        "head": "leukray-ray-head",
        "cpu_worker": "leukray-ray-worker",
        "gpu_worker": "leukray-ray-worker",
    }


def test_iam_policies_are_least_privilege():
    bucket = "arn:aws:s3:::YOUR-BUCKET"
    bundle = f"{bucket}/leukray/runs/cnmc/model/bundle.json"
    cluster = load("cluster.yaml")["cluster_name"]
    for role in ("head", "worker"):
        for st in statements(role):
            actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
            assert not any(a == "*" or a.endswith(":*") for a in actions), (role, st)
        assert allowed(role, "s3:GetObject", f"{bucket}/cnmc/training_data/fold_0/all/x.bmp")
        assert not allowed(role, "s3:PutObject", f"{bucket}/cnmc/training_data/fold_0/all/x.bmp")  # data read-only
        assert allowed(
            role,
            "secretsmanager:GetSecretValue",
            "arn:aws:secretsmanager:us-west-2:ACCOUNT_ID:secret:leukray/ray-auth-token-AbCdEf",
        )
        assert not allowed(
            role, "secretsmanager:GetSecretValue", "arn:aws:secretsmanager:us-west-2:ACCOUNT_ID:secret:other"
        )
    # the head launches and stops workers of this cluster, passes only the worker role, writes runs
    assert allowed("head", "ec2:RunInstances", "*") and allowed("head", "s3:PutObject", bundle)
    assert allowed("head", "iam:PassRole", "arn:aws:iam::ACCOUNT_ID:role/leukray-ray-worker")
    assert not allowed("head", "iam:PassRole", "arn:aws:iam::ACCOUNT_ID:role/leukray-ray-head")
    (stop,) = [st for st in statements("head") if "ec2:TerminateInstances" in st["Action"]]
    assert stop["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": cluster}}
    # workers write checkpoints and trial state only: never a model bundle, never EC2 or IAM
    assert allowed("worker", "s3:PutObject", f"{bucket}/leukray/checkpoints/custom_resnet50-x/checkpoint_000001/m.pt")
    assert allowed("worker", "s3:PutObject", f"{bucket}/leukray/runs/cnmc/tune/sweep/trial/result.json")
    assert not allowed("worker", "s3:PutObject", bundle)
    assert not allowed("worker", "s3:PutObject", f"{bucket}/leukray/runs/cnmc/summary.json")
    assert not any(a.startswith(("ec2:", "iam:")) for st in statements("worker") for a in st["Action"])


def test_the_iam_script_creates_both_roles_from_the_repos_policies(aws_recorder):
    env, calls = aws_recorder
    script = str(REPO / "jobs" / "aws" / "create-iam.sh")
    made = subprocess.run([script, "123456789012", "lab-bucket"], env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    roles = [c[c.index("--role-name") + 1] for c in calls() if c[:2] == ["iam", "create-role"]]
    assert roles == ["leukray-ray-head", "leukray-ray-worker"]
    # the policies it put are the repo's with the placeholders filled in
    put = {
        c[c.index("--role-name") + 1]: c[c.index("--policy-document") + 1] for c in calls() if "put-role-policy" in c
    }
    head, worker = put["leukray-ray-head"], put["leukray-ray-worker"]
    assert json.loads(head)["Statement"][0]["Sid"] == "AutoscalerDescribe"
    assert "ACCOUNT_ID" not in head + worker and "YOUR-BUCKET" not in head + worker
    assert "arn:aws:iam::123456789012:role/leukray-ray-worker" in head and "lab-bucket/leukray/checkpoints/*" in worker


# -- KubeRay: image by digest, NetworkPolicy ---------------------------------------------------


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_images_are_pinned_by_digest():
    cluster = load("jobs/kuberay/raycluster.yaml")
    images = [c["image"] for c in containers(cluster["spec"])]
    assert len(images) == 3 and all(DIGEST.match(i) for i in images), images
    assert len(set(images)) == 1
    assert not DIGEST.match("YOUR-REGISTRY/leukray:0.1.0") and not DIGEST.match(
        "r/leukray@sha256:abc"
    )  # the check bites


def test_kuberay_network_policy_isolates_the_cluster():
    cluster = load("jobs/kuberay/raycluster.yaml")
    job = load("jobs/kuberay/rayjob.yaml")
    policies = {p["metadata"]["name"]: p for p in load_all("jobs/kuberay/networkpolicy.yaml")}
    assert all(p["kind"] == "NetworkPolicy" and p["apiVersion"] == "networking.k8s.io/v1" for p in policies.values())
    members = {"ray.io/cluster": cluster["metadata"]["name"]}
    pods = policies["leukray-ray-pods"]["spec"]
    assert pods["podSelector"]["matchLabels"] == members and set(pods["policyTypes"]) == {"Ingress", "Egress"}
    assert pods["ingress"] == [{"from": [{"podSelector": {"matchLabels": members}}]}]  # only the cluster's own pods
    open_ports = set()
    for rule in pods["egress"]:
        if rule.get("to") == [{"podSelector": {"matchLabels": members}}]:
            continue
        assert rule.get("ports"), rule  # every other egress rule names its ports
        open_ports |= {(p["protocol"], p["port"]) for p in rule["ports"]}
    assert open_ports == {("UDP", 53), ("TCP", 53), ("TCP", 443)}
    submitter = policies["leukray-job-submitter"]["spec"]
    assert submitter["podSelector"]["matchLabels"] == {**members, "ray.io/node-type": "head"}
    (rule,) = submitter["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": job["metadata"]["name"]}}}]
    assert job["spec"]["submissionMode"] == "K8sJobMode"  # the mode whose submitter is that Job's pod


# -- the documented submission path ----------------------------------------------------------


def test_example_configs_agree_on_where_the_model_is():
    from leukray.config import build_config, load_yaml

    run = build_config(load_yaml(REPO / "jobs" / "configs" / "cnmc-s3.yaml"), {})
    assert run.out == "s3://YOUR-BUCKET/leukray/runs/cnmc"
    assert run.data.path.split(",") == [f"s3://YOUR-BUCKET/cnmc/training_data/fold_{k}" for k in (0, 1)]
    assert run.data.test_path == "s3://YOUR-BUCKET/cnmc/training_data/fold_2"
    assert run.train.storage_path.startswith("s3://")
    slides = load("jobs/configs/slides-s3.yaml")
    assert slides["model"] == f"{run.out}/model"
    readme = (REPO / "README.md").read_text()
    submitted = [line for line in readme.splitlines() if "make submit" in line or "job submit" in line]
    models = [m for line in submitted for m in re.findall(r"--model (\S+)", line)]
    assert models and all(m == f"{run.out}/model" for m in models), models  # runs/ is never uploaded
    assert f"--model {run.out}/model" in readme


def test_make_submit_needs_no_pytorch_environment(tmp_path):
    venv = tmp_path / "submit-venv"
    dry = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-n",
            "submit",
            f"SUBMIT_VENV={venv}",
            "JOB=pipeline",
            "ARGS=--config jobs/configs/cnmc-s3.yaml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")},
    )  # fmt: skip  (no "make[1]: Leaving directory" lines when the suite itself runs under make)
    assert dry.returncode == 0, dry.stderr
    text = dry.stdout
    assert "torch" not in text and ".[test]" not in text and "-e ." not in text  # no `make setup`
    assert f'{venv}/bin/python -m pip install -q "ray[default]==2.60.0" boto3' in text
    submit = shlex.split(text[text.index(f"{venv}/bin/ray job submit") :].replace("\\\n", " "))
    assert submit[:3] == [f"{venv}/bin/ray", "job", "submit"]
    assert submit[submit.index("--runtime-env") + 1] == "jobs/runtime_env.yaml"
    assert submit[submit.index("--") + 1 :] == ["python", "jobs/pipeline.py", "--config", "jobs/configs/cnmc-s3.yaml"]
    excludes = load("jobs/runtime_env.yaml")["excludes"]
    assert {".venv/", ".venv-submit/", "runs/", ".git/"} <= set(excludes)


def _submissions(readme: str) -> list[tuple[str, list[str]]]:
    """(job, its arguments) of every `make submit JOB=… ARGS="…"` and `ray job submit … -- python
    jobs/X.py …` line of the README."""
    found = []
    for line in readme.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line.startswith("make submit"):
            words = dict(w.split("=", 1) for w in shlex.split(line)[2:])
            found.append((words["JOB"], shlex.split(words.get("ARGS", ""))))
        elif line.startswith("ray job submit") and " -- python jobs/" in line:
            argv = shlex.split(line.split(" -- ", 1)[1])
            found.append((Path(argv[1]).stem, argv[2:]))
    return found


def _out_is_required() -> bool:
    from leukray.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    return any(a.required for a in run._actions if "--out" in a.option_strings)


@pytest.mark.skipif(_out_is_required(), reason="this CLI still requires --out even when the config file sets out:")
def test_every_documented_submission_parses_and_writes_to_a_uri():
    from leukray.cli import build_parser
    from leukray.config import load_yaml

    subcommand = {"pipeline": "run"}
    submissions = _submissions((REPO / "README.md").read_text())
    assert {job for job, _ in submissions} >= {"pipeline", "predict", "screen", "extract", "train", "tune"}
    for job, argv in submissions:
        args = build_parser().parse_args([subcommand.get(job, job), *argv])
        config = load_yaml(REPO / args.config) if getattr(args, "config", None) else {}
        out = args.out or config.get("out")
        assert out and out.startswith("s3://"), (job, argv)  # a job's outputs never land on a node's disk
