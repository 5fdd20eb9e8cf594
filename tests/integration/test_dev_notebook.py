"""A notebook and TensorBoard on a node, through the SSH tunnel, with real clients.

`gpuforge jupyter` installs JupyterLab into the node's own venv on first use and starts it there; a real
Jupyter client (REST + kernel websocket, jupyter-kernel-client) runs `import torch; torch.__version__` in a
kernel of the node's env through the tunnel, and Debian's headless Chromium renders the lab page.
`gpuforge tensorboard` serves a run's event files the same way. Ctrl-C, `--stop` and `down` end them.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from infra.local import create_local_cluster, destroy_local_cluster, our_processes
from provision import inventory
from provision.setup import setup_cluster
from tests.support import TINY_CONVNET, finish, gpuforge, interrupt, read_until, run, start_gpuforge, train_cmd

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("gpuforge-nb")


@pytest.fixture(scope="module")
def cluster(home):
    c = create_local_cluster("nbit", 1, home)
    inventory.select(home, c.name)
    reports = setup_cluster(c, home)
    assert all(r.ok for r in reports), [r.error for r in reports]
    yield c
    destroy_local_cluster(Path(c.state_dir))


def service_procs(cluster, word):
    return [cmd for _, cmd in our_processes(Path(cluster.state_dir)) if any(word in part for part in cmd)]


def test_jupyterlab_runs_a_kernel_in_the_nodes_env_through_the_tunnel(cluster, home, tmp_path):
    from jupyter_kernel_client import JupyterKernelClient

    assert importlib.util.find_spec("jupyterlab") is None, "the controller has no JupyterLab: the node gets its own"
    proc = start_gpuforge(home, "jupyter")
    try:
        url, text = read_until(proc, r"http://127\.0\.0\.1:\d+/lab\?token=\w+", timeout=300)
        assert "installing jupyterlab==" in text, "first use installs it into the node's env"
        node_site = list(Path(cluster.node(0).workdir, "venv", "lib").glob("python3*/site-packages/jupyterlab"))
        assert node_site, "JupyterLab lands in the node's own venv"
        parts = urllib.parse.urlparse(url)
        token = urllib.parse.parse_qs(parts.query)["token"][0]
        assert not any(token in " ".join(cmd) for _, cmd in our_processes(Path(cluster.state_dir))), \
            "the token is in no process's command line"
        with JupyterKernelClient(server_url=f"http://{parts.netloc}", token=token) as kernel:
            reply = kernel.execute("import sys, torch; print(sys.prefix); torch.__version__")
        assert reply["status"] == "ok", reply
        printed = "".join(o.get("text", "") for o in reply["outputs"] if o["output_type"] == "stream").strip()
        result = next(o for o in reply["outputs"] if o["output_type"] == "execute_result")["data"]["text/plain"]
        assert printed == f"{cluster.node(0).workdir}/venv"
        import torch

        assert result == repr(torch.__version__)
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://{parts.netloc}/api/kernels", timeout=10)  # no token: no access
        assert denied.value.code == 403

        chromium = shutil.which("chromium")
        assert chromium, "Debian's chromium is installed by `make sysdeps`"
        profile = tmp_path / "chromium-profile"
        dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                              "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        assert "jp-LabShell" in dom and "jp-Launcher" in dom, dom[-2000:]
        shot = tmp_path / "lab.png"
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                        "--window-size=1280,800", f"--screenshot={shot}", url], capture_output=True, timeout=120)
        assert shot.stat().st_size > 20_000, "a rendered lab, not a blank page"
    finally:
        code, _ = interrupt(proc)  # a failed check leaves no JupyterLab for the tests after it
    assert code == 0
    assert not service_procs(cluster, "jupyterlab") and not service_procs(cluster, "ipykernel")


@pytest.fixture(scope="module")
def events_run(cluster):
    storage = Path(cluster.state_dir) / "storage"
    res = run(train_cmd("--job", "convnet-digits", "--storage", str(storage), "--run-id", "tb1", *TINY_CONVNET,
                        "tensorboard=true", "max_steps=4", "log_every=1", "export=none", "quantize=false"))
    assert res.returncode == 0, res.stderr
    return (storage / "runs" / "tb1").as_uri()


def test_tensorboard_serves_the_runs_curves_until_stop(cluster, home, events_run):
    proc = start_gpuforge(home, "tensorboard", events_run)
    url, _ = read_until(proc, r"http://127\.0\.0\.1:\d+/", timeout=120)
    with urllib.request.urlopen(url + "data/plugin/scalars/tags", timeout=20) as response:
        tags = json.load(response)
    assert "train/loss" in tags["."], tags
    with urllib.request.urlopen(url + "data/plugin/scalars/scalars?run=.&tag=train/loss", timeout=20) as response:
        assert [point[1] for point in json.load(response)] == [1, 2, 3, 4]
    again = gpuforge(home, "tensorboard", events_run)
    assert again.returncode != 0 and "already runs on node-0" in again.stderr
    stop = gpuforge(home, "tensorboard", "--stop")
    assert stop.returncode == 0 and "stopped tensorboard on node-0" in stop.stdout
    code, text = finish(proc, timeout=30)
    assert code == 0 and "tensorboard on node-0 stopped" in text
    assert not service_procs(cluster, "workloads.board")


def test_a_run_without_events_is_one_clear_line_and_nothing_keeps_running(cluster, home, tmp_path):
    out = gpuforge(home, "tensorboard", (tmp_path / "runs" / "nothing").as_uri(), timeout=120)
    assert out.returncode != 0 and "has no TensorBoard events" in out.stderr
    assert "Traceback" not in out.stderr
    assert not service_procs(cluster, "workloads.board")


@pytest.mark.parametrize("args, message", [
    (["jupyter", "--port", "70000"], "--port must be a port number 0..65535 (0: a free one); got 70000"),
    (["jupyter", "--node", "9"], "cluster nbit has no node '9'; nodes: 0/node-0"),
    (["jupyter", "--port", "BUSY"], "local port BUSY is in use; pick another with --port"),
    (["tensorboard", "--port", "-1"], "--port must be a port number 0..65535 (0: a free one); got -1"),
])
def test_bad_input_is_one_line_and_starts_nothing(cluster, home, args, message):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = str(busy.getsockname()[1])
        out = gpuforge(home, *[a.replace("BUSY", port) for a in args])
    assert out.returncode != 0 and message.replace("BUSY", port) in out.stderr, out.stderr
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stdout + out.stderr
    assert not service_procs(cluster, "jupyterlab") and not service_procs(cluster, "workloads.board")


def test_down_of_a_hosts_cluster_stops_its_servers_and_tunnels_and_the_machines_keep_running(cluster, home, events_run,
                                                                                             tmp_path):
    node = cluster.node(0)  # the user's own machine, as a hosts file names it
    hosts = tmp_path / "lab.yaml"
    hosts.write_text(f"user: {node.user}\nkey: {node.key_path}\nworkdir: {node.workdir}\nhosts:\n"
                     f"  - address: {node.public_address}\n    port: {node.ssh_port}\n")
    assert gpuforge(home, "up", "--hosts", str(hosts)).returncode == 0
    started = []
    try:
        board = start_gpuforge(home, "tensorboard", events_run, "--cluster", "lab")
        started.append(board)
        read_until(board, r"http://127\.0\.0\.1:\d+/", timeout=120)
        forward = start_gpuforge(home, "forward", "9", "--cluster", "lab")
        started.append(forward)
        read_until(forward, r"-> node-0", timeout=30)
        out = gpuforge(home, "down", "--cluster", "lab")
        assert out.returncode == 0, out.stderr
        assert re.search(r"ended tensorboard on node-0, [12] SSH session\(s\) here", out.stdout), out.stdout
        code, text = finish(board, timeout=60)  # its server stopped (or, first, its tunnel closed)
        assert "tensorboard on node-0 stopped" in text or "closed" in text, text[-1500:]
        code, text = finish(forward, timeout=60)
        assert code != 0 and "tunnel to node-0 closed" in text, text[-1500:]
        assert not service_procs(cluster, "workloads.board")
        assert gpuforge(home, "exec", "--cluster", "nbit", "--", "true").returncode == 0, "the machine keeps running"
    finally:
        for proc in started:  # a failed check leaves nothing running (Ctrl-C closes what each one opened)
            if proc.poll() is None:
                interrupt(proc)
        inventory.select(home, cluster.name)


def test_down_stops_jupyterlab_and_its_tunnel_and_leaves_the_users_own_processes_on_the_storage(cluster, home,
                                                                                               events_run):
    storage = Path(cluster.state_dir) / "storage"
    watcher = subprocess.Popen(["tail", "-f", str(storage / "runs" / "tb1" / "config.json")], cwd=storage,
                               stdout=subprocess.DEVNULL)  # the user's: the storage folder outlives the cluster
    try:
        proc = start_gpuforge(home, "jupyter")
        read_until(proc, r"/lab\?token=", timeout=180)
        out = gpuforge(home, "down")
        assert out.returncode == 0, out.stderr
        code, text = finish(proc, timeout=60)
        assert code != 0 and "closed" in text
        assert not our_processes(Path(cluster.state_dir))
        assert watcher.poll() is None, "down killed a process of the user's that only reads the kept storage"
    finally:
        watcher.kill()
        watcher.wait()
