"""The embedded local cluster: each node is a real OpenSSH server on its own loopback address.

    create_local_cluster("demo", nodes=2, home=Path("~/.gpuforge"))   # what `fab up` does
    destroy_local_cluster(state_dir, keep_storage=True)                # what `fab down` does (data kept)

Each node has its own address (127.0.0.2, 127.0.0.3, ...), port, sshd config and directory (its
"disk"); the cluster has one host key, one client key (0600) and a known_hosts that pins the host
key, and a shared storage directory (`file://`), as NFS would be. Everything lives under the
cluster's state dir, and teardown kills exactly the processes that reference it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from infra.cluster import ClusterInfo, NodeInfo
from infra.errors import ClusterError, SshdMissingError

logger = logging.getLogger(__name__)

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")
FIRST_HOST = 2  # 127.0.0.1 is the controller's own address; nodes start at 127.0.0.2
MAX_LOCAL_NODES = 64
SSHD_READY_TIMEOUT_S = 10.0
TERM_GRACE_S = 3.0  # between SIGTERM and SIGKILL at teardown

SSHD_CONFIG = """\
Port {port}
ListenAddress {address}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
PermitRootLogin prohibit-password
StrictModes no
MaxStartups 100:30:200
MaxSessions 100
# Port forwarding to loopback only (Jupyter, TensorBoard and model-server tunnels; ProxyJump between nodes):
AllowTcpForwarding local
PermitOpen {permit_open}
AllowStreamLocalForwarding no
GatewayPorts no
PermitTunnel no
X11Forwarding no
PrintMotd no
# Skip shell start-up files that would run for every command (pyenv init costs ~60 ms each):
SetEnv SHLVL=1 GPUFORGE_NODE_DIR={node_dir}
Subsystem sftp internal-sftp
"""


def find_sshd() -> str:
    for path in (shutil.which("sshd"), *SSHD_CANDIDATES):
        if path and os.access(path, os.X_OK):
            return path
    raise SshdMissingError(
        "the local cluster needs the OpenSSH server (sshd), which is not installed; "
        "install it with: sudo apt-get install -y openssh-server"
    )


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def generate_key(path: Path, comment: str) -> str:
    """An ed25519 key pair at path (private 0600) and path.pub; returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    path.chmod(0o600)
    return path.with_suffix(".pub").read_text().strip()


def wait_for_port(address: str, port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SSHD_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"sshd for {address}:{port} exited with {proc.returncode}: {log.read_text()[-500:]}")
        try:
            with socket.create_connection((address, port), timeout=0.5) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.02)
    raise ClusterError(f"sshd for {address}:{port} did not answer within {SSHD_READY_TIMEOUT_S:.0f} s; see {log}")


def state_dir_for(home: Path, name: str) -> Path:
    return Path(home).expanduser() / "clusters" / name


def create_local_cluster(name: str, nodes: int, home: Path, login_user: str = "", boot_hook: str = "") -> ClusterInfo:
    """Start `nodes` sshd nodes and write the cluster record; on any failure, tear down what started.
    With `login_user` the nodes are VM-like (infra/local_vm.py): they log in as that sudo user and get the
    cloud plan; `boot_hook` runs inside each of them at every boot."""
    if not 1 <= nodes <= MAX_LOCAL_NODES:
        raise ClusterError(f"a local cluster has 1..{MAX_LOCAL_NODES} nodes; got {nodes}")
    sshd = find_sshd()
    state = state_dir_for(home, name)
    if (state / "cluster.json").exists():
        raise ClusterError(f"cluster {name} already exists at {state}; `gpuforge down --cluster {name}` first")
    if login_user:
        from infra.local_vm import check_vm_like

        check_vm_like(login_user, state)
    keys = state / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation dir
    host_pub = generate_key(keys / "host_ed25519", f"gpuforge-{name}-host")
    client_pub = generate_key(keys / "id_ed25519", f"gpuforge-{name}")
    (keys / "authorized_keys").write_text(client_pub + "\n")
    storage = state / "storage"
    storage.mkdir(exist_ok=True)
    infos, known = [], []
    permit = permit_open(nodes)
    try:
        if login_user:
            from infra.local_vm import share_storage

            share_storage(login_user, storage)
        for rank in range(nodes):
            info = start_vm_node(sshd, state, rank, keys, login_user, boot_hook, permit) if login_user else \
                start_node(sshd, state, rank, keys, permit)
            infos.append(info)
            known.append(f"[{info.public_address}]:{info.ssh_port} {' '.join(host_pub.split()[:2])}")
    except BaseException:
        stop_processes(state)
        remove_state(state, keep_storage=True)  # a storage folder kept from an earlier cluster stays
        raise
    (keys / "known_hosts").write_text("\n".join(known) + "\n")
    vm = {"node_mode": "machine", "login_user": login_user, "boot_hook": boot_hook} if login_user else {}
    cluster = ClusterInfo(
        name=name, cloud="local", nodes=tuple(infos), region="local", storage_url=storage.as_uri(),
        state_dir=str(state), known_hosts=str(keys / "known_hosts"),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        extra={"node_mode": "controller", **vm},
    )
    cluster.save(state / "cluster.json")
    return cluster


