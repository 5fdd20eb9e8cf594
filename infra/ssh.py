"""SSH connections to nodes, with pinned host keys.

The local provider writes a known_hosts for its nodes, so an unknown key there is refused. For
other sources the first connection's key is recorded in the cluster's known_hosts (trust on first
use), and a changed key is refused with a clear error, never silently accepted.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import paramiko
from fabric import Config, Connection
from fabric.runners import Remote

from infra.cluster import ClusterInfo, NodeInfo
from infra.errors import HostKeyError, NodeUnreachableError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10  # per attempt; a node that does not answer in this is down or filtered
_known_hosts_lock = threading.Lock()


class RecordFirstKey(paramiko.MissingHostKeyPolicy):
    """Trust on first use: record an unknown host's key in the cluster's known_hosts file."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        with _known_hosts_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        logger.info("recorded host key of %s (%s) in %s", hostname, fingerprint(key), self.path)


def fingerprint(key: paramiko.PKey) -> str:
    return key.fingerprint if hasattr(key, "fingerprint") else key.get_fingerprint().hex()


def known_hosts_path(cluster: ClusterInfo) -> Path:
    if cluster.known_hosts:
        return Path(cluster.known_hosts).expanduser()
    return Path(cluster.state_dir).expanduser() / "known_hosts"


class PromptRemote(Remote):
    """Fabric's runner, noticing a command's end sooner: Invoke polls for it every `input_sleep` (10 ms by default,
    which a short command pays in full: `true` took ~15 ms, now ~7)."""

    input_sleep = 0.002


class JumpConnection(Connection):
    """A connection through node 0 (ProxyJump): closing it closes the hop too."""

    def close(self) -> None:
        super().close()
        if isinstance(self.gateway, Connection):
            self.gateway.close()


def via_head(cluster: ClusterInfo, node: NodeInfo) -> bool:
    """Is this node reached through node 0 (a hosts file's `jump: true`), as `ssh -J` would?"""
    return node.rank != 0 and node.name in (cluster.extra or {}).get("proxy_jump", ())


def auth_kwargs(node: NodeInfo, timeout: float) -> dict:
    """The node's key when it names one; otherwise the SSH agent and ~/.ssh/id_* keys, as `ssh` would try
    (no `key_filename` at all: Fabric chokes on None)."""
    kwargs = {"banner_timeout": timeout, "auth_timeout": timeout}
    if node.key_path:
        return {**kwargs, "key_filename": [str(Path(node.key_path).expanduser())], "allow_agent": False,
                "look_for_keys": False}
    return {**kwargs, "allow_agent": True, "look_for_keys": True}


def connect(cluster: ClusterInfo, node: NodeInfo, timeout: float = CONNECT_TIMEOUT_S) -> Connection:
    """An opened Fabric connection to a node, host key checked against the cluster's pins (and the
    hop's, for a node reached through node 0)."""
    gateway = connect(cluster, cluster.head, timeout) if via_head(cluster, node) else None
    conn = (JumpConnection if gateway else Connection)(
        gateway=gateway,
        host=node.public_address, port=node.ssh_port, user=node.user,
        connect_timeout=timeout,
        config=Config(overrides={"run": {"in_stream": False},  # never forward our stdin to nodes
                                 "runners": {"remote": PromptRemote}}),
        connect_kwargs=auth_kwargs(node, timeout),
    )
    path = known_hosts_path(cluster)
    client = conn.client
    client._host_keys = paramiko.HostKeys()  # only our pins, never ~/.ssh/known_hosts
    if path.exists():
        client.load_host_keys(str(path))
    if cluster.cloud == "local":
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        client.set_missing_host_key_policy(RecordFirstKey(path))
    open_connection(conn, node, path)
    return conn


def open_connection(conn: Connection, node: NodeInfo, known_hosts: Path) -> None:
    try:
        conn.open()
    except paramiko.BadHostKeyException as exc:
        raise HostKeyError(
            f"{node.name} ({node.address}) presented host key {fingerprint(exc.key)}, but {known_hosts} pins "
            f"{fingerprint(exc.expected_key)}; if the machine was rebuilt, delete its line from {known_hosts} and retry"
        ) from exc
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise HostKeyError(f"{node.name} ({node.address}) has no pinned host key in {known_hosts}") from exc
        raise NodeUnreachableError(f"{node.name} ({node.address}): SSH failed: {exc}") from exc
    except (OSError, socket.timeout, EOFError) as exc:
        raise NodeUnreachableError(f"{node.name} ({node.address}) is unreachable: {exc or type(exc).__name__}") from exc
    sock = conn.transport.sock if conn.transport else None
    if isinstance(sock, socket.socket):  # not a channel through a jump host
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # ~15 ms per command instead of ~46


def wait_for_ssh(cluster: ClusterInfo, node: NodeInfo, timeout: float) -> Connection:
    """Connect, retrying until `timeout`: a node that is booting or rebooting comes back."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            return connect(cluster, node, timeout=min(CONNECT_TIMEOUT_S, max(1.0, deadline - time.monotonic())))
        except NodeUnreachableError:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
