"""VM-like local nodes: each local node behaves like a fresh cloud VM, so `fab setup` runs the cloud plan.

    create_local_cluster("vm", 2, home, login_user="ubuntu")    # what `fab up --login-user ubuntu` does

Each node is a "machine" of its own on this host:
- it logs in as `login_user`, a non-root user with passwordless sudo (as `ubuntu` on AWS/GCP images); creating
  that user needs root, so a test fixture or an administrator does it, never this module;
- its sshd runs in its own mount and process namespace (`unshare -m -p -f --mount-proc`), where /etc, /opt,
  /usr/local, /var/lib and /var/cache are copy-on-write overlays of the host's: the node's "disk". Its work
  directory is /opt/gpuforge, which does not exist until setup creates it with sudo; it has none of the
  controller's Python packages (setup makes a fresh venv);
- `reboot` on the node (a shim in its /usr/local/sbin) ends the namespace, every process of the node with it,
  and boots it again: overlays (the disk) stay, everything else (processes, tmpfs, /proc state) is new;
- an optional boot hook (an executable run as root inside the node at every boot, NODE_DIR set) lets tests
  make the node look like a GPU machine (tests/fakes/gpu_node/).

Nothing is written outside the cluster's state dir: the host's /opt, /etc ... see none of a node's writes.
The login user must be able to reach the cluster's storage folder (GPUFORGE_HOME must be traversable by it).
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
from pathlib import Path

from infra.cluster import ClusterInfo, NodeInfo
from infra.errors import ClusterError

OVERLAID = ("/etc", "/opt", "/usr/local", "/var/lib", "/var/cache")
"""The host directories a VM-like node sees copy-on-write: what setup writes there stays on the node."""
WORKDIR = "/opt/gpuforge"  # as infra.cluster.DEFAULT_WORKDIR on a cloud VM
REBOOT_SHIM = """#!/bin/sh
# gpuforge VM-like node: `reboot` ends this node's namespace (every process of the node) and boots it again.
echo "reboot requested by uid $(id -u) at $(date +%s)" >> {node_dir}/boot.log
touch {node_dir}/reboot-requested
kill -TERM 1
"""
VM_SSHD_CONFIG = """\
Port {port}
ListenAddress {address}
HostKey {host_key}
PidFile none
AuthorizedKeysFile none
# The cluster key, read by root: the login user need not reach the state dir (cloud-init writes
# ~/.ssh/authorized_keys on a VM; nothing here writes into the user's home).
AuthorizedKeysCommand /bin/cat {authorized_keys}
AuthorizedKeysCommandUser root
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
PermitRootLogin no
AllowUsers {user}
StrictModes no
MaxStartups 100:30:200
MaxSessions 100
# Port forwarding to loopback only, as on the quick nodes (Jupyter, TensorBoard, model-server tunnels; ProxyJump):
AllowTcpForwarding local
PermitOpen {permit_open}
AllowStreamLocalForwarding no
GatewayPorts no
PermitTunnel no
X11Forwarding no
PrintMotd no
SetEnv SHLVL=1
Subsystem sftp internal-sftp
"""


def check_vm_like(user: str, state: Path) -> None:
    """ClusterError, before anything starts, when VM-like nodes cannot work here."""
    if os.geteuid() != 0:
        raise ClusterError("VM-like local nodes need root (each node runs in its own mount and process namespace); "
                           "as a normal user use the quick local cluster: `gpuforge up` without --login-user")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ClusterError(f"--login-user {user!r} does not exist here; create it first (useradd -m {user}, "
                           f"usermod -p '*' {user}, and a sudoers drop-in `{user} ALL=(ALL) NOPASSWD:ALL`)") from None
    if entry.pw_uid == 0:
        raise ClusterError(f"--login-user {user!r} is root; a VM-like node logs in as a normal user with sudo")
    for tool in ("unshare", "sudo", "runuser"):
        if shutil.which(tool) is None:
            raise ClusterError(f"VM-like local nodes need `{tool}`; install it with: apt-get install -y "
                               f"{'sudo' if tool == 'sudo' else 'util-linux'}")
    if runuser(user, "sudo", "-n", "true").returncode != 0:
        raise ClusterError(f"{user} has no passwordless sudo; add /etc/sudoers.d/{user} (mode 0440) with "
                           f"`{user} ALL=(ALL) NOPASSWD:ALL`, as cloud images do for their default user")
    resolved = str(state.resolve())
    inside = [d for d in OVERLAID if resolved == d or resolved.startswith(d + "/")]
    if inside:
        raise ClusterError(f"the cluster state {state} is under {inside[0]}, which VM-like nodes see copy-on-write; "
                           "set GPUFORGE_HOME elsewhere (e.g. under /srv or /tmp)")


def runuser(user: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", *cmd], capture_output=True, text=True)


def share_storage(user: str, storage: Path) -> None:
    """The shared storage folder belongs to the login user, who must be able to reach it."""
    entry = pwd.getpwnam(user)
    os.chown(storage, entry.pw_uid, entry.pw_gid)
    if runuser(user, "test", "-w", str(storage)).returncode != 0:
        raise ClusterError(f"{user} cannot reach the storage folder {storage}: every folder above it must be "
                           f"traversable by {user} (chmod o+x), or set GPUFORGE_HOME to such a place")


def boot_script(node_dir: Path, sshd: str, boot_hook: str) -> str:
    """What runs inside a fresh namespace at every boot: the overlays, the reboot shim, the hook, then sshd."""
    lines = ["set -e", "mount --make-rprivate /"]
    for target in OVERLAID:
        layer = node_dir / "disk" / target.strip("/").replace("/", "-")
        lines.append(f"mkdir -p {layer}/upper {layer}/work")
        lines.append(f"mount -t overlay overlay -o lowerdir={target},upperdir={layer}/upper,workdir={layer}/work {target}")
    lines += [
        "mkdir -p /usr/local/sbin",
        f"cp {node_dir}/reboot-shim /usr/local/sbin/reboot && chmod 0755 /usr/local/sbin/reboot",
    ]
    if boot_hook:
        lines.append(f"NODE_DIR={node_dir} {shlex.quote(boot_hook)}")
    # what the node "enables" (the autostop watcher, /etc/gpuforge/boot.d, on its own /etc) starts at every boot
    lines += ["for s in /etc/gpuforge/boot.d/*.sh; do [ -f \"$s\" ] && sh \"$s\" || true; done"]
    lines += [f'echo "boot $(date +%s)" >> {node_dir}/boot.log', f"exec {sshd} -D -e -f {node_dir}/sshd_config"]
    return "\n".join(lines) + "\n"


MACHINE_SCRIPT = """\
# gpuforge VM-like node {node_dir}: boots until it is switched off (no reboot requested when its sshd ends).
while :; do
  rm -f {node_dir}/reboot-requested
  unshare -m -p -f --mount-proc sh {node_dir}/boot.sh
  [ -e {node_dir}/reboot-requested ] || break
