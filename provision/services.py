"""Servers on a node, reached from this machine through an SSH tunnel: what `jupyter`, `tensorboard` and
`serve` run, and what `forward` and `ssh` use.

    svc = Service("jupyter", command=[...], ready_path="/api/status", files={"config.json": b"..."})
    code = run_in_foreground(home, cluster, node, svc, local_port=0, url=lambda p: f"http://127.0.0.1:{p}/lab")

The server runs detached on the node, in its work directory with its venv's Python, bound to the node's
loopback (127.0.0.1) on a free port, with its PID, port and log in `<workdir>/.gpuforge/services/<name>/`
(files there are 0600: a token lives in them, never on a command line). The tunnel is the real OpenSSH
client with the cluster's ssh_config (`ssh -N -L 127.0.0.1:LOCAL:127.0.0.1:REMOTE <cluster>-<node>`).
The foreground command prints the local URL and waits; Ctrl-C stops the server and the tunnel. `down`
ends both too (a local cluster's teardown kills every process of its nodes and every ssh using its
config; for a hosts cluster `end_sessions` stops the servers on its machines, which keep running, and for
hosts and cloud clusters ends the ssh processes here that use its config), and `<task> --stop` stops a
server from another terminal.
"""

from __future__ import annotations

import io
import json
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from infra.cluster import ClusterInfo, NodeInfo
from provision.errors import ProvisionError
from provision.node_lock import LOCK_NAME

SERVICES_DIR = ".gpuforge/services"
READY_TIMEOUT_S = 180.0  # JupyterLab's first start on a cold node (imports, building its settings) takes a while
POLL_S = 0.5
ALIVE_EVERY_S = 2.0  # how often the foreground loop checks that the server and the tunnel still run
STOP_GRACE_S = 10.0  # SIGTERM to SIGKILL for a server's process group
# What the node-side tools need, installed into the node's venv on first use (pins mirror pyproject's extras).
NODE_TOOLS = {"jupyterlab": "jupyterlab==4.6.6", "litserve": "litserve==0.2.19", "tensorboard": "tensorboard>=2.15"}


class ServiceError(ProvisionError):
    """A node server could not be started, reached or stopped."""


@dataclass
class Service:
    name: str
    command: list[str]
    """argv on the node; `{python}` is the node venv's python, `{dir}` the service folder, `{port}` the port."""
    ready_path: str = "/"
    """HTTP path that answers 200 once the server is ready (polled through the tunnel)."""
    files: dict[str, bytes] = field(default_factory=dict)
    """Written into the service folder (mode 0600) before the start: configs, tokens."""
    env: dict[str, str] = field(default_factory=dict)
    what: str = ""
    """What it serves, for `--stop` and the messages (a run id)."""


def service_dir(node: NodeInfo, name: str) -> str:
    return f"{node.workdir}/{SERVICES_DIR}/{name}"


def node_python(node: NodeInfo) -> str:
    return f"{node.workdir}/venv/bin/python"


def q(text: str) -> str:
    return shlex.quote(text)


# -- on the node ------------------------------------------------------------------------------


def require_setup(conn: Any, node: NodeInfo) -> None:
    if not conn.run(f"test -x {q(node_python(node))}", hide=True, warn=True).ok:
        raise ServiceError(f"{node.name} is not set up ({node_python(node)} is missing); run `gpuforge setup` first")


def tool_install_command(node: NodeInfo, requirement: str, index_args: str = "") -> str:
    """pip install into the node's venv, constrained by the node lock where setup wrote one (a cloud VM, a
    hosts machine, a VM-like node): a tool never moves a locked package (torch's and the workload's)."""
    lock = q(f"{node.workdir}/{LOCK_NAME}")
    return (f"{q(node_python(node))} -m pip install --quiet --disable-pip-version-check --no-warn-script-location"
            f"{index_args} $([ -f {lock} ] && echo -c {lock}) {q(requirement)}")


