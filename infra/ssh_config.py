"""An OpenSSH client config for a cluster's nodes: `ssh local-node-0`, VS Code Remote-SSH, scp, rsync.

    write_ssh_config(home, cluster)   # $GPUFORGE_HOME/clusters/<name>/ssh_config (what up and setup keep current)
    include_line(home)                # `Include ~/.gpuforge/ssh_config`: the one line for ~/.ssh/config

One `Host <cluster>-<node>` entry per node with its address, port, user and the cluster's key, host keys
checked against the cluster's own pinned known_hosts only (`StrictHostKeyChecking yes`: a changed key
is refused, an unknown one too), and `ProxyJump <cluster>-<node 0>` for nodes reached through node 0.
`$GPUFORGE_HOME/ssh_config` includes every cluster's file, so the user's ~/.ssh/config needs one line,
which we print and never write: that file is the user's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import paramiko

from infra.cluster import ClusterInfo, NodeInfo

CONFIG_NAME = "ssh_config"
ALIAS_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def host_alias(cluster: ClusterInfo, node: NodeInfo) -> str:
    """`<cluster>-<node>`, e.g. `local-node-0` (characters ssh patterns treat specially become '-')."""
    return ALIAS_UNSAFE.sub("-", f"{cluster.name}-{node.name}")


def quoted(value: str) -> str:
    return f'"{value}"' if any(c.isspace() for c in value) else value


def cluster_config_path(home: Path, cluster: ClusterInfo) -> Path:
    return Path(home).expanduser() / "clusters" / cluster.name / CONFIG_NAME


def main_config_path(home: Path) -> Path:
    return Path(home).expanduser() / CONFIG_NAME


def include_line(home: Path) -> str:
    return f"Include {quoted(str(main_config_path(home).resolve()))}"


def render_ssh_config(cluster: ClusterInfo) -> str:
    from infra.ssh import known_hosts_path, via_head

    known = known_hosts_path(cluster).resolve()
    lines = [f"# gpuforge cluster {cluster.name} ({cluster.cloud}): written by `gpuforge up` and `gpuforge ssh-config`,",
             "# removed by `gpuforge down`. Host keys are checked against the cluster's pins only.", ""]
    for node in cluster.nodes:
        lines += [f"Host {host_alias(cluster, node)}",
                  f"    HostName {node.public_address}",
                  f"    Port {node.ssh_port}",
                  f"    User {node.user}"]
        if node.key_path:
            lines += [f"    IdentityFile {quoted(str(Path(node.key_path).expanduser().resolve()))}",
                      "    IdentitiesOnly yes"]
        lines += [f"    UserKnownHostsFile {quoted(str(known))}",
                  "    GlobalKnownHostsFile /dev/null",
                  "    StrictHostKeyChecking yes",
                  "    UpdateHostKeys no",
                  "    ServerAliveInterval 30"]
        if via_head(cluster, node):
            lines.append(f"    ProxyJump {host_alias(cluster, cluster.head)}")
        lines.append("")
    return "\n".join(lines)


def write_private(path: Path, text: str) -> None:
    """Atomically, mode 0600 (ssh refuses a config others can write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def write_ssh_config(home: Path, cluster: ClusterInfo) -> Path:
    """The cluster's file, and the top-level file that includes every cluster's; returns the cluster's."""
    path = cluster_config_path(home, cluster)
    write_private(path, render_ssh_config(cluster))
    clusters = (Path(home).expanduser() / "clusters").resolve()
    write_private(main_config_path(home), "# gpuforge: the hosts of every cluster (`gpuforge ssh-config` prints the line\n"
                                          "# that includes this file from ~/.ssh/config)\n"
                                          f"Include {quoted(str(clusters))}/*/{CONFIG_NAME}\n")
    return path


def remove_ssh_config(home: Path, cluster: ClusterInfo) -> None:
    cluster_config_path(home, cluster).unlink(missing_ok=True)


def missing_pins(cluster: ClusterInfo) -> list[NodeInfo]:
    """Nodes the cluster's known_hosts has no key for (ssh would refuse them)."""
    from infra.ssh import known_hosts_path

    path = known_hosts_path(cluster)
    keys = paramiko.HostKeys(str(path)) if path.exists() else paramiko.HostKeys()
    out = []
    for node in cluster.nodes:
        name = node.public_address if node.ssh_port == 22 else f"[{node.public_address}]:{node.ssh_port}"
        if keys.lookup(name) is None:
            out.append(node)
    return out


def pin_host_keys(cluster: ClusterInfo) -> list[str]:
    """Record the keys of nodes not pinned yet (trust on first use, as our own connections do; local
    clusters are pinned at creation). Returns the names of the nodes newly pinned."""
    from infra.ssh import connect

    pinned = []
    for node in missing_pins(cluster):
        connect(cluster, node).close()
        pinned.append(node.name)
    return pinned