def node_address(rank: int) -> str:
    return f"127.0.0.{FIRST_HOST + rank}"


def permit_open(nodes: int) -> str:
    """sshd's PermitOpen for a local node: its loopback, and the cluster's node addresses (all 127.0.0.x) for
    ProxyJump; nothing off this machine."""
    return " ".join(["127.0.0.1:*", "localhost:*", *(f"{node_address(r)}:*" for r in range(nodes))])


def start_node(sshd: str, state: Path, rank: int, keys: Path, permit: str = "127.0.0.1:* localhost:*") -> NodeInfo:
    address = node_address(rank)
    port = free_port(address)
    node_dir = state / "nodes" / f"node-{rank}"
    node_dir.mkdir(parents=True, exist_ok=True)
    config = node_dir / "sshd_config"
    config.write_text(SSHD_CONFIG.format(
        port=port, address=address, host_key=keys / "host_ed25519", pid_file=node_dir / "sshd.pid",
        authorized_keys=keys / "authorized_keys", node_dir=node_dir, permit_open=permit))
    log = node_dir / "sshd.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    wait_for_port(address, port, proc, log)
    return NodeInfo(name=f"node-{rank}", rank=rank, public_address=address, private_address=address,
                    ssh_port=port, user=os.environ.get("USER") or "root", key_path=str(keys / "id_ed25519"),
                    workdir=str(node_dir), instance_type="local")


def start_vm_node(sshd: str, state: Path, rank: int, keys: Path, user: str, boot_hook: str,
                  permit: str = "127.0.0.1:* localhost:*") -> NodeInfo:
    """A VM-like node (infra/local_vm.py): its machine loop boots it in namespaces of its own."""
    from infra.local_vm import power_on, vm_node_info, write_vm_node

    address = node_address(rank)
    port = free_port(address)
    node_dir = write_vm_node(state, rank, keys, user, address, port, sshd, boot_hook, permit)
    wait_for_port(address, port, power_on(node_dir), node_dir / "sshd.log")
    return vm_node_info(rank, address, port, keys, user)


def node_config_dir(cluster: ClusterInfo, rank: int) -> Path:
    """Where a node's sshd_config and logs are (a VM-like node's workdir is its own /opt/gpuforge)."""
    if cluster.extra.get("login_user"):
        return Path(cluster.state_dir) / "nodes" / f"node-{rank}"
    return Path(cluster.node(rank).workdir)


def node_sshd_command(cluster: ClusterInfo, rank: int) -> list[str]:
    """The command that (re)starts a node's sshd: what a node "boot" runs."""
    return [find_sshd(), "-D", "-e", "-f", str(node_config_dir(cluster, rank) / "sshd_config")]


def restart_node(cluster: ClusterInfo, rank: int) -> None:
    """Start a node's sshd again after it stopped (a node coming back from a reboot)."""
    node = cluster.node(rank)
    log = node_config_dir(cluster, rank) / "sshd.log"
    if cluster.extra.get("login_user"):
        from infra.local_vm import power_on

        wait_for_port(node.public_address, node.ssh_port, power_on(log.parent), log)
        return
    with open(log, "ab") as out:
        proc = subprocess.Popen(node_sshd_command(cluster, rank), stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    wait_for_port(node.public_address, node.ssh_port, proc, log)
    run_boot_scripts(Path(node.workdir))


def run_boot_scripts(workdir: Path) -> None:
    """What a quick node "enables" (`<workdir>/.gpuforge/boot.d/*.sh`, e.g. the autostop watcher) runs again at its
    boot, as a VM-like node's boot.sh and a cloud node's systemd do."""
    for script in sorted((workdir / ".gpuforge" / "boot.d").glob("*.sh")):
        subprocess.run(["sh", str(script)], stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)


def stop_node(cluster: ClusterInfo, rank: int) -> bool:
    """Take one node down: its sshd and every session it serves (as a machine going off would)."""
    config = str(node_config_dir(cluster, rank) / "sshd_config")
    procs = our_processes(Path(cluster.state_dir))
    listeners = {pid for pid, cmd in procs if is_sshd(cmd) and config in " ".join(cmd)}
    doomed = set(listeners)
    parents = {pid: parent_pid(pid) for pid, _ in procs}
    grew = True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in doomed and pid not in doomed}
        doomed |= new
        grew = bool(new)
    kill_pids(sorted(doomed))
    return bool(listeners)