def ensure_tool(conn: Any, node: NodeInfo, module: str, say: Callable[[str], None], index_args: str = "") -> None:
    """Install a tool into the node's venv on first use (pip, the pin of NODE_TOOLS; `index_args` from
    provision.pip_index.tool_index_args)."""
    python = q(node_python(node))
    if conn.run(f"{python} -c {q(f'import {module}')}", hide=True, warn=True).ok:
        return
    requirement = NODE_TOOLS[module]
    say(f"installing {requirement} into {node.name}'s environment (first use)")
    result = conn.run(tool_install_command(node, requirement, index_args), hide=True, warn=True, timeout=900)
    if not result.ok:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise ServiceError(f"installing {requirement} on {node.name} failed:\n{tail}")


def remote_free_port(conn: Any, node: NodeInfo) -> int:
    """A free port on the node's loopback (local nodes share this machine's, so it is probed there too)."""
    probe = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
    return int(conn.run(f"{q(node_python(node))} -c {q(probe)}", hide=True).stdout.strip())


def running_record(conn: Any, node: NodeInfo, name: str) -> dict[str, Any] | None:
    """The service's record when its process still runs (the PID checked against the service's marker)."""
    d = q(service_dir(node, name))
    script = (f'r=$(cat {d}/service.json 2>/dev/null) || exit 1; pid=$(cat {d}/pid 2>/dev/null) || exit 1; '
              f'grep -qzxF GPUFORGE_SERVICE={d} /proc/$pid/environ 2>/dev/null && echo "$r"')
    result = conn.run(script, hide=True, warn=True)
    return json.loads(result.stdout) if result.ok and result.stdout.strip() else None


def start_service(conn: Any, node: NodeInfo, svc: Service, port: int) -> None:
    d = service_dir(node, svc.name)
    conn.run(f"mkdir -p {q(d)} && chmod 700 {q(d)} && rm -f {q(d)}/pid {q(d)}/log", hide=True)
    record = {"name": svc.name, "port": port, "what": svc.what, "started": time.time()}
    for name, blob in {**svc.files, "service.json": json.dumps(record).encode()}.items():
        conn.put(io.BytesIO(blob), f"{d}/{name}")
        conn.run(f"chmod 600 {q(d + '/' + name)}", hide=True)
    argv = [part.format(python=node_python(node), dir=d, port=port) for part in svc.command]
    env = " ".join(f"{k}={q(v)}" for k, v in {**svc.env, "GPUFORGE_SERVICE": d}.items())
    # setsid: its own process group (what stop kills); the PID is the group's; nothing holds the SSH channel
    conn.run(f"cd {q(node.workdir)} && (env {env} setsid nohup {' '.join(q(a) for a in argv)} > {q(d)}/log 2>&1 "
             f"< /dev/null & echo $! > {q(d)}/pid)", hide=True, pty=False)


def stop_service(conn: Any, node: NodeInfo, name: str) -> bool:
    """Stop the service's process group (TERM, then KILL); True when one was running."""
    if running_record(conn, node, name) is None:
        return False
    d = q(service_dir(node, name))
    # The group first (the server and its workers), then anything else carrying the service's marker in its
    # environment (a Jupyter kernel runs in a session of its own); no other process is touched.
    script = (f"pid=$(cat {d}/pid); kill -TERM -$pid 2>/dev/null; "
              f"for i in $(seq 1 {int(STOP_GRACE_S * 4)}); do kill -0 $pid 2>/dev/null || break; sleep 0.25; done; "
              f"kill -KILL -$pid 2>/dev/null; "
              f"for p in /proc/[0-9]*; do grep -qzxF GPUFORGE_SERVICE={d} $p/environ 2>/dev/null && "
              f"kill -KILL ${{p#/proc/}} 2>/dev/null; done; rm -f {d}/pid; true")
    conn.run(script, hide=True, warn=True)
    return True


def log_tail(conn: Any, node: NodeInfo, name: str, lines: int = 15) -> str:
    return conn.run(f"tail -n {lines} {q(service_dir(node, name))}/log 2>/dev/null", hide=True, warn=True).stdout


