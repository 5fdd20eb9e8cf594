"""Autostop on a VM-like local node (infra/local_vm.py), where root matters: the cloud layout (root's files in the
node's own /etc, /usr/local and /var/lib, installed with sudo by a non-root login user), the watcher running as
root, and its stop ending the whole node (the namespace's PID 1), as a cloud node's `poweroff` would. The node's
boot brings the watcher back, so a setup after `up` changes nothing.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from infra.local import create_local_cluster, destroy_local_cluster, restart_node
from infra.power import power_states
from infra.ssh import connect
from provision.setup import setup_cluster
from provision.steps.autostop import AutostopStep
from provision.steps.core import BaseStep
from tests.vm_like import vm_home, vm_like_unavailable, vm_user

pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(vm_like_unavailable()), reason=vm_like_unavailable())]
IDLE_S = 2
STEPS = [BaseStep(), AutostopStep()]


def on_node(cluster, command: str) -> str:
    conn = connect(cluster, cluster.node(0))
    try:
        return conn.run(command, hide=True, warn=True).stdout
    finally:
        conn.close()


def wait_stopped(cluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while power_states(cluster) != {"node-0": "stopped"}:
        assert time.monotonic() < deadline, f"the node did not stop within {timeout:.0f} s"
        time.sleep(0.2)


def test_a_vm_like_node_stops_itself_as_root_and_comes_back_with_its_watcher():
    with vm_user() as user, vm_home() as home:
        cluster = create_local_cluster("vmidle", 1, home, login_user=user)
        cluster = dataclasses.replace(cluster, extra={**cluster.extra, "autostop_s": IDLE_S})
        try:
            first = setup_cluster(cluster, home, steps=STEPS)
            assert all(r.ok for r in first), [r.error for r in first]
            assert "autostop" in first[0].changed
            assert not Path("/etc/gpuforge").exists(), "the host's /etc must not see a node's files"
            wait_stopped(cluster, IDLE_S + 10)
            assert "reboot requested" not in (Path(cluster.state_dir) / "nodes/node-0/boot.log").read_text()

            restart_node(cluster, 0)  # what `fab up` of the stopped cluster does for each node
            seen = on_node(cluster, "stat -c %U /etc/gpuforge/autostop.json; "
                                    "ps -o user= -p $(cat /var/lib/gpuforge/autostop.pid)")
            assert seen.split() == ["root", "root"], seen
            again = setup_cluster(cluster, home, steps=STEPS)
            assert all(r.ok and r.changed == [] for r in again), [(r.changed, r.error) for r in again]
            wait_stopped(cluster, IDLE_S + 10)
        finally:
            destroy_local_cluster(Path(cluster.state_dir))
