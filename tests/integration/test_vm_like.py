"""The cloud path of `fab setup`, run for real on VM-like local nodes (infra/local_vm.py): a non-root login user
with passwordless sudo, /opt/gpuforge created with sudo, a fresh venv with the exact torch build and the node
lock, no controller packages. `gpuforge up --login-user` -> setup -> setup again (nothing changes) -> a 2-node
`gpuforge train` -> `gpuforge down`, the commands the README gives for this mode.

The cluster is module-scoped: its first setup (two fresh venvs with torch) is the expensive part, done once.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from infra.cluster import ClusterInfo
from infra.local import destroy_local_cluster, our_processes
from infra.ssh import connect
from provision.node_lock import lock_digest, lock_requirements
from provision.setup import setup_cluster
from provision.steps.base import Cmd, command_line, root_command
from tests.support import TINY_CONVNET, gpuforge
from tests.vm_like import vm_home, vm_like_unavailable, vm_user

pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(vm_like_unavailable()), reason=vm_like_unavailable())]
FAST = [*TINY_CONVNET, "export=none", "quantize=false"]
NODE_INDEX = "node"  # the node's own pip configuration: this machine's registry, where the PyTorch index is not


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


def test_down_leaves_no_process_and_no_node_disk(vm):
    cluster, home, *_ = vm
    state = Path(cluster.state_dir)
    # removing the node disks (two venvs with torch) is most of it: minutes on a busy machine's disk
    res = gpuforge(home, "down", "--cluster", "vm", "--delete-data", "--yes", timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not our_processes(state) and not state.exists()
    assert not Path("/opt/gpuforge").exists()