def services_on(conn: Any, node: NodeInfo, prefix: str) -> list[str]:
    result = conn.run(f"ls {q(node.workdir + '/' + SERVICES_DIR)} 2>/dev/null", hide=True, warn=True)
    return [n for n in result.stdout.split() if n == prefix or n.startswith(prefix + "-")]


# -- on this machine --------------------------------------------------------------------------


def local_port(port: int) -> int:
    """`port` when it is free on this machine's loopback (0: any free one); a busy one is an error."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ServiceError(f"local port {port} is in use; pick another with --port, or leave it out for a free one") from None
        return s.getsockname()[1]


def ssh_base(home: Path, cluster: ClusterInfo, node: NodeInfo) -> list[str]:
    """The real OpenSSH client with the cluster's own config (host keys pinned, never disabled)."""
    import shutil

    from infra.ssh_config import cluster_config_path, host_alias, pin_host_keys, write_ssh_config

    ssh = shutil.which("ssh")
    if ssh is None:
        raise ServiceError("the OpenSSH client (ssh) is not installed; install it with: sudo apt-get install -y openssh-client")
    pin_host_keys(cluster)
    write_ssh_config(home, cluster)
    return [ssh, "-F", str(cluster_config_path(home, cluster)), host_alias(cluster, node)]


class Tunnel:
    """`ssh -N -L 127.0.0.1:LOCAL:127.0.0.1:REMOTE`: a local port forwarded to the node's loopback."""

    def __init__(self, home: Path, cluster: ClusterInfo, node: NodeInfo, local: int, remote: int):
        base = ssh_base(home, cluster, node)
        self.local, self.remote = local, remote
        self.argv = [base[0], *base[1:3], "-N", "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
                     "-L", f"127.0.0.1:{local}:127.0.0.1:{remote}", base[3]]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Tunnel:
        # its own session: Ctrl-C reaches us first, and we close the tunnel after stopping the server
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        return self

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Until the local end accepts connections (ssh listens once it has authenticated)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise ServiceError(f"the SSH tunnel closed: {self.error() or 'no message'}")
            try:
                socket.create_connection(("127.0.0.1", self.local), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise ServiceError(f"the SSH tunnel did not listen on 127.0.0.1:{self.local} within {timeout:.0f} s") from None
                time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def error(self) -> str:
        if self.proc is None or self.proc.poll() is None:
            return ""
        return (self.proc.stderr.read() or b"").decode(errors="replace").strip()

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def http_status(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def exit_reason(name: str, node: NodeInfo, tail: str) -> str:
    """Our node programs end with one `error: ...` line; show that alone, else the log's tail."""
    errors = [line.removeprefix("error: ") for line in tail.splitlines() if line.startswith("error: ")]
    if errors:
        return f"{name} on {node.name}: {errors[-1]}"
    return f"{name} on {node.name} exited while starting; its log:\n{tail.rstrip()}"


def wait_ready(conn: Any, node: NodeInfo, svc: Service, tunnel: Tunnel, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_alive = 0.0
    while http_status(url) != 200:
        if not tunnel.alive():
            raise ServiceError(f"the SSH tunnel to {node.name} closed: {tunnel.error() or 'no message'}")
        if time.monotonic() - last_alive > ALIVE_EVERY_S:
            last_alive = time.monotonic()
            if running_record(conn, node, svc.name) is None:
                raise ServiceError(exit_reason(svc.name, node, log_tail(conn, node, svc.name)))
        if time.monotonic() > deadline:
            raise ServiceError(f"{svc.name} on {node.name} did not answer {svc.ready_path} within {timeout:.0f} s; "
                               f"its log:\n{log_tail(conn, node, svc.name)}")
        time.sleep(POLL_S)


def run_in_foreground(home: Path, cluster: ClusterInfo, node: NodeInfo, svc: Service, port: int,
                      url: Callable[[int], str], say: Callable[[str], None],
                      prepare: Callable[[Any], None] | None = None, ready_timeout: float = READY_TIMEOUT_S) -> int:
    """Start the server, tunnel to it, print its URL, and wait for Ctrl-C (or its end); returns an exit code."""
    from infra.ssh import connect

    chosen = local_port(port)
    conn = connect(cluster, node)
    try:
        require_setup(conn, node)
        if prepare is not None:
            prepare(conn)
        existing = running_record(conn, node, svc.name)
        if existing is not None:
            raise ServiceError(f"{svc.name} already runs on {node.name} (node port {existing['port']}"
                               f"{', ' + existing['what'] if existing.get('what') else ''}); stop it with --stop first")
        remote = remote_free_port(conn, node)
        start_service(conn, node, svc, remote)
        try:
            with Tunnel(home, cluster, node, chosen, remote) as tunnel:
                wait_ready(conn, node, svc, tunnel, f"http://127.0.0.1:{chosen}{svc.ready_path}", ready_timeout)
                say(url(chosen))
                return wait_until_stopped(conn, node, svc, tunnel, say)
        finally:
            try:
                stop_service(conn, node, svc.name)
            except Exception:  # noqa: BLE001 - the node may be gone (down); nothing is left to stop then
                pass
    finally:
        conn.close()


def wait_until_stopped(conn: Any, node: NodeInfo, svc: Service, tunnel: Tunnel, say: Callable[[str], None]) -> int:
    try:
        while True:
            time.sleep(ALIVE_EVERY_S)
            if not tunnel.alive():
                say(f"the SSH tunnel to {node.name} closed ({tunnel.error() or 'the node went away?'}); stopping")
                return 1
            try:
                record = running_record(conn, node, svc.name)
            except Exception:  # noqa: BLE001 - connection lost: the node went down
                say(f"lost the connection to {node.name}; stopping")
                return 1
            if record is None:
                say(f"{svc.name} on {node.name} stopped")
                return 0
    except KeyboardInterrupt:
        say(f"stopping {svc.name} on {node.name}")
        return 0


# -- at `down` --------------------------------------------------------------------------------

SERVER_NAMES = ("jupyter", "tensorboard", "serve")


def stop_servers(cluster: ClusterInfo) -> list[str]:
    """Every notebook, TensorBoard and model server on the cluster's nodes ("jupyter on node-0", ...); a node
    that cannot be reached is passed over (it is gone, or down will say so itself)."""
    from infra.ssh import connect

    stopped = []
    for node in cluster.nodes:
        try:
            conn = connect(cluster, node)
        except Exception:  # noqa: BLE001 - unreachable: nothing of ours can be stopped there
            continue
        try:
            stopped += [f"{name} on {node.name}" for prefix in SERVER_NAMES for name in services_on(conn, node, prefix)
                        if stop_service(conn, node, name)]
        finally:
            conn.close()
    return stopped


def tunnel_pids(home: Path, cluster: ClusterInfo) -> list[int]:
    """This machine's ssh processes that use the cluster's config: tunnels, `gpuforge ssh` shells."""
    import os

    from infra.ssh_config import cluster_config_path

    config = str(cluster_config_path(home, cluster))
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if Path(argv[0]).name == "ssh" and any(a == "-F" and b == config for a, b in zip(argv, argv[1:])):
            pids.append(int(entry.name))
    return pids


def end_sessions(home: Path, cluster: ClusterInfo, servers: bool) -> list[str]:
    """What `down` ends of a cloud or hosts cluster besides its machines (a local cluster's teardown ends every
    process of its nodes and every ssh using its config already): with `servers`, the servers on the nodes (a
    hosts cluster's machines keep running), then the tunnels here. Returns what it ended, for the message."""
    import os
    import signal

    ended = stop_servers(cluster) if servers else []
    pids = tunnel_pids(home, cluster)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return ended + ([f"{len(pids)} SSH session(s) here"] if pids else [])
