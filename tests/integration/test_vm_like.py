"""The cloud path of `fab setup`, run for real on VM-like local nodes (infra/local_vm.py): a non-root login user
with passwordless sudo, /opt/gpuforge created with sudo, a fresh venv with the exact torch build and the node
lock, no controller packages. `gpuforge up --login-user` -> setup -> setup again (nothing changes) -> a 2-node
`gpuforge train` -> `gpuforge down`, the commands the README gives for this mode.
Before the down, working on those nodes with real clients: TensorFlow on the node that asked for it, beside
the lock and torch; the real OpenSSH client and `gpuforge ssh`; JupyterLab installed on first use into the
fresh venv and run as the login user; a served model; and the down ends the notebook, the model server and a
forward left running: nothing is left behind.

The cluster is module-scoped: its first setup (two fresh venvs with torch) is the expensive part, done once.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from infra.cluster import ClusterInfo
from infra.local import destroy_local_cluster, our_processes
from infra.ssh import connect
from infra.ssh_config import main_config_path
from provision.node_lock import lock_digest, lock_requirements
from provision.setup import setup_cluster
from provision.steps.base import Cmd, command_line, root_command
from tests.support import TINY_CONVNET, finish, gpuforge, interrupt, read_until, run, start_gpuforge, train_cmd
from tests.vm_like import vm_home, vm_like_unavailable, vm_user

pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(vm_like_unavailable()), reason=vm_like_unavailable())]
FAST = [*TINY_CONVNET, "export=none", "quantize=false"]
NODE_INDEX = "node"  # the node's own pip configuration: this machine's registry, where the PyTorch index is not
VENV = "/opt/gpuforge/venv"


@pytest.fixture(scope="module")
def vm():
    with vm_user() as user, vm_home() as home:
        up = gpuforge(home, "up", "--name", "vm", "--nodes", "2", "--login-user", user)
        assert up.returncode == 0, up.stdout + up.stderr
        state = home / "clusters" / "vm"
        try:
            cluster = ClusterInfo.load(state / "cluster.json")
            yield cluster, home, user, setup_cluster(cluster, home, pip_index=NODE_INDEX)
        finally:
            if state.exists():
                destroy_local_cluster(state)


def on_node(cluster, rank: int, command: str):
    conn = connect(cluster, cluster.node(rank))
    try:
        return conn.run(command, hide=True, warn=True)
    finally:
        conn.close()


def test_first_setup_runs_the_cloud_plan_as_a_sudo_user(vm):
    cluster, home, user, first = vm
    assert all(r.ok for r in first), [r.error for r in first]
    for r in first:
        assert {"base", "python_env", "workload", "verify"} <= set(r.changed)
        assert r.facts.os_name == "debian-12" and not r.facts.has_gpu  # a CPU node off the GPU matrix is taken
    assert not Path("/opt/gpuforge").exists(), "the host's /opt must not see a node's disk"
    for rank in (0, 1):
        out = on_node(cluster, rank, "id -un; stat -c %U /opt; stat -c %U /opt/gpuforge; "
                                     "ls /opt/gpuforge/venv/lib/python3*/site-packages | grep -c gpuforge-controller; "
                                     "/opt/gpuforge/venv/bin/python -c 'import torch, sys; print(torch.__version__, sys.prefix)'")
        who, opt_owner, work_owner, controller_pth, torch_line = out.stdout.split("\n")[:5]
        assert (who, opt_owner, work_owner, controller_pth) == (user, "root", user, "0")
        assert torch_line == "2.13.0+cpu /opt/gpuforge/venv"  # the exact build, in a venv of its own


def test_every_node_runs_exactly_the_lock(vm):
    cluster, *_ = vm
    for rank in (0, 1):
        freeze = on_node(cluster, rank, "/opt/gpuforge/venv/bin/python -m pip freeze --all").stdout
        installed = {line.split("==")[0].lower().replace("_", "-"): line for line in freeze.split() if "==" in line}
        for pin in lock_requirements():
            name = pin.split("==")[0].lower().replace("_", "-")
            assert installed.get(name, "").lower().replace("_", "-") == pin.lower().replace("_", "-"), pin
        assert on_node(cluster, rank, "cat /opt/gpuforge/venv/gpuforge-lock.txt").stdout.strip() == lock_digest()


def test_setup_again_changes_nothing(vm):
    cluster, home, *_ = vm
    again = setup_cluster(cluster, home, pip_index=NODE_INDEX)
    assert all(r.ok and r.changed == [] for r in again), [(r.node, r.changed, r.error) for r in again]


ROOT_SCRIPT = (
    'id -u > "$GF_DIR/uid of sh.txt" && id -u | tee "$GF_DIR/piped.txt" > /dev/null; '
    'echo "it'"'"'s \\"quoted\\"" > "$GF_DIR/quoted.txt"; '
    'GF_WORDS="two words" sh -c \'echo "$GF_WORDS $(id -u)"\' > "$GF_DIR/prefixed.txt"; '
    'echo "$GF_GREETING" >> "$GF_DIR/env.txt"'
)


def test_root_command_runs_every_part_of_a_line_as_root(vm):
    """Compound commands, redirects, pipes, VAR=value prefixes, quoting, exported env: all of it as uid 0 through
    the one root function, while the user's own files stay the user's."""
    cluster, _, user, _ = vm
    folder = f"/home/{user}/root-test"
    assert on_node(cluster, 0, f"mkdir -p {folder} && echo mine > {folder}/mine.txt").ok
    conn = connect(cluster, cluster.head)
    try:
        cmd = Cmd(ROOT_SCRIPT, sudo=True, env=(("GF_DIR", folder), ("GF_GREETING", "hello 'there' \"you\"")))
        assert command_line(conn, cmd) == root_command(ROOT_SCRIPT, cmd.env) and command_line(conn, cmd).startswith("sudo -n sh -c ")
        result = conn.run(command_line(conn, cmd), hide=True, warn=True)
        assert result.ok, result.stderr
        listing = conn.run(f"cd {folder} && stat -c '%U %n' * && cat *.txt", hide=True).stdout
    finally:
        conn.close()
    root = Path(folder)
    assert (root / "uid of sh.txt").read_text().strip() == "0" and (root / "piped.txt").read_text().strip() == "0"
    assert (root / "quoted.txt").read_text().strip() == 'it\'s "quoted"'
    assert (root / "prefixed.txt").read_text().strip() == "two words 0"
    assert (root / "env.txt").read_text().strip() == "hello 'there' \"you\""
    owners = dict(line.split(" ", 1)[::-1] for line in listing.splitlines() if line.endswith(".txt"))
    assert owners.pop("mine.txt") == user and set(owners.values()) == {"root"}


def test_a_bare_sudo_prefix_would_have_run_only_the_first_command_as_root(vm):
    """Why the root function exists (Fabric's sudo() puts only the first word under sudo)."""
    cluster, _, user, _ = vm
    conn = connect(cluster, cluster.head)
    try:
        second = conn.sudo("true && id -u", hide=True, warn=True).stdout.strip()  # as BaseStep's mkdir && chown was
    finally:
        conn.close()
    assert second != "0"


def test_two_node_training_on_vm_like_nodes_records_its_environment(vm):
    cluster, home, *_ = vm
    res = gpuforge(home, "train", "--cluster", "vm", "--job", "convnet-digits", "--nodes", "2", "--run-id", "vm-both",
                   "--follow", *FAST, "max_steps=4", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    summary = json.loads((Path(cluster.state_dir) / "storage" / "runs" / "vm-both" / "summary.json").read_text())
    assert summary["world_size"] == 2
    env = summary["environment"]
    assert env["torch"] == "2.13.0+cpu" and env["cuda"] == "" and env["driver"] == ""
    assert env["lock"] == {"digest": lock_digest(), "differs": {}}  # the node ran exactly the lock


def hanging_index() -> tuple[socket.socket, str]:
    """A package index that accepts connections and never answers (a filtered proxy)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(8)], daemon=True).start()
    return server, f"http://127.0.0.1:{server.getsockname()[1]}/simple"


def test_an_unreachable_index_fails_fast_with_what_to_do(vm):
    """Regression (issue 8, defect 11): pip spent 100 s retrying an unreachable index. It is probed first now,
    and setup fails in seconds naming the index and what to do; the next setup with a good index recovers."""
    cluster, home, *_ = vm
    from provision.steps.core import PythonEnvStep

    assert on_node(cluster, 0, "rm /opt/gpuforge/venv/gpuforge-lock.txt").ok  # python_env must run again
    one = cluster.with_nodes(cluster.nodes[:1])
    server, url = hanging_index()
    try:
        started = time.monotonic()
        (report,) = setup_cluster(one, home, steps=[PythonEnvStep()], pip_index=url)
        took = time.monotonic() - started
    finally:
        server.close()
    assert not report.ok and took < 40, (report.error, took)
    assert f"the package index {url} did not answer within 10 s" in report.error
    assert "GPUFORGE_PIP_INDEX=node" in report.error
    (again,) = setup_cluster(one, home, steps=[PythonEnvStep()], pip_index=NODE_INDEX)
    assert again.ok and again.changed == ["python_env"], again.error


# -- working on the nodes, the cloud path: TensorFlow beside the lock, ssh, a notebook, a served model, down ------


def broken_requirements(cluster, rank: int) -> list[str]:
    """`pip check` in the node's venv, less our own package's controller requirements (fabric, pulumi ...): the
    workload step installs gpuforge there with --no-deps on purpose, since a node runs only workloads/."""
    check = on_node(cluster, rank, f"{VENV}/bin/python -m pip check")
    return [line for line in check.stdout.splitlines() if line.strip() and not line.startswith("gpuforge ")]


def test_tensorflow_on_the_node_that_asked_sits_beside_the_lock_and_torch(vm):
    cluster, home, *_ = vm
    asked = dataclasses.replace(cluster, extra={**cluster.extra, "node_frameworks": {"node-1": ["tensorflow"]}})
    reports = setup_cluster(asked, home, pip_index=NODE_INDEX)
    assert all(r.ok for r in reports), [r.error for r in reports]
    assert "tensorflow" not in reports[0].changed and {"tensorflow", "tensorflow-verify"} <= set(reports[1].changed)
    freeze = on_node(cluster, 1, f"{VENV}/bin/python -m pip freeze --all").stdout
    installed = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1] for line in freeze.split() if "==" in line}
    moved = [pin for pin in lock_requirements()
             if installed.get(pin.split("==")[0].lower().replace("_", "-")) != pin.split("==")[1]]
    assert not moved, f"TensorFlow's install moved locked packages: {moved}"
    assert installed["tensorflow-cpu"] == "2.21.0"
    assert broken_requirements(cluster, 1) == [], "every installed package's requirements hold"
    both = on_node(cluster, 1, f"cd /opt/gpuforge && TF_CPP_MIN_LOG_LEVEL=2 {VENV}/bin/python -c "
                               "'import torch, tensorflow as tf; print(torch.__version__, tf.__version__, "
                               "float(torch.ones(2).sum()), float(tf.reduce_sum(tf.ones(2))))'")
    assert both.ok, both.stderr[-2000:]
    assert both.stdout.split()[-4:] == ["2.13.0+cpu", "2.21.0", "2.0", "2.0"]
    assert not on_node(cluster, 0, f"{VENV}/bin/python -c 'import tensorflow'").ok, "node-0 did not ask for it"


def test_the_real_ssh_client_and_gpuforge_ssh_log_in_as_the_sudo_user(vm):
    cluster, home, user, _ = vm
    assert gpuforge(home, "ssh-config", "--cluster", "vm").returncode == 0  # the file a user's ~/.ssh/config includes
    real = subprocess.run(["ssh", "-F", str(main_config_path(home)), "-o", "BatchMode=yes", "vm-node-1",
                           "id -un; sudo -n id -un"], capture_output=True, text=True, timeout=30)
    assert real.returncode == 0, real.stderr
    assert real.stdout.split() == [user, "root"]
    ours = gpuforge(home, "ssh", "--cluster", "vm", "--", "pwd; echo $VIRTUAL_ENV; python -c 'import sys; print(sys.prefix)'")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.split() == ["/opt/gpuforge", VENV, VENV]


@pytest.fixture(scope="module")
def sessions():
    """Foreground commands (jupyter, serve, forward) left running for the down test to end."""
    started: list = []
    yield started
    for proc in started:  # a failed check leaves nothing running (Ctrl-C closes what each one opened)
        if proc.poll() is None:
            interrupt(proc)


def test_a_notebook_and_a_served_model_in_the_fresh_venv_as_the_login_user(vm, sessions):
    """JupyterLab and LitServe installed on first use into the fresh venv (under the lock), run as the login
    user; a kernel imports the node's torch; both and a forward are left running for the down test."""
    from jupyter_kernel_client import JupyterKernelClient

    cluster, home, user, _ = vm
    storage = Path(cluster.state_dir) / "storage"
    res = run(train_cmd("--job", "convnet-digits", "--storage", str(storage), "--run-id", "vmfp", *FAST, "max_steps=4",
                        "export=torch.export"), timeout=300)
    assert res.returncode == 0, res.stderr
    jupyter = start_gpuforge(home, "jupyter", "--cluster", "vm")
    sessions.append(jupyter)
    url, text = read_until(jupyter, r"http://127\.0\.0\.1:\d+/lab\?token=\w+", timeout=600)
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
    seen = on_node(cluster, 0, "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '; "
                               "cat /opt/gpuforge/.gpuforge/services/jupyter/log").stdout
    assert "jupyterlab" in seen and token not in seen, "the token is in no process list or log on the node"
    assert broken_requirements(cluster, 0) == [], "JupyterLab's install (under the lock) left the venv consistent"

    server = start_gpuforge(home, "serve", (storage / "runs" / "vmfp").as_uri(), "--cluster", "vm", "--node", "1")
    sessions.append(server)
    base, text = read_until(server, r"http://127\.0\.0\.1:\d+", timeout=600)
    assert "installing litserve==" in text, "a fresh venv gets LitServe on first use"
    body = json.dumps({"inputs": [[[[0.0] * 64] * 64]]}).encode()
    request = urllib.request.Request(base + "/predict", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert len(json.load(response)["outputs"][0]) == 10
    forward = start_gpuforge(home, "forward", "9", "--cluster", "vm", "--node", "1")
    sessions.append(forward)
    read_until(forward, r"-> node-1", timeout=60)
    for rank, program in ((0, "jupyterlab"), (1, "workloads.serve")):
        rows = on_node(cluster, rank, "ps -o user:32=,args= -e").stdout.splitlines()
        assert any(row.split()[0] == user and program in row for row in rows), rows


def test_down_leaves_no_process_and_no_node_disk(vm, sessions):
    cluster, home, user, _ = vm
    state = Path(cluster.state_dir)
    # removing the node disks (two venvs with torch, one with TensorFlow) is most of it: minutes on a busy disk
    res = gpuforge(home, "down", "--cluster", "vm", "--delete-data", "--yes", timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not our_processes(state) and not state.exists()
    assert not Path("/opt/gpuforge").exists()
    for proc in sessions:  # the notebook, the model server and the forward the test before left running
        code, text = finish(proc, timeout=90)
        assert code != 0 and "closed" in text, text[-1500:]
    assert subprocess.run(["pgrep", "-u", user], capture_output=True).returncode == 1, "nothing runs as the login user"
