"""gpuforge autostop watcher: runs on a node (a systemd service on cloud nodes), stops the node when it is idle.

    python3 autostop_watch.py CONFIG.json

Standard library only (it runs under the system's python3, before and without our venv). Every POLL_S it looks for
work: a run of ours whose supervisor is alive (`<runs_dir>/*/status.json` in state running or starting, as
workloads/supervise.py writes it), a run of ours elsewhere on the cluster (a mark in `<runs_dir>/../cluster-runs/`
whose head answers a TCP connect, or did within `mark_grace_s`; workloads/cluster_marks.py), or an SSH connection open to this node's sshd for at least `session_min_s`
(an interactive `ssh`, a `jupyter`/`tensorboard`/`forward` tunnel, a `logs --follow`, a `setup` in progress; the
seconds-long probes of `status` do not count). When there has been none for `idle_s`, it stops the node:
- `poweroff`: the OS shuts down; the cloud then stops (or, as the program set it, terminates) the instance. With
  `self_delete: gcp` (autodown on GCP) the watcher first asks Compute Engine to delete its own VM (instances.delete as
  the VM's service account, which the program granted that on the cluster's instances only): GCE then shuts the guest
  down and deletes the VM with its boot disk. If that fails (no permission, no network), one line says why and the
  node powers off as without autodown (the VM stops; the controller removes the rest when it next looks). The
  access token is used for that one request only: never logged, never written;
- `stop-sshd`: a local node: its sshd ends (`sshd_pid` 1 is a VM-like node's whole namespace, else the PID in
  `sshd_pid_file`), which is what a stopped machine looks like from the controller.
Its state (`state_path`, JSON) says when it will stop, so `fab status` can show the time left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ESTABLISHED = "01"  # /proc/net/tcp's state code (include/net/tcp_states.h)
ACTIVE_RUN_STATES = ("running", "starting")
MARK_GRACE_S = 300.0  # a cluster mark counts this long after its head last answered (or it was written)
PROBE_TIMEOUT_S = 2.0
GCE_METADATA = "http://metadata.google.internal"  # every GCE VM's metadata server (config: gcp_metadata_url)
COMPUTE_API = "https://compute.googleapis.com"  # Compute Engine's REST root (config: gcp_compute_url)
API_TIMEOUT_S = 10.0  # one metadata or Compute request; a node that cannot reach them powers off instead
DELETE_GRACE_S = 120.0  # GCE shuts the guest down itself as it deletes the VM; a poweroff after this: the safety net


class SelfDeleteError(Exception):
    """Why the VM could not delete itself: one line, without the token."""


def metadata_get(base: str, path: str) -> bytes:
    """One value of the GCE metadata server (`instance/name`, ...); never through a proxy, which it refuses."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(f"{base}/computeMetadata/v1/{path}", headers={"Metadata-Flavor": "Google"})
    with opener.open(req, timeout=API_TIMEOUT_S) as resp:
        return resp.read()


def gce_identity(base: str) -> tuple[str, str, str]:
    """(project id, zone, instance name) of this VM; `instance/zone` is `projects/NUMBER/zones/ZONE`."""
    project = metadata_get(base, "project/project-id").decode().strip()
    zone = metadata_get(base, "instance/zone").decode().strip().rsplit("/", 1)[-1]
    name = metadata_get(base, "instance/name").decode().strip()
    if not (project and zone and name):
        raise ValueError(f"incomplete identity from the metadata server: {project!r} {zone!r} {name!r}")
    return project, zone, name


def gce_token(base: str) -> str:
    """An OAuth access token of the VM's service account, with the VM's scopes."""
    return str(json.loads(metadata_get(base, "instance/service-accounts/default/token"))["access_token"])


def api_message(exc: urllib.error.HTTPError) -> str:
    """The API's own message of an error reply (`Required 'compute.instances.delete' permission for ...`)."""
    try:
        body = json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return exc.reason or ""
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("message", "")) if isinstance(error, dict) else str(exc.reason or "")


def reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}: {api_message(exc)}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}"


def delete_gce_instance(metadata_url: str = GCE_METADATA, compute_url: str = COMPUTE_API) -> str:
    """Ask Compute Engine to delete this VM (instances.delete); the operation's name. SelfDeleteError says why not."""
    try:
        project, zone, name = gce_identity(metadata_url)
        token = gce_token(metadata_url)
    except (OSError, ValueError, KeyError) as exc:
        raise SelfDeleteError(f"the metadata server did not give this VM's name and token: {reason(exc)}") from None
    target = f"projects/{project}/zones/{zone}/instances/{name}"
    req = urllib.request.Request(f"{compute_url.rstrip('/')}/compute/v1/{target}", method="DELETE",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=API_TIMEOUT_S) as resp:
            operation = json.loads(resp.read() or b"{}")
    except (OSError, ValueError) as exc:
        raise SelfDeleteError(f"instances.delete of {target}: {reason(exc)}") from None
    return str(operation.get("name", "")) if isinstance(operation, dict) else ""


def active_runs(runs_dir: str) -> list[str]:
    """Run ids whose supervisor process is alive on this node."""
    found = []
    for status in sorted(Path(runs_dir).glob("*/status.json")):
        try:
            data = json.loads(status.read_text())
        except (OSError, ValueError):
            continue
        pid = data.get("supervisor_pid")
        if data.get("state") in ACTIVE_RUN_STATES and isinstance(pid, int) and pid_alive(pid):
            found.append(status.parent.name)
    return found


