"""What a node installs beside its lock on first use (JupyterLab, LitServe, TensorBoard): constrained by the node
lock where setup wrote one, from the package index setup would use."""

from __future__ import annotations

import pytest

from infra.cluster import ClusterInfo, NodeInfo
from provision.cli.dev_tasks import tool_index
from provision.errors import ProvisionError
from provision.services import tool_install_command

NODE = NodeInfo(name="node-0", rank=0, public_address="10.0.0.1", private_address="10.0.0.1")


def test_a_tool_is_installed_under_the_node_lock_when_the_node_has_one():
    cmd = tool_install_command(NODE, "jupyterlab==4.6.6", " --index-url https://m.example/simple")
    assert cmd == ("/opt/gpuforge/venv/bin/python -m pip install --quiet --disable-pip-version-check "
                   "--no-warn-script-location --index-url https://m.example/simple "
                   "$([ -f /opt/gpuforge/node-requirements.txt ] && echo -c /opt/gpuforge/node-requirements.txt) "
                   "jupyterlab==4.6.6")


def test_tools_come_from_the_index_setup_uses(monkeypatch):
    hosts = ClusterInfo(name="h", cloud="hosts", nodes=(NODE,), extra={"pip_index": "https://h.example/simple"})
    monkeypatch.delenv("GPUFORGE_PIP_INDEX", raising=False)
    assert tool_index(hosts) == " --index-url https://h.example/simple"
    monkeypatch.setenv("GPUFORGE_PIP_INDEX", "node")
    assert tool_index(hosts) == "", "the node's own pip configuration"
    monkeypatch.setenv("GPUFORGE_PIP_INDEX", "pypi.example")
    with pytest.raises(ProvisionError, match="GPUFORGE_PIP_INDEX must be a package index URL"):
        tool_index(hosts)


def test_down_ends_the_ssh_sessions_here_that_use_the_clusters_config_and_no_other(tmp_path):
    import subprocess
    import sys

    from infra.ssh_config import cluster_config_path
    from provision.services import end_sessions

    ours = ClusterInfo(name="gpu", cloud="aws", nodes=(NODE,))
    other = ClusterInfo(name="other", cloud="aws", nodes=(NODE,))

    def fake_ssh(cluster: ClusterInfo) -> subprocess.Popen:  # an `ssh -F CONFIG -N ...` as the process table shows it
        config = cluster_config_path(tmp_path, cluster)
        return subprocess.Popen(["bash", "-c", f"exec -a ssh {sys.executable} -c 'import time; time.sleep(60)' -F {config} -N "
                                 f"-L 127.0.0.1:1:127.0.0.1:1 {cluster.name}-node-0"])

    mine, theirs = fake_ssh(ours), fake_ssh(other)
    try:
        import time

        time.sleep(0.3)  # until exec has replaced bash
        assert end_sessions(tmp_path, ours, servers=False) == ["1 SSH session(s) here"]
        assert mine.wait(timeout=10) != 0
        assert theirs.poll() is None, "another cluster's tunnel is left alone"
    finally:
        for proc in (mine, theirs):
            proc.kill()
            proc.wait()
