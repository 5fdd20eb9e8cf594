"""TensorFlow on the nodes that ask for it, and seed article 000's TensorFlow CNN trained across 2 nodes.

`gpuforge setup --tensorflow` installs the CPU build (these nodes have no GPU) into each node's own venv
(local nodes otherwise borrow the controller's packages, which hold no TensorFlow) and verifies it; then
`gpuforge train --job seed000-cnn-tf --nodes 2` runs one Keras worker per node under
MultiWorkerMirroredStrategy with the TF_CONFIG the launcher wrote, to >= 0.90 test accuracy, and the model
it saves serves like any other.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from infra.cluster import ClusterInfo
from tests.support import gpuforge, interrupt, read_until, run, start_gpuforge

NAME = "tfit"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("gpuforge-tf")


@pytest.fixture(scope="module")
def cluster(home):
    up = gpuforge(home, "up", "--name", NAME, "--nodes", "2")
    assert up.returncode == 0, up.stderr
    setup = gpuforge(home, "setup", "--tensorflow", timeout=900)
    c = ClusterInfo.load(home / "clusters" / NAME / "cluster.json")
    yield c, setup
    gpuforge(home, "down", "--cluster", NAME)


def node_python(c, rank):
    return str(Path(c.node(rank).workdir) / "venv" / "bin" / "python")


def test_setup_installs_tensorflow_into_each_nodes_own_env_and_verifies_it(cluster, home):
    c, setup = cluster
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert len(re.findall(r"changed\s+tensorflow \(", setup.stdout)) == 2
    assert len(re.findall(r"changed\s+tensorflow-verify", setup.stdout)) == 2
    for rank in (0, 1):
        out = run([node_python(c, rank), "-c", "import tensorflow as tf; print(tf.__file__); "
                   "print([d.device_type for d in tf.config.list_physical_devices()])"], timeout=120)
        assert out.returncode == 0, out.stderr
        path, devices = out.stdout.strip().splitlines()[-2:]
        assert path.startswith(c.node(rank).workdir + "/venv/"), "TensorFlow is the node's own, not borrowed"
        assert devices == "['CPU']"
        assert list(Path(c.node(rank).workdir, "venv", "lib").glob("python3*/site-packages/tensorflow_cpu-2.21.0.dist-info"))


def test_a_later_plain_setup_keeps_tensorflow_and_changes_nothing(cluster, home):
    again = gpuforge(home, "setup", timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(re.findall(r"unchanged\s+tensorflow( -|$)", again.stdout, re.M)) == 2
    assert "nothing changed" in again.stdout


def test_seed000_cnn_tf_trains_on_2_nodes_to_090_and_saves_its_model(cluster, home):
    c, _ = cluster
    out = gpuforge(home, "train", "--job", "seed000-cnn-tf", "--nodes", "2", "--run-id", "tf1", "--follow", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    run_dir = Path(c.state_dir) / "storage" / "runs" / "tf1"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["framework"] == "tensorflow"
    assert summary["test_accuracy"] >= 0.90, summary
    assert (run_dir / "model.keras").stat().st_size > 0
    replicas = sorted((run_dir / "replicas").glob("worker-*.sha256"))
    assert [p.name for p in replicas] == ["worker-0.sha256", "worker-1.sha256"]
    assert len({p.read_text() for p in replicas}) == 1, "both workers end with the same weights"
    assert summary["weights_sha256"] == replicas[0].read_text()
    configs = [json.loads(json.loads((Path(c.node(r).workdir) / "runs" / "tf1" / "run.json").read_text())["env"]["TF_CONFIG"])
               for r in (0, 1)]
    assert [cfg["task"] for cfg in configs] == [{"type": "worker", "index": 0}, {"type": "worker", "index": 1}]
    workers = configs[0]["cluster"]["worker"]
    assert [w.split(":")[0] for w in workers] == [n.private_address for n in c.nodes] and len(set(workers)) == 2
    # the model loads with plain Keras, in a node's env, and is as accurate as the summary says
    check = ("import sys; sys.modules['workloads'] = None\n"
             "import keras, numpy as np\n"
             f"m = keras.saving.load_model({str(run_dir / 'model.keras')!r})\n"
             "print(m(np.zeros((2, 24, 24, 3), 'float32')).shape)\n")
    loaded = run([node_python(c, 1), "-I", "-c", check], timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip().splitlines()[-1] == "(2, 10)"


def test_the_tensorflow_model_serves_like_the_others(cluster, home):
    proc = start_gpuforge(home, "serve", "tf1")
    base, banner = read_until(proc, r"http://127\.0\.0\.1:\d+", timeout=240)
    try:
        assert "model.keras" in banner
        body = json.dumps({"inputs": [[[[0.0] * 3] * 24] * 24]}).encode()
        request = urllib.request.Request(base + "/predict", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        assert len(answer["outputs"]) == 1 and len(answer["outputs"][0]) == 10
        assert abs(sum(answer["outputs"][0]) - 1.0) < 1e-4, "the softmax head's probabilities"
    finally:
        code, _ = interrupt(proc)
    assert code == 0


def test_a_tensorflow_job_on_nodes_without_it_is_refused_before_it_starts(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert gpuforge(home, "up", "--name", "notf", "--nodes", "1").returncode == 0
    try:
        assert gpuforge(home, "setup", timeout=300).returncode == 0
        out = gpuforge(home, "train", "--job", "seed000-cnn-tf", "--run-id", "x")
        assert out.returncode != 0 and "no TensorFlow in its environment; run `gpuforge setup --tensorflow`" in out.stderr
        assert not (home / "clusters" / "notf" / "runs" / "x.json").exists(), "nothing was started or recorded"
    finally:
        gpuforge(home, "down", "--cluster", "notf")
