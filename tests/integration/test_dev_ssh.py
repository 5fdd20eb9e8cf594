"""Working on the nodes with the real OpenSSH client: `gpuforge ssh`, `ssh-config`, `forward`.

A 3-node local cluster made by `gpuforge up`, whose node-2 is reached through node 0 (a hosts file's
`jump: true`): the generated config alone takes the real `ssh` to every node, refuses a changed host key,
and forwards to loopback only; `down` removes the config and ends the tunnels.
"""

from __future__ import annotations

import dataclasses
import http.server
import os
import re
import select
import subprocess
import threading
import time
from pathlib import Path

import pytest

from infra.cluster import ClusterInfo
from infra.local import generate_key, restart_node, stop_node
from infra.ssh_config import cluster_config_path, main_config_path
from tests.support import finish, gpuforge, interrupt, read_until, start_gpuforge

NAME = "sshit"
USER_SSH_CONFIG = Path("~/.ssh/config").expanduser()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("gpuforge-ssh")


def snapshot(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


@pytest.fixture(scope="module")
def cluster(home):
    before = snapshot(USER_SSH_CONFIG)
    up = gpuforge(home, "up", "--name", NAME, "--nodes", "3")
    assert up.returncode == 0, up.stderr
    record = home / "clusters" / NAME / "cluster.json"
    c = dataclasses.replace(ClusterInfo.load(record), extra={"proxy_jump": ["node-2"]})  # as a hosts file's `jump: true`
    c.save(record)
    setup = gpuforge(home, "setup", timeout=300)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    yield c
    gpuforge(home, "down", "--cluster", NAME)
    assert snapshot(USER_SSH_CONFIG) == before, "the user's ~/.ssh/config is never written"


def real_ssh(home, host, command, *options, timeout=30):
    """OpenSSH's own client, with nothing but the file `ssh-config` points the user at."""
    return subprocess.run(["ssh", "-F", str(main_config_path(home)), "-o", "BatchMode=yes", *options, host, command],
                          capture_output=True, text=True, timeout=timeout)


def test_up_writes_one_host_per_node_and_ssh_config_prints_the_include_line(cluster, home):
    out = gpuforge(home, "ssh-config")
    assert out.returncode == 0, out.stderr
    include = f"Include {main_config_path(home).resolve()}"
    assert include in out.stdout.splitlines()
    resolved = subprocess.run(["ssh", "-G", "-F", str(main_config_path(home)), f"{NAME}-node-2"],
                              capture_output=True, text=True, check=True).stdout.splitlines()
    settings = dict(line.split(" ", 1) for line in resolved)
    node2 = cluster.node(2)
    assert settings["hostname"] == node2.public_address and settings["port"] == str(node2.ssh_port)
    assert settings["user"] == node2.user and settings["stricthostkeychecking"] == "true"
    assert settings["userknownhostsfile"] == str(Path(cluster.known_hosts).resolve())
    assert settings["proxyjump"] == f"{NAME}-node-0"
    assert os.stat(cluster_config_path(home, cluster)).st_mode & 0o077 == 0


def test_the_real_ssh_client_runs_a_command_on_every_node_with_only_that_file(cluster, home):
    for node in cluster.nodes:
        result = real_ssh(home, f"{NAME}-{node.name}", "echo $SSH_CONNECTION")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[2:] == [node.public_address, str(node.ssh_port)]


def test_a_node_reached_through_node_0_needs_node_0(cluster, home):
    assert stop_node(cluster, 0)
    try:
        assert real_ssh(home, f"{NAME}-node-1", "true").returncode == 0, "node-1 is reached directly"
        assert real_ssh(home, f"{NAME}-node-2", "true", timeout=60).returncode == 255, "node-2 goes through node 0"
    finally:
        restart_node(cluster, 0)
    assert real_ssh(home, f"{NAME}-node-2", "true").returncode == 0
    # our own connections take the same hop
    out = gpuforge(home, "exec", "--", "echo ok")
    assert out.returncode == 0 and "[node-2] ok" in out.stdout, out.stdout + out.stderr


def test_gpuforge_ssh_runs_in_the_work_dir_with_the_venv_active(cluster, home, tmp_path):
    out = gpuforge(home, "ssh", "node-1", "--", "pwd; echo $VIRTUAL_ENV; python -c 'import sys; print(sys.prefix)'",
                   cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    workdir = cluster.node(1).workdir
    assert out.stdout.split() == [workdir, f"{workdir}/venv", f"{workdir}/venv"]
    assert gpuforge(home, "ssh", "--", "exit 7").returncode == 7, "the command's exit status comes back"


def test_gpuforge_ssh_without_a_command_is_an_interactive_shell(cluster, home, tmp_path):
    main, sub = os.openpty()
    env = {**os.environ, "GPUFORGE_HOME": str(home), "TERM": "dumb"}
    proc = subprocess.Popen([str(Path(os.sys.executable).parent / "gpuforge"), "ssh", "node-2"], cwd=tmp_path,
                            stdin=sub, stdout=sub, stderr=sub, env=env, start_new_session=True)
    os.close(sub)
    os.write(main, b"echo MARK:$VIRTUAL_ENV:$(pwd); exit 3\n")
    seen = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([main], [], [], 0.5)[0]:
            try:
                seen += os.read(main, 4096)
            except OSError:
                break
    proc.wait(timeout=10)
    os.close(main)
    workdir = cluster.node(2).workdir
    assert f"MARK:{workdir}/venv:{workdir}".encode() in seen, seen[-2000:]
    assert proc.returncode == 3


def test_a_node_whose_host_key_changed_is_refused(cluster, home, tmp_path):
    node = cluster.node(1)
    config = Path(node.workdir) / "sshd_config"
    original = config.read_text()
    impostor = tmp_path / "impostor_host_key"
    generate_key(impostor, "impostor")
    config.write_text(re.sub(r"^HostKey .*$", f"HostKey {impostor}", original, flags=re.M))
    stop_node(cluster, 1)
    restart_node(cluster, 1)
    try:
        result = real_ssh(home, f"{NAME}-node-1", "echo should-not-run")
        assert result.returncode == 255 and "should-not-run" not in result.stdout
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in result.stderr or "verification failed" in result.stderr
        ours = gpuforge(home, "ssh", "node-1", "--", "echo should-not-run")
        assert ours.returncode != 0 and "should-not-run" not in ours.stdout
    finally:
        config.write_text(original)
        stop_node(cluster, 1)
        restart_node(cluster, 1)
    assert real_ssh(home, f"{NAME}-node-1", "true").returncode == 0


class Marker(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the stdlib's name
        body = b"served on the node's loopback"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def loopback_server():
    """A server on 127.0.0.1, which is also the local nodes' loopback."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Marker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_forward_reaches_a_port_on_the_nodes_loopback_until_ctrl_c(cluster, home, loopback_server):
    import urllib.request

    proc = start_gpuforge(home, "forward", str(loopback_server), "--node", "1")
    line, _ = read_until(proc, r"127\.0\.0\.1:\d+ -> node-1", timeout=30)
    local = int(line.split(":")[1].split()[0])
    assert local != loopback_server, "the same port is taken here (the server holds it): a free one is used"
    with urllib.request.urlopen(f"http://127.0.0.1:{local}/", timeout=10) as response:
        assert response.read() == b"served on the node's loopback"
    code, _ = interrupt(proc)
    assert code == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{local}/", timeout=3)


def test_scp_rsync_and_a_vs_code_style_socks_tunnel_work_by_host_name(cluster, home, tmp_path, loopback_server):
    """What VS Code Remote-SSH does with the same config: `ssh -T -D PORT host bash` (its local server mode),
    then its client reaches the node's loopback through that SOCKS tunnel."""
    config = str(main_config_path(home))
    host = f"{NAME}-node-2"  # through node 0 (ProxyJump)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("rsynced")
    (tmp_path / "model.pt").write_bytes(b"weights")
    workdir = cluster.node(2).workdir
    scp = subprocess.run(["scp", "-F", config, "-o", "BatchMode=yes", str(tmp_path / "model.pt"), f"{host}:{workdir}/"],
                         capture_output=True, text=True, timeout=60)
    assert scp.returncode == 0, scp.stderr
    rsync = subprocess.run(["rsync", "-a", "-e", f"ssh -F {config} -o BatchMode=yes", f"{tmp_path / 'data'}/",
                            f"{host}:{workdir}/data/"], capture_output=True, text=True, timeout=60)
    assert rsync.returncode == 0, rsync.stderr
    assert real_ssh(home, host, f"cat {workdir}/model.pt {workdir}/data/a.txt").stdout == "weightsrsynced"

    from provision.services import local_port

    socks = local_port(0)
    vscode = subprocess.Popen(["ssh", "-F", config, "-o", "BatchMode=yes", "-T", "-D", f"127.0.0.1:{socks}", host, "bash"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        vscode.stdin.write(b"echo ready\n")
        vscode.stdin.flush()
        assert vscode.stdout.readline() == b"ready\n"
        got = subprocess.run(["curl", "-sS", "--max-time", "20", "--socks5-hostname", f"127.0.0.1:{socks}",
                              f"http://127.0.0.1:{loopback_server}/"], capture_output=True, text=True, timeout=30)
        assert got.stdout == "served on the node's loopback", got.stderr
    finally:
        vscode.terminate()
        vscode.wait(timeout=10)


def test_local_nodes_forward_to_loopback_and_the_cluster_only(cluster, home, loopback_server):
    allowed = f"127.0.0.1:{loopback_server}"
    stranger = f"127.0.0.99:{loopback_server}"  # loopback range, but no node of ours: refused all the same
    for target, ok in ((allowed, True), (stranger, False)):
        result = subprocess.run(["ssh", "-F", str(main_config_path(home)), "-o", "BatchMode=yes", "-W", target,
                                 f"{NAME}-node-0"], input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True, timeout=30)
        assert (b"served on the node's loopback" in result.stdout) is ok, (target, result.stderr)
        if not ok:
            assert b"administratively prohibited" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["forward", "70000"], "PORT must be a port number 1..65535; got '70000'"),
    (["forward", "8888", "--node", "9"], "has no node '9'; nodes: 0/node-0, 1/node-1, 2/node-2"),
    (["ssh", "node-7", "--", "true"], "has no node 'node-7'"),
])
def test_bad_input_is_one_line_and_starts_nothing(cluster, home, args, message):
    out = gpuforge(home, *args)
    assert out.returncode != 0 and message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_down_removes_the_hosts_and_ends_their_tunnels(cluster, home, loopback_server):
    proc = start_gpuforge(home, "forward", str(loopback_server), "--node", "0")
    read_until(proc, r"-> node-0", timeout=30)
    out = gpuforge(home, "down", "--cluster", NAME)
    assert out.returncode == 0, out.stderr
    code, text = finish(proc, timeout=30)
    assert code != 0 and "tunnel to node-0 closed" in text
    assert not cluster_config_path(home, cluster).exists()
    assert main_config_path(home).exists(), "the Include target stays: other clusters may be listed through it"