done
"""


def write_vm_node(state: Path, rank: int, keys: Path, user: str, address: str, port: int, sshd: str,
                  boot_hook: str, permit: str = "127.0.0.1:* localhost:*") -> Path:
    node_dir = state / "nodes" / f"node-{rank}"
    node_dir.mkdir(parents=True, exist_ok=True)
    (node_dir / "sshd_config").write_text(VM_SSHD_CONFIG.format(
        port=port, address=address, host_key=keys / "host_ed25519", authorized_keys=keys / "authorized_keys", user=user,
        permit_open=permit))
    (node_dir / "reboot-shim").write_text(REBOOT_SHIM.format(node_dir=node_dir))
    (node_dir / "boot.sh").write_text(boot_script(node_dir, sshd, boot_hook))
    (node_dir / "machine.sh").write_text(MACHINE_SCRIPT.format(node_dir=node_dir))
    return node_dir


def power_on(node_dir: Path) -> subprocess.Popen:
    """Start a node's machine loop (its boots) in a session of its own; its output goes to sshd.log."""
    with open(node_dir / "sshd.log", "ab") as out:
        return subprocess.Popen(["sh", str(node_dir / "machine.sh")], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def vm_node_info(rank: int, address: str, port: int, keys: Path, user: str) -> NodeInfo:
    return NodeInfo(name=f"node-{rank}", rank=rank, public_address=address, private_address=address, ssh_port=port,
                    user=user, key_path=str(keys / "id_ed25519"), workdir=WORKDIR, instance_type="local")


def node_dir_of(cluster: ClusterInfo, rank: int) -> Path:
    return Path(cluster.state_dir) / "nodes" / f"node-{rank}"


def is_vm_like(cluster: ClusterInfo) -> bool:
    return bool(cluster.extra.get("login_user"))
