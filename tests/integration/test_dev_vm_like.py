"""Working on a VM-like node (the cloud path): a non-root sudo login user, /opt/gpuforge made by setup, a fresh
venv with torch and the node lock, and TensorFlow asked for beside them.

`gpuforge up --login-user` and `gpuforge setup --tensorflow` make one such node; then, with real clients:
the real OpenSSH client with the generated config, `gpuforge ssh` (work dir, venv), JupyterLab installed on
first use into that fresh venv as the login user (a kernel imports torch and TensorFlow from it), a served
model, and `down` with a notebook, a model server and a forward running: nothing is left behind.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from infra.cluster import ClusterInfo
from infra.local import destroy_local_cluster, our_processes
from infra.ssh import connect
from infra.ssh_config import main_config_path
from provision.node_lock import lock_requirements
from tests.support import TINY_CONVNET, finish, gpuforge, read_until, run, start_gpuforge, train_cmd
from tests.vm_like import vm_home, vm_like_unavailable, vm_user

pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(vm_like_unavailable()), reason=vm_like_unavailable())]
NAME = "devvm"
VENV = "/opt/gpuforge/venv"


@pytest.fixture(scope="module")
def vm():
    with vm_user() as user, vm_home() as home:
        try:
            up = gpuforge(home, "up", "--name", NAME, "--nodes", "1", "--login-user", user)
            assert up.returncode == 0, up.stderr
            setup = gpuforge(home, "setup", "--tensorflow", "--pip-index", "node", timeout=1200)
            assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr
            yield ClusterInfo.load(home / "clusters" / NAME / "cluster.json"), home, user
        finally:
            destroy_local_cluster(home / "clusters" / NAME)


def on_node(cluster, command: str):
    conn = connect(cluster, cluster.node(0))
    try:
        return conn.run(command, hide=True, warn=True)
    finally:
        conn.close()


def broken_requirements(cluster) -> list[str]:
    """`pip check` in the node's venv, less our own package's controller requirements (fabric, pulumi ...): the
    workload step installs gpuforge there with --no-deps on purpose, since a node runs only workloads/."""
    check = on_node(cluster, f"{VENV}/bin/python -m pip check")
    return [line for line in check.stdout.splitlines() if line.strip() and not line.startswith("gpuforge ")]


def test_tensorflow_sits_beside_the_node_lock_and_torch(vm):
    cluster, *_ = vm
    freeze = on_node(cluster, f"{VENV}/bin/python -m pip freeze --all").stdout
    installed = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1] for line in freeze.split() if "==" in line}
    moved = [pin for pin in lock_requirements()
             if installed.get(pin.split("==")[0].lower().replace("_", "-")) != pin.split("==")[1]]
    assert not moved, f"TensorFlow's install moved locked packages: {moved}"
    assert installed["tensorflow-cpu"] == "2.21.0"
    assert broken_requirements(cluster) == [], "every installed package's requirements hold"
    both = on_node(cluster, f"cd /opt/gpuforge && TF_CPP_MIN_LOG_LEVEL=2 {VENV}/bin/python -c "
                            "'import torch, tensorflow as tf; print(torch.__version__, tf.__version__, "
                            "float(torch.ones(2).sum()), float(tf.reduce_sum(tf.ones(2))))'")
    assert both.ok, both.stderr[-2000:]
    assert both.stdout.split()[-4:] == ["2.13.0+cpu", "2.21.0", "2.0", "2.0"]


def test_the_real_ssh_client_and_gpuforge_ssh_log_in_as_the_sudo_user(vm):
    cluster, home, user = vm
    real = subprocess.run(["ssh", "-F", str(main_config_path(home)), "-o", "BatchMode=yes", f"{NAME}-node-0",
                           "id -un; sudo -n id -un"], capture_output=True, text=True, timeout=30)
    assert real.returncode == 0, real.stderr
    assert real.stdout.split() == [user, "root"]
    ours = gpuforge(home, "ssh", "--", "pwd; echo $VIRTUAL_ENV; python -c 'import sys; print(sys.prefix)'")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.split() == ["/opt/gpuforge", VENV, VENV]


def test_jupyterlab_installs_into_the_fresh_venv_and_its_kernel_runs_there(vm):
    from jupyter_kernel_client import JupyterKernelClient

    cluster, home, user = vm
    proc = start_gpuforge(home, "jupyter")
    try:
        url, text = read_until(proc, r"http://127\.0\.0\.1:\d+/lab\?token=\w+", timeout=600)
        assert "installing jupyterlab==" in text
        parts = urllib.parse.urlparse(url)
        token = urllib.parse.parse_qs(parts.query)["token"][0]
        with JupyterKernelClient(server_url=f"http://{parts.netloc}", token=token) as kernel:
            reply = kernel.execute("import getpass, sys, torch; print(getpass.getuser(), sys.prefix); torch.__version__")
        assert reply["status"] == "ok", reply
        printed = "".join(o.get("text", "") for o in reply["outputs"] if o["output_type"] == "stream").split()
        assert printed == [user, VENV]
        result = next(o for o in reply["outputs"] if o["output_type"] == "execute_result")["data"]["text/plain"]
        assert result == "'2.13.0+cpu'"
        on_node_text = on_node(cluster, "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '; "
                                        "cat /opt/gpuforge/.gpuforge/services/jupyter/log").stdout
        assert token not in on_node_text, "the token is in no process list or log on the node"
        assert broken_requirements(cluster) == [], "JupyterLab's install left the venv consistent"
    finally:
        if proc.poll() is None:
            proc.send_signal(2)
        finish(proc, timeout=60)
    assert "jupyterlab" not in on_node(cluster, "ps -eo args").stdout


@pytest.fixture(scope="module")
def served_run(vm):
    cluster, *_ = vm
    storage = Path(cluster.state_dir) / "storage"
    res = run(train_cmd("--job", "convnet-digits", "--storage", str(storage), "--run-id", "vmfp", *TINY_CONVNET,
                        "max_steps=4", "quantize=false"), timeout=300)
    assert res.returncode == 0, res.stderr
    return (storage / "runs" / "vmfp").as_uri()


def test_down_ends_the_notebook_the_model_server_and_the_tunnels_and_leaves_nothing(vm, served_run):
    cluster, home, user = vm
    jupyter = start_gpuforge(home, "jupyter")
    read_until(jupyter, r"/lab\?token=", timeout=300)
    server = start_gpuforge(home, "serve", served_run)
    base, _ = read_until(server, r"http://127\.0\.0\.1:\d+", timeout=600)
    body = json.dumps({"inputs": [[[[0.0] * 64] * 64]]}).encode()
    with urllib.request.urlopen(urllib.request.Request(base + "/predict", body), timeout=30) as response:
        assert len(json.load(response)["outputs"][0]) == 10
    port = on_node(cluster, "cat /opt/gpuforge/.gpuforge/services/serve/service.json").stdout
    forward = start_gpuforge(home, "forward", str(json.loads(port)["port"]))
    read_until(forward, r"-> node-0", timeout=60)
    node_side = on_node(cluster, "ps -o user=,args= -e").stdout
    assert any(line.startswith(user) and "jupyterlab" in line for line in node_side.splitlines()), node_side
    assert any(line.startswith(user) and "workloads.serve" in line for line in node_side.splitlines()), node_side

    out = gpuforge(home, "down", timeout=180)
    assert out.returncode == 0, out.stderr
    for proc in (jupyter, server, forward):
        code, text = finish(proc, timeout=90)
        assert code != 0 and "closed" in text, text[-1500:]
    assert not our_processes(Path(cluster.state_dir)), "no node process, sshd or tunnel is left"
    assert subprocess.run(["pgrep", "-u", user], capture_output=True).returncode == 1, "nothing runs as the login user"
    with pytest.raises(OSError):
        urllib.request.urlopen(base + "/health", timeout=3)
