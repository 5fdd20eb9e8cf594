"""`gpuforge serve`: a finished run's model over HTTP on a node, through the SSH tunnel, under real load.

Runs trained here into the cluster's storage (fp32 with its int8 copy, and a distilled student) serve on a
local node; the answers equal the same model called in-process; 32 concurrent clients are batched; bad
requests get their own 4xx without failing the requests batched beside them; `--stop` ends it. The client
call the README shows runs as written.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from infra.local import create_local_cluster, destroy_local_cluster, our_processes
from provision import inventory
from provision.setup import setup_cluster
from tests.support import ROOT, TINY_CONVNET, finish, gpuforge, interrupt, read_until, run, start_gpuforge, train_cmd
from workloads.data import load_image_data
from workloads.serve_model import load_run_model

SERVE_URL = r"http://127\.0\.0\.1:\d+"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("gpuforge-serve")


@pytest.fixture(scope="module")
def cluster(home):
    c = create_local_cluster("srvit", 1, home)
    inventory.select(home, c.name)
    reports = setup_cluster(c, home)
    assert all(r.ok for r in reports), [r.error for r in reports]
    yield c
    destroy_local_cluster(Path(c.state_dir))


@pytest.fixture(scope="module")
def runs(cluster):
    storage = Path(cluster.state_dir) / "storage"
    for run_id, job, extra in (("fp", "convnet-digits", ["quantize=true"]),
                               ("student", "convnet-digits-student", ["teacher=fp"])):
        res = run(train_cmd("--job", job, "--storage", str(storage), "--run-id", run_id, *TINY_CONVNET, "max_steps=12",
                            *extra), timeout=300)
        assert res.returncode == 0, res.stderr
    return {name: (storage / "runs" / name).as_uri() for name in ("fp", "student")}


def post(base: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(base + "/predict", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def test_split():
    return load_image_data((1, 64, 64), 0.15, 0.15).test


@pytest.fixture(scope="module")
def fp32_server(cluster, home, runs):
    proc = start_gpuforge(home, "serve", runs["fp"])
    base, text = read_until(proc, SERVE_URL, timeout=180)
    yield base, text
    if proc.poll() is None:
        interrupt(proc)


def test_health_answers_once_the_model_is_loaded(fp32_server):
    base, banner = fp32_server
    with urllib.request.urlopen(base + "/health", timeout=10) as response:
        assert response.status == 200 and response.read() == b"ok"
    with urllib.request.urlopen(base + "/info", timeout=10) as response:
        model = json.load(response)["model"]
    assert model["kind"] == "fp32" and model["file"] == "model.pt2" and model["input_shape"] == [1, 64, 64]
    assert "fp32: model.pt2" in banner


def test_predictions_equal_the_same_model_called_in_process(fp32_server, runs, test_split):
    base, _ = fp32_server
    x = test_split.x[:5].numpy()
    status, body = post(base, json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200
    local = load_run_model(runs["fp"], kind="fp32", device="cpu").predict(x)
    np.testing.assert_allclose(np.asarray(body["outputs"]), local, rtol=1e-4, atol=1e-4)
    assert body["labels"] == local.argmax(axis=1).tolist()


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "JSON decode error"),
    (b'{"input": [[1]]}', "inputs: Field required"),
    (b'{"inputs": []}', "inputs is empty"),
    (json.dumps({"inputs": np.zeros((2, 64, 64)).tolist()}).encode(), "each input must have shape [1, 64, 64]; got a batch of shape [2, 64, 64]"),
    (b'{"inputs": [[[1, 2]], [[3]]]}', "ragged, or not numbers"),
    (b'{"inputs": "abc"}', "inputs: Input should be a valid list"),
])
def test_malformed_or_wrongly_shaped_input_is_a_clear_4xx(fp32_server, body, fragment):
    base, _ = fp32_server
    status, answer = post(base, body)
    assert 400 <= status < 500 and fragment in answer["error"], (status, answer)


def test_concurrent_requests_are_batched_and_a_bad_one_fails_alone(cluster, fp32_server, test_split):
    base, _ = fp32_server
    one = json.dumps({"inputs": test_split.x[:1].tolist()}).encode()
    bad = json.dumps({"inputs": np.zeros((1, 32, 32)).tolist()}).encode()
    results: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(8):
            is_bad = (i, j) == (3, 3)
            status, _ = post(base, bad if is_bad else one)
            with lock:
                results.append((status, is_bad))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 256
    assert all(status == 200 for status, is_bad in results if not is_bad)
    assert [status for status, is_bad in results if is_bad] == [422]
    stats_path = Path(cluster.node(0).workdir) / ".gpuforge" / "services" / "serve" / "stats.json"
    import time

    time.sleep(0.5)  # the worker rewrites its stats at most every 0.2 s
    stats = json.loads(stats_path.read_text())
    assert stats["largest_batch"] > 1 and stats["batches"] < stats["requests"], stats


def test_the_readme_client_call_works_as_written(fp32_server):
    base, _ = fp32_server
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(# the client call.*?)```", readme, re.S).group(1)
    port = base.rsplit(":", 1)[1]
    out = run([__import__("sys").executable, "-c", snippet.replace("8000", port)])
    assert out.returncode == 0, out.stderr
    predicted, truth = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert len(predicted) == len(truth) == 8


def test_serve_stop_from_another_terminal_ends_it(cluster, home, fp32_server):
    out = gpuforge(home, "serve", "--stop")
    assert out.returncode == 0 and "stopped serve on node-0" in out.stdout


@pytest.mark.parametrize("name, kind, file", [("fp", "int8", "model_int8.ts"), ("student", "auto", "model.pt2")])
def test_the_int8_and_the_distilled_models_serve_the_same_way(cluster, home, runs, test_split, name, kind, file):
    proc = start_gpuforge(home, "serve", runs[name], "--kind", kind)
    base, banner = read_until(proc, SERVE_URL, timeout=180)
    try:
        assert file in banner
        x = test_split.x[:4].numpy()
        status, body = post(base, json.dumps({"inputs": x.tolist()}).encode())
        assert status == 200
        local = load_run_model(runs[name], kind=kind, device="cpu").predict(x)
        np.testing.assert_allclose(np.asarray(body["outputs"]), local, rtol=1e-4, atol=1e-4)
    finally:
        code, _ = interrupt(proc)
    assert code == 0
    assert not [cmd for _, cmd in our_processes(Path(cluster.state_dir)) if "workloads.serve" in " ".join(cmd)]


@pytest.mark.parametrize("args, message", [
    (["serve", "--kind", "fp16"], "--kind must be one of auto, fp32, int8; got 'fp16'"),
    (["serve", "nosuchrun"], "no run 'nosuchrun' on cluster srvit"),
    (["serve", "file:///nowhere/runs/x"], "has no config.json: is it a finished run?"),
    (["serve", "--max-batch", "0"], "--max-batch must be >= 1"),
])
def test_bad_input_is_one_line_and_starts_nothing(cluster, home, runs, args, message):
    out = gpuforge(home, *args)
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not [cmd for _, cmd in our_processes(Path(cluster.state_dir)) if "workloads.serve" in " ".join(cmd)]


def test_nodes_that_did_not_ask_have_no_tensorflow(cluster):
    venv = Path(cluster.node(0).workdir) / "venv"
    out = run([str(venv / "bin" / "python"), "-c", "import tensorflow"])
    assert out.returncode != 0 and "No module named 'tensorflow'" in out.stderr
