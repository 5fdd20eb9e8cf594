"""Edges of the cluster flow: host-key pinning, a hung launch, `make demo` interrupted, set-up
errors before anything starts."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from infra.cluster import ClusterInfo
from infra.errors import SshdMissingError
from infra.local import create_local_cluster, destroy_local_cluster, find_sshd, our_processes
from provision import inventory
from infra.errors import HostKeyError
from provision.setup import setup_cluster
from infra.ssh import connect
from tests.support import ROOT, TINY_CONVNET
from workloads.launch import RunSpec, follow_run, start_run


@pytest.fixture
def local(tmp_path):
    cluster = create_local_cluster("edge", 2, tmp_path)
    yield cluster
    destroy_local_cluster(Path(cluster.state_dir))


def hosts_file_for(cluster: ClusterInfo, tmp_path: Path) -> Path:
    node = cluster.node(0)
    path = tmp_path / "mine.yaml"
    path.write_text(f"name: mine\nuser: {node.user}\nkey: {node.key_path}\nhosts:\n"
                    f"  - address: {node.public_address}\n    port: {node.ssh_port}\n")
    return path


def test_first_key_is_recorded_and_a_changed_key_is_refused(local, tmp_path):
    home = tmp_path / "home"
    mine = inventory.resolve(home, str(hosts_file_for(local, tmp_path)))
    known = Path(mine.known_hosts)
    assert not known.exists()
    connect(mine, mine.node(0)).close()  # trust on first use: recorded
    recorded = known.read_text()
    assert local.node(0).public_address in recorded and "ssh-ed25519" in recorded
    connect(mine, mine.node(0)).close()  # the same key again: fine, nothing added
    assert known.read_text() == recorded
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    host, _, _ = recorded.split()[:3]
    known.write_text(f"{host} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    with pytest.raises(HostKeyError, match="presented host key .* but .* pins"):
        connect(mine, mine.node(0))


def test_local_nodes_only_accept_their_pinned_key(local):
    broken = Path(local.known_hosts)
    broken.write_text("")  # no pins at all: a local node is refused, not trusted on first use
    with pytest.raises(HostKeyError, match="no pinned host key"):
        connect(local, local.node(0))


def test_a_launch_whose_rendezvous_hangs_is_failed_in_bounded_time(local, tmp_path):
    home = tmp_path
    assert all(r.ok for r in setup_cluster(local, home))
    spec = RunSpec(job="convnet-digits", nodes=2, run_id="hang", args=[*TINY_CONVNET, "max_steps=5"],
                   storage_url=local.storage_url, start_timeout=6)
    start_run(local, spec, home)
    node1 = local.node(1).workdir
    for pid, cmd in our_processes(Path(local.state_dir)):  # node-1 vanishes before the rendezvous completes
        if node1 in " ".join(cmd) and "hang" in " ".join(cmd):
            os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    status = follow_run(local, home, "hang", out=lambda text: None, poll=0.3, timeout=90)
    assert status.state == "failed" and time.monotonic() - started < 60
    head = next(n for n in status.nodes if n.node == "node-0")
    assert head.state == "failed" and ("no training step within 6 s" in head.reason or "exit code" in head.reason)


def test_missing_sshd_is_one_clear_error_with_the_install_command(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("infra.local.SSHD_CANDIDATES", ("/nonexistent/sshd",))
    with pytest.raises(SshdMissingError, match="apt-get install -y openssh-server"):
        find_sshd()


def test_dry_run_plans_per_node_and_changes_nothing(local, tmp_path):
    reports = setup_cluster(local, tmp_path, dry_run=True)
    assert all(r.ok for r in reports)
    planned = [step for step, _ in reports[0].plan]
    assert planned == ["base", "python_env", "workload", "verify"]
    assert not Path(local.node(0).workdir, "venv").exists()


def test_demo_interrupted_leaves_nothing_behind(tmp_path):
    env = {**os.environ, "GPUFORGE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([os.sys.executable, "-m", "provision.cli.demo"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    state = tmp_path / "clusters" / "demo"
    lines = []
    for line in proc.stdout:  # wait until the run is training on both nodes
        lines.append(line)
        if line.startswith("step "):
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    text = "".join(lines) + out
    assert "interrupted: tearing the demo cluster down" in text and proc.returncode == 130, text[-2000:]
    assert not state.exists()
    assert not our_processes(state)
    # the demo's own nodes, as its cluster table printed them (other clusters may share the addresses)
    nodes = set(re.findall(r"@(127\.0\.0\.\d+:\d+)", text))
    assert len(nodes) == 2, text[-2000:]
    assert not nodes & set(listening_on({a.split(":")[0] for a in nodes})), "a demo node still listens"


def listening_on(addresses: set[str]) -> list[str]:
    """Listening TCP sockets on these IPv4 addresses, from /proc/net/tcp (state 0A = LISTEN)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host_hex, port_hex = local.split(":")
        host = socket.inet_ntoa(bytes.fromhex(host_hex)[::-1])
        if state == "0A" and host in addresses:
            found.append(f"{host}:{int(port_hex, 16)}")
    return found


def fab(home, *args, path=None):
    env = {**os.environ, "GPUFORGE_HOME": str(home)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([str(Path(os.sys.executable).parent / "fab"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, message",
    [
        (["up", "--cloud", "aws", "--instance-type", "p9.huge"], "p9.huge"),
        (["up", "--cloud", "aws", "--instance-type", "g5.xlarge", "--nodes", "0"], "nodes"),
        (["up", "--cloud", "gcp", "--instance-type", "a2-highgpu-8g", "--region", "mars-1"], "mars-1"),
        (["up", "--cloud", "aws", "--instance-type", "g5.xlarge", "--ssh-cidr", "10.0.0.300/32"], "10.0.0.300/32"),
        (["up", "--cloud", "aws", "--instance-type", "g5.xlarge", "--ssh-cidr", "203.0.113.4/32", "--yes"],
         "pulumi"),
        (["up", "--nodes", "0"], "--nodes must be >= 1"),
    ],
)
def test_fab_up_validates_before_any_cloud_call(tmp_path, args, message):
    res = fab(tmp_path, *args, path=str(Path(os.sys.executable).parent) + ":/usr/bin:/bin")
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "clusters").exists() or not list((tmp_path / "clusters").glob("*/cluster.json"))


def test_down_never_touches_a_process_it_did_not_start(tmp_path):
    cluster = create_local_cluster("strangers", 1, tmp_path)
    stranger = subprocess.Popen(["sleep", "60"])  # e.g. a PID the kernel handed out again after sshd died
    try:
        (Path(cluster.node(0).workdir) / "sshd.pid").write_text(f"{stranger.pid}\n")
        destroy_local_cluster(Path(cluster.state_dir))
        assert stranger.poll() is None, "a process gpuforge did not start was killed"
        assert not our_processes(Path(cluster.state_dir))
        destroy_local_cluster(Path(cluster.state_dir))  # idempotent
    finally:
        stranger.kill()
        stranger.wait()
