"""TensorFlow on the nodes: which build each node gets, who asks for it, what the job's workers are told.

The GPU cases use the facts fixtures (tests/unit/fixtures/facts/README.md says where they come from); the
plans run through invoke.MockContext, so a passing check is seen to prevent the install."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from invoke import MockContext, Result

from infra.cluster import ClusterInfo, NodeInfo
from provision.errors import MatrixError
from provision.facts import Facts, parse_facts
from provision.steps import step_names
from provision.steps.base import StepContext
from provision.steps.tensorflow import (
    TensorflowStep,
    load_tf_matrix,
    remember_frameworks,
    tf_build,
    wants_tensorflow,
)
from workloads.config import apply_overrides
from workloads.errors import ConfigError
from workloads.jobs import get_job
from workloads.launch import RunSpec, procs_per_node, run_env, validate_spec
from workloads.tf_trainer import tf_config

FIXTURES = Path(__file__).parent / "fixtures" / "facts"


def context(facts: Facts | None, extra=None, options=None, node="node-0") -> StepContext:
    nodes = (NodeInfo(name="node-0", rank=0, public_address="10.0.0.1", private_address="10.0.0.1"),
             NodeInfo(name="node-1", rank=1, public_address="10.0.0.2", private_address="10.0.0.2"))
    cluster = ClusterInfo(name="c", cloud="aws", nodes=nodes, extra=extra or {})
    return StepContext(cluster=cluster, node=cluster.node(node), facts=facts, options=options or {})


def fixture_facts(name: str) -> Facts:
    return parse_facts((FIXTURES / name).read_text())


@pytest.mark.parametrize("fixture, package", [
    ("aws_p4d_a100.txt", "tensorflow[and-cuda]"),        # A100 with R580: the CUDA 13.0 row
    ("aws_g5_a10g_dlami.txt", "tensorflow[and-cuda]"),   # a kept R570 driver: the CUDA 12.6 row
    ("gcp_g2_l4.txt", "tensorflow[and-cuda]"),
])
def test_gpu_nodes_get_the_cuda_build_of_their_row(fixture, package):
    facts = fixture_facts(fixture)
    build = tf_build(context(facts))
    assert build.package == package and build.version == load_tf_matrix()["cpu"].version
    assert build.requirement == f"{package}=={build.version}"


def test_a_cpu_node_gets_the_cpu_build():
    assert tf_build(context(Facts(os_id="ubuntu", os_version="22.04"))).requirement == "tensorflow-cpu==2.21.0"
    assert tf_build(context(None)).package == "tensorflow-cpu"


def test_every_cuda_of_the_version_matrix_has_a_tensorflow_row():
    from provision.versions import cuda_of_build, supported_os, version_set

    cudas = {cuda_of_build(b) for os_name in supported_os() for b in version_set(os_name).torch_builds()}
    assert cudas <= set(load_tf_matrix()) - {"cpu"}


def test_a_gpu_tensorflow_has_no_kernels_for_is_refused():
    facts = fixture_facts("aws_p4d_a100.txt")
    maxwell = dataclasses.replace(facts, gpus=tuple(dataclasses.replace(g, model="Tesla M60") for g in facts.gpus),
                                  gpu_pci_models=("Tesla M60",) * len(facts.gpu_pci_models))
    with pytest.raises(MatrixError, match="no kernels for Tesla M60"):
        tf_build(context(maxwell))


@pytest.mark.parametrize("extra, options, node, asked", [
    ({}, {}, "node-0", False),
    ({}, {"frameworks": ["tensorflow"]}, "node-1", True),
    ({"frameworks": ["tensorflow"]}, {}, "node-0", True),
    ({"node_frameworks": {"node-1": ["tensorflow"]}}, {}, "node-1", True),
    ({"node_frameworks": {"node-1": ["tensorflow"]}}, {}, "node-0", False),
])
def test_only_nodes_that_ask_get_tensorflow(extra, options, node, asked):
    ctx = context(Facts(os_id="ubuntu", os_version="22.04"), extra, options, node)
    assert wants_tensorflow(ctx) is asked
    assert (TensorflowStep().skip_reason(ctx) is None) is asked


def test_the_install_runs_in_the_node_venv_and_a_passing_check_prevents_it():
    ctx = context(Facts(os_id="ubuntu", os_version="22.04"), options={"frameworks": ["tensorflow"]})
    cmds = [c.run for c in TensorflowStep().plan(ctx)]
    assert cmds[-1].startswith("/opt/gpuforge/venv/bin/python -m pip install") and cmds[-1].endswith("tensorflow-cpu==2.21.0")
    probe = "ls -d /opt/gpuforge/venv/lib/python3*/site-packages/tensorflow_cpu-2.21.0.dist-info"
    assert TensorflowStep().check(MockContext(run={probe: Result(exited=0)}), ctx) is True
    assert TensorflowStep().check(MockContext(run={probe: Result(exited=2)}), ctx) is False


@pytest.mark.parametrize("setting, index", [("", ""), ("node", ""),
                                            ("https://pypi.example.corp/simple", " --index-url https://pypi.example.corp/simple")])
def test_the_install_keeps_the_node_lock_and_uses_the_setups_index(setting, index):
    ctx = context(Facts(os_id="ubuntu", os_version="22.04"), options={"frameworks": ["tensorflow"], "pip_index": setting})
    install = TensorflowStep().plan(ctx)[-1].run
    assert install.endswith(f"--no-warn-script-location{index} -c /opt/gpuforge/node-requirements.txt tensorflow-cpu==2.21.0")


def test_tensorflow_steps_run_after_the_venv_and_before_our_code():
    names = step_names()
    assert names.index("python_env") < names.index("tensorflow") < names.index("tensorflow-verify") < names.index("workload")


def test_setup_remembers_who_asked(tmp_path):
    assert remember_frameworks(tmp_path, []) == []
    assert remember_frameworks(tmp_path, ["tensorflow"], save=False) == ["tensorflow"]
    assert remember_frameworks(tmp_path, []) == [], "a dry run saves nothing"
    assert remember_frameworks(tmp_path, ["tensorflow"]) == ["tensorflow"]
    assert remember_frameworks(tmp_path, []) == ["tensorflow"], "a later plain setup keeps it"


def test_tf_config_names_every_worker_and_this_ones_index():
    config = json.loads(tf_config(["10.0.0.1", "10.0.0.2"], [2222, 2223], 1))
    assert config == {"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2223"]}, "task": {"type": "worker", "index": 1}}
    with pytest.raises(ValueError):
        tf_config(["10.0.0.1"], [2222, 2223], 0)


def test_the_launcher_gives_each_tensorflow_worker_its_tf_config_and_one_process():
    ctx = context(None)
    cluster = dataclasses.replace(ctx.cluster, storage_url="file:///tmp/s",
                                  nodes=tuple(dataclasses.replace(n, gpu_count=8) for n in ctx.cluster.nodes))
    spec = RunSpec(job="seed000-cnn-tf", nodes=2, run_id="tf1", storage_url="file:///tmp/s")
    nodes = validate_spec(cluster, spec)
    envs = [run_env(cluster, spec, nodes, n, 29500, [3001, 3002]) for n in nodes]
    assert [json.loads(e["TF_CONFIG"])["task"]["index"] for e in envs] == [0, 1]
    assert json.loads(envs[0]["TF_CONFIG"])["cluster"]["worker"] == ["10.0.0.1:3001", "10.0.0.2:3002"]
    assert all(procs_per_node(spec, n) == 1 for n in nodes), "MultiWorkerMirroredStrategy: one worker per node"
    torch_spec = RunSpec(job="convnet-digits", nodes=2, run_id="t1", storage_url="file:///tmp/s")
    assert "TF_CONFIG" not in run_env(cluster, torch_spec, nodes, nodes[0], 29500)
    with pytest.raises(ConfigError, match="one worker per node"):
        validate_spec(cluster, RunSpec(job="seed000-cnn-tf", nproc_per_node=2, run_id="x", storage_url="file:///tmp/s"))


def test_the_tensorflow_job_is_a_tensorflow_config_with_its_limits():
    cfg = get_job("seed000-cnn-tf")
    assert cfg.framework == "tensorflow" and get_job("seed000-cnn").framework == "torch"
    assert cfg.lr == 0.01 and cfg.optimizer == "sgd" and cfg.batch_size == 64  # the article's settings
    with pytest.raises(ConfigError, match="TensorFlow"):
        apply_overrides(cfg, ["quantize=true"])