def kill_node(cluster: ClusterInfo, rank: int) -> int:
    """Lose a node as a machine is lost (preempted, powered off): its sshd, its sessions, and at once (SIGKILL)
    every process it runs, found by the node's folder in their command line or working dir; how many died."""
    stop_node(cluster, rank)
    marker = str(Path(cluster.node(rank).workdir).resolve())
    doomed = []
    for pid, cmd in our_processes(Path(cluster.state_dir)):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cwd == marker or cwd.startswith(marker + "/") or any(marker + "/" in part for part in cmd):
            doomed.append(pid)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(doomed)


def parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def names_state(text: str, marker: str) -> bool:
    """`text` names a path inside the state dir other than its storage folder, which is the user's data
    and outlives the cluster: a user's `tail -f` of a run's log there, a shell in it, or `gpuforge serve`
    of a run there is not a process of the cluster."""
    at = text.find(marker)
    while at >= 0:
        rest = text[at + len(marker):]
        if (rest == "" and at == 0) or (rest.startswith("/") and rest != "/storage" and not rest.startswith("/storage/")):
            return True
        at = text.find(marker, at + 1)
    return False


def our_processes(state: Path) -> list[tuple[int, list[str]]]:
    """Processes whose command line or working directory is inside this cluster's state dir (its storage
    folder aside): its sshd daemons, and the jobs and shells running in its node directories. Nothing else."""
    marker = str(state.resolve())
    table: dict[int, tuple[int, list[str], bool]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = [c for c in (entry / "cmdline").read_bytes().decode(errors="replace").split("\0") if c]
            cwd = os.readlink(entry / "cwd")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        mine = any(names_state(part, marker) for part in cmd) or (cwd.startswith(marker) and names_state(cwd, marker))
        table[int(entry.name)] = (ppid, cmd, mine)
    owned = {pid for pid, (_, _, mine) in table.items() if mine}
    grew = True
    while grew:  # descendants too: the per-connection sshd processes and whatever they run
        new = {pid for pid, (ppid, _, _) in table.items() if ppid in owned and pid not in owned}
        owned |= new
        grew = bool(new)
    return [(pid, table[pid][1] or ["?"]) for pid in sorted(owned)]


def kill_pids(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + TERM_GRACE_S
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if pid_alive(p)]
            time.sleep(0.02)
        pids = alive
        if not pids:
            return


def is_sshd(cmd: list[str]) -> bool:
    """sshd rewrites its title to `sshd: /usr/sbin/sshd -D ... [listener]` or `sshd: root@notty`."""
    return cmd[0].startswith("sshd") or Path(cmd[0].split()[0]).name == "sshd"


def pid_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead; its parent reaps it


def recorded_sshd_pids(state: Path) -> list[int]:
    """The PIDs our sshd daemons wrote to their PidFile, kept only when that process still runs
    with our node's config (a PID the kernel reused for something else is never touched)."""
    pids = []
    for pid_file in sorted(state.glob("nodes/node-*/sshd.pid")):
        try:
            pid = int(pid_file.read_text().strip())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if str(pid_file.parent / "sshd_config") in cmd:
            pids.append(pid)
    return pids


def stop_processes(state: Path) -> int:
    """Kill every process of this cluster: jobs first, then the sshd daemons by their recorded PIDs,
    then anything left that references the state dir; returns how many there were."""
    procs = our_processes(state)
    daemons = set(recorded_sshd_pids(state))
    jobs = [pid for pid, cmd in procs if not is_sshd(cmd) and pid not in daemons]
    kill_pids(jobs)
    kill_pids(sorted(daemons))
    leftover = our_processes(state)  # sessions of killed daemons, or a job that forked while we killed its parent
    kill_pids([pid for pid, _ in leftover])
    return len({pid for pid, _ in procs} | daemons)


def remove_state(state: Path, keep_storage: bool) -> None:
    """Remove the cluster's state dir; with keep_storage, all but its storage folder (the user's data)."""
    if not keep_storage or not (state / "storage").exists():
        shutil.rmtree(state, ignore_errors=True)
        return
    for entry in state.iterdir():
        if entry.name != "storage":
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def destroy_local_cluster(state: Path, keep_storage: bool = False) -> str:
    """Stop everything the cluster started and remove its state (with keep_storage: all but the storage folder,
    which holds every run's checkpoints and models); safe to call twice."""
    state = Path(state)
    if not state.exists():
        return f"nothing to remove at {state}"
    count = stop_processes(state)
    remove_state(state, keep_storage)
    return f"stopped {count} process(es) and removed {state}"  # what becomes of the storage, its caller says
