"""What the launcher would start, checked without starting anything."""

import pytest

from infra.cluster import ClusterInfo, NodeInfo
from workloads.errors import ConfigError
from workloads.launch import RunSpec, node_command, run_env, validate_spec

NODES = tuple(NodeInfo(name=f"node-{i}", rank=i, public_address=f"203.0.113.{i}", private_address=f"10.0.0.{i}",
                       gpu_count=8, workdir="/opt/gpuforge") for i in range(3))
CLUSTER = ClusterInfo(name="c", cloud="aws", nodes=NODES, storage_url="s3://bucket")


def spec(**kw):
    return RunSpec(**{"job": "convnet-digits", "run_id": "r1", "storage_url": "s3://bucket", **kw})


def test_environment_has_torchrun_gpuforge_skypilot_and_dstack_variables():
    env = run_env(CLUSTER, spec(nodes=2), list(NODES[:2]), NODES[1], 29555)
    assert env["MASTER_ADDR"] == "10.0.0.0" and env["MASTER_PORT"] == "29555"
    assert (env["NODE_RANK"], env["NNODES"], env["NPROC_PER_NODE"]) == ("1", "2", "8")
    assert env["GPUFORGE_RUN_ID"] == "r1" and env["GPUFORGE_STORAGE"] == "s3://bucket/runs/r1"
    assert env["SKYPILOT_NODE_RANK"] == "1" and env["SKYPILOT_NODE_IPS"] == "10.0.0.0\n10.0.0.1"
    assert env["SKYPILOT_NUM_NODES"] == "2" and env["SKYPILOT_NUM_GPUS_PER_NODE"] == "8"
    assert env["DSTACK_NODE_RANK"] == "1" and env["DSTACK_MASTER_NODE_IP"] == "10.0.0.0"
    assert env["DSTACK_NODES_IPS"] == "10.0.0.0\n10.0.0.1" and env["DSTACK_NODES_NUM"] == "2"
    assert env["DSTACK_GPUS_PER_NODE"] == "8"
    assert "OMP_NUM_THREADS" not in env  # only local clusters share cores


def test_torchrun_command_uses_static_rendezvous_on_rank0():
    cmd, cwd = node_command(spec(nodes=3), list(NODES), NODES[2], 29500)
    assert cmd[:3] == ["/opt/gpuforge/venv/bin/python", "-m", "workloads.agent"]  # torchrun without its exit-barrier race
    assert "--nnodes=3" in cmd and "--node-rank=2" in cmd and "--nproc-per-node=8" in cmd
    assert "--master-addr=10.0.0.0" in cmd and "--master-port=29500" in cmd
    assert cmd[cmd.index("-m", 3) + 1] == "workloads.train" and cmd[-4:] == ["--run-id", "r1", "--storage", "s3://bucket"]
    assert cwd == "/opt/gpuforge/runs/r1"


def test_script_runs_from_its_shipped_folder(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')")
    cmd, cwd = node_command(spec(job="", script=str(script), args=["--lr", "3"]), list(NODES), NODES[0], 1)
    assert cmd[-3:] == ["/opt/gpuforge/runs/r1/code/train.py", "--lr", "3"] and cwd == "/opt/gpuforge/runs/r1/code"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nodes": 4}, "--nodes 4 is more than cluster c has (3)"),
        ({"job": "nope"}, "unknown job 'nope'"),
        ({"args": ["lr=x"]}, "lr expects a number"),
        ({"job": "", "script": "/no/such/train.py"}, "--script /no/such/train.py: no such file"),
        ({"storage_url": ""}, "has no storage URL"),
    ],
)
def test_bad_requests_fail_before_anything_starts(kwargs, message):
    with pytest.raises(ConfigError) as info:
        validate_spec(CLUSTER, spec(**kwargs))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nodes": -1}, "--nodes must be >= 1"),
        ({"job": "", "script": ""}, "exactly one of --job NAME or --script PATH"),
        ({"run_id": "a b"}, "run id 'a b' must be"),
    ],
)
def test_run_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        spec(**kwargs)