def head_answers(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def cluster_runs(marks_dir: Path, grace_s: float, last_ok: dict[str, float], now: float) -> list[str]:
    """Run ids of the cluster's marks still alive (see the module docstring); a mark whose head has not answered
    for `grace_s` is deleted. `last_ok`: when each mark's head last answered (the watcher's memory)."""
    found = []
    for mark in sorted(marks_dir.glob("*.json")):
        try:
            data = json.loads(mark.read_text())
            written = mark.stat().st_mtime
            address, port = data["head"]
            if head_answers(str(address), int(port)):
                last_ok[mark.name] = now
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if now - max(written, last_ok.get(mark.name, 0.0)) < grace_s:
            found.append(str(data.get("run_id", mark.stem)))
            continue
        last_ok.pop(mark.name, None)
        try:
            mark.unlink()
        except OSError:
            pass
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def decode_address(text: str) -> tuple[str, int]:
    """/proc/net/tcp's `0100007F:0016` -> ('127.0.0.1', 22); IPv6 addresses come back as hex."""
    address, port = text.split(":")
    if len(address) == 8:
        address = ".".join(str(b) for b in reversed(bytes.fromhex(address)))
    return address, int(port, 16)


def ssh_connections(port: int, address: str = "") -> set[str]:
    """Established TCP connections to our sshd (its port, and its address when it listens on one), as
    `local>remote` keys."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != ESTABLISHED:
                continue
            local, remote = decode_address(fields[1]), fields[2]
            if local[1] == port and (not address or local[0] == address):
                found.add(f"{fields[1]}>{remote}")
    return found


class Watcher:
    def __init__(self, config: dict):
        self.config = config
        self.idle_s = float(config["idle_s"])
        self.poll_s = float(config.get("poll_s", 15))
        self.session_min_s = float(config.get("session_min_s", 30))
        self.first_seen: dict[str, float] = {}
        self.mark_grace_s = float(config.get("mark_grace_s", MARK_GRACE_S))
        self.marks_ok: dict[str, float] = {}
        self.last_busy = time.time()

    def busy_reasons(self, now: float) -> list[str]:
        reasons = [f"run {run}" for run in active_runs(self.config["runs_dir"])]
        marks = Path(self.config["runs_dir"]).parent / "cluster-runs"
        reasons += [f"run {run} on the cluster" for run in cluster_runs(marks, self.mark_grace_s, self.marks_ok, now)]
        connections = ssh_connections(int(self.config["ssh_port"]), self.config.get("ssh_address", ""))
        self.first_seen = {key: self.first_seen.get(key, now) for key in connections}
        sessions = [key for key, since in self.first_seen.items() if now - since >= self.session_min_s]
        if sessions:
            reasons.append(f"{len(sessions)} ssh session(s)")
        return reasons

    def write_state(self, now: float, reasons: list[str], state: str) -> None:
        path = Path(self.config["state_path"])
        data = {"state": state, "checked_at": now, "idle_since": self.last_busy, "idle_s": self.idle_s,
                "stop_at": self.last_busy + self.idle_s, "busy": reasons, "action": self.config["action"],
                "pid": os.getpid()}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.chmod(tmp, 0o644)
        tmp.replace(path)

    def step(self, now: float) -> bool:
        """One look; True when the node must stop now."""
        reasons = self.busy_reasons(now)
        if reasons:
            self.last_busy = now
        due = not reasons and now - self.last_busy >= self.idle_s
        self.write_state(now, reasons, "stopping" if due else ("busy" if reasons else "idle"))
        return due

    def stop_node(self) -> None:
        action = self.config["action"]
        log(f"idle for {self.idle_s:.0f} s: {action}")
        if action == "poweroff":
            if self.config.get("self_delete") == "gcp":
                self.delete_self()
            poweroff()
            return
        pid = int(self.config.get("sshd_pid") or 0) or read_pid(self.config.get("sshd_pid_file", ""))
        if pid:
            os.kill(pid, signal.SIGTERM)

    def delete_self(self) -> bool:
        """Autodown on GCP: the VM deletes itself; False (and one line) when it could not, and it powers off instead."""
        try:
            operation = delete_gce_instance(self.config.get("gcp_metadata_url") or GCE_METADATA,
                                            self.config.get("gcp_compute_url") or COMPUTE_API)
        except SelfDeleteError as exc:
            log(f"autodown: this VM could not delete itself ({exc}); powering off instead: the VM stops, and the "
                "controller deletes it and the rest of the cluster when it next looks")
            return False
        grace = float(self.config.get("delete_grace_s", DELETE_GRACE_S))
        log(f"autodown: Compute Engine is deleting this VM (operation {operation}); a poweroff follows in "
            f"{grace:.0f} s if it is still up")
        time.sleep(grace)
        return True

    def run(self) -> None:
        while True:
            if self.step(time.time()):
                self.stop_node()
                return
            time.sleep(self.poll_s)


def poweroff() -> None:
    subprocess.run(["systemctl", "poweroff"], check=False)


def read_pid(path: str) -> int:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def log(text: str) -> None:
    print(f"gpuforge-autostop: {text}", flush=True)


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    Watcher(config).run()


if __name__ == "__main__":
    main()
