"""Two "existing machines" on this host for the peer benchmark: each node is an OpenSSH server on port 22
of its own loopback address, in its own PID and mount namespace (`unshare`), with its own home, /tmp and
/etc/os-release (bind mounts: Ubuntu 22.04, which our version matrix covers), logged into as a non-root
user with passwordless sudo, as a cloud VM would be.

    nodes = start_nodes(root, key_pub, bashrc_extra)   # 127.0.13.2 and 127.0.13.3
    processes_on(nodes[0])                             # what runs on that "machine", PSS per process
    stop_nodes(nodes)                                  # kills each namespace's init: nothing survives

Both tools see the same machines; neither knows they share a kernel. What they share: the CPUs, the
network stack (so Ray's daemons need distinct ports and `--node-ip-address`), and the rest of the
file system (the Ray install and the shared storage folder, as an image and NFS would provide).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

USER = "gpuforge-peer"
ADDRESSES = ("127.0.13.2", "127.0.13.3")  # away from the local cluster's 127.0.0.x
SSHD = "/usr/sbin/sshd"
# What each node says it is: our setup has tested versions for Ubuntu only; the host is Debian 12.
OS_RELEASE = """\
PRETTY_NAME="Ubuntu 22.04.5 LTS"
NAME="Ubuntu"
VERSION_ID="22.04"
VERSION="22.04.5 LTS (Jammy Jellyfish)"
VERSION_CODENAME=jammy
ID=ubuntu
ID_LIKE=debian
UBUNTU_CODENAME=jammy
"""
SSHD_CONFIG = """\
Port 22
ListenAddress {address}
HostKey {host_key}
PidFile {node_dir}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
PermitRootLogin no
MaxStartups 100:30:200
MaxSessions 100
PrintMotd no
Subsystem sftp internal-sftp
"""


@dataclass
class Node:
    index: int
    address: str
    dir: Path
    proc: subprocess.Popen  # `unshare`, which waits for the namespace's init

    @property
    def init_pid(self) -> int:
        """The namespace's PID 1 (sshd, exec'd by the mount script), seen from the host."""
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        return int(entry.name)
                except (OSError, ValueError, IndexError):
                    continue
        raise RuntimeError(f"node {self.address}: its namespace's init is gone")


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def ensure_user() -> pwd.struct_passwd:
    """The login user of both nodes: made once on this host (useradd), unlocked for key logins, sudo without password."""
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        run("useradd", "--create-home", "--shell", "/bin/bash", "--comment", "gpuforge peer benchmark nodes", USER)
        run("usermod", "-p", "*", USER)  # a locked (!) password makes sshd with UsePAM no refuse the account
        entry = pwd.getpwnam(USER)
    sudoers = Path(f"/etc/sudoers.d/{USER}")
    if not sudoers.exists():
        sudoers.write_text(f"{USER} ALL=(ALL) NOPASSWD:ALL\n")
        sudoers.chmod(0o440)
    return entry


def prepare_home(home: Path, user: pwd.struct_passwd, key_pub: str, bashrc_extra: str) -> None:
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    (home / ".ssh" / "authorized_keys").write_text(key_pub + "\n")
    skel = Path("/etc/skel")
    for name in (".bashrc", ".profile"):
        text = (skel / name).read_text() if (skel / name).exists() else ""
        (home / name).write_text(text + (bashrc_extra if name == ".bashrc" else ""))
    for path in [home, *home.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    home.chmod(0o755)
    (home / ".ssh").chmod(0o700)
    (home / ".ssh" / "authorized_keys").chmod(0o600)


def start_nodes(root: Path, host_key: Path, key_pub: str, bashrc_extra: str = "") -> list[Node]:
    user = ensure_user()
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    nodes: list[Node] = []
    try:
        for i, address in enumerate(ADDRESSES):
            node_dir = root / f"node-{i}"
            for sub in ("home", "tmp"):
                (node_dir / sub).mkdir(parents=True, exist_ok=True)
            (node_dir / "tmp").chmod(0o1777)
            prepare_home(node_dir / "home", user, key_pub, bashrc_extra)
            (node_dir / "os-release").write_text(OS_RELEASE)
            config = node_dir / "sshd_config"
            config.write_text(SSHD_CONFIG.format(address=address, host_key=host_key, node_dir=node_dir))
            script = (f"mount --bind {node_dir / 'home'} {user.pw_dir} && mount --bind {node_dir / 'tmp'} /tmp"
                      f" && mount --bind {node_dir / 'os-release'} /etc/os-release"
                      f" && exec {SSHD} -D -e -f {config}")
            log = open(node_dir / "sshd.log", "ab")
            proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private",
                                     "sh", "-c", script], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            nodes.append(Node(i, address, node_dir, proc))
            wait_for_ssh(address, proc, node_dir / "sshd.log")
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


def wait_for_ssh(address: str, proc: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"node {address}: sshd exited with {proc.returncode}: {log.read_text()[-400:]}")
        try:
            with socket.create_connection((address, 22), timeout=0.5) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"node {address}: sshd did not answer on port 22 within {timeout:.0f} s")


def processes_on(node: Node) -> list[tuple[int, str, int]]:
    """(pid, command, PSS in KiB) of every process on the node but its init (the sshd listener)."""
    init = node.init_pid
    ns = os.readlink(f"/proc/{init}/ns/pid")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == init:
            continue
        try:
            if os.readlink(entry / "ns/pid") != ns:
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            pss = next((int(line.split()[1]) for line in (entry / "smaps_rollup").read_text().splitlines()
                        if line.startswith("Pss:")), 0)
        except (OSError, ValueError):
            continue
        if cmd:  # kernel threads and zombies have none
            found.append((int(entry.name), cmd, pss))
    return sorted(found)


def stop_nodes(nodes: list[Node]) -> None:
    """SIGKILL each namespace's init: the kernel then kills every process in that namespace."""
    for node in nodes:
        if node.proc.poll() is None:
            try:
                os.kill(node.init_pid, signal.SIGKILL)
            except (RuntimeError, ProcessLookupError):
                node.proc.kill()
        try:
            node.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()


def remove_tree(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
