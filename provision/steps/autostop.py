"""The autostop step: the idle watcher (provision/data/autostop_watch.py) on every node, with the cluster's timeout.

Where it lives and how it runs:
- a machine of its own (cloud VM, VM-like local node): the script in /usr/local/lib/gpuforge, its config in
  /etc/gpuforge, its state in /var/lib/gpuforge, all root's; under systemd (PID 1) it is the service
  `gpuforge-autostop` (enabled, so it comes back with the node after a stop); without systemd (a VM-like local node)
  a boot script in /etc/gpuforge/boot.d starts it at every boot, and the step starts it now;
- a quick local node: the same files under `<workdir>/.gpuforge/autostop`, started detached; `fab up` of the
  stopped cluster runs its boot script again (infra/local.py).
What stopping means is decided here, never on the node: `poweroff` on a cloud node, `stop-sshd` on a local one (a
local node never powers this machine off); with autodown on GCP the node first deletes its own VM (`self_delete`,
the program grants it that: infra/gcp.py), its Compute and metadata endpoints those of GPUFORGE_GCP_ENDPOINT and
GPUFORGE_METADATA_URL (`gcp=URL`) when the controller has them set (an emulator), else Google's. With autostop off
the watcher is removed. Hosts clusters (machines the user already has) get none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from importlib import resources
from typing import Any

from infra.autostop import DEFAULT_S
from provision.steps.base import Cmd, Step, StepContext, run_cmd, run_plan

SERVICE = "gpuforge-autostop"
POLL_S = 15.0  # a look every 15 s: the stop comes at most this late, and costs nothing in between
SESSION_MIN_S = 30.0  # an SSH connection counts as a session once open this long (the `status` probes are shorter)
LOCAL_POLL_S = 0.5  # local nodes: tests run the whole path with a timeout of seconds
LOCAL_SESSION_MIN_S = 1.0
MARK_GRACE_S = 300.0  # a run elsewhere on the cluster: its head unanswered this long (or starting) ends its mark
LOCAL_MARK_GRACE_S = 3.0
UNIT = """\
[Unit]
Description=gpuforge autostop: stop this node when no run and no SSH session has been active for a while
After=network-online.target ssh.service

[Service]
Type=simple
ExecStart=/usr/bin/python3 {script} {config}
Restart=on-failure
RestartSec=10

[Install]
WantedBy=multi-user.target
"""


def q(text: str) -> str:
    return shlex.quote(text)


def idle_seconds(ctx: StepContext) -> int:
    """The cluster's timeout: its record's, else a cloud's default (a plan for a type not up yet)."""
    extra = ctx.cluster.extra
    if "autostop_s" in extra:
        return int(extra["autostop_s"] or 0)
    return DEFAULT_S if ctx.cluster.cloud in ("aws", "gcp") else 0


def watcher_source() -> bytes:
    return resources.files("provision").joinpath("data/autostop_watch.py").read_bytes()


class Layout:
    """Paths of the watcher on one node."""

    def __init__(self, ctx: StepContext):
        self.quick = ctx.shares_controller
        if self.quick:
            base = f"{ctx.workdir}/.gpuforge/autostop"
            self.script, self.config, self.state = f"{base}/autostop_watch.py", f"{base}/config.json", f"{base}/state.json"
            self.dirs = [base, f"{ctx.workdir}/.gpuforge/boot.d"]
            self.boot = f"{ctx.workdir}/.gpuforge/boot.d/autostop.sh"
            self.pid = f"{base}/watcher.pid"
        else:
            self.script = "/usr/local/lib/gpuforge/autostop_watch.py"
            self.config, self.state = "/etc/gpuforge/autostop.json", "/var/lib/gpuforge/autostop.json"
            self.dirs = ["/usr/local/lib/gpuforge", "/etc/gpuforge/boot.d", "/var/lib/gpuforge"]
            self.boot = "/etc/gpuforge/boot.d/autostop.sh"
            self.pid = "/var/lib/gpuforge/autostop.pid"


def state_path(cluster: Any, node: Any) -> str:
    """Where a node's watcher writes its state (what `fab status` reads)."""
    return Layout(StepContext(cluster=cluster, node=node)).state


def watcher_config(ctx: StepContext, layout: Layout) -> dict[str, Any]:
    local = ctx.cluster.cloud == "local"
    config: dict[str, Any] = {
        "idle_s": idle_seconds(ctx), "runs_dir": f"{ctx.workdir}/runs", "state_path": layout.state,
        "ssh_port": ctx.node.ssh_port, "poll_s": LOCAL_POLL_S if local else POLL_S,
        "session_min_s": LOCAL_SESSION_MIN_S if local else SESSION_MIN_S,
        "mark_grace_s": LOCAL_MARK_GRACE_S if local else MARK_GRACE_S,
        "action": "stop-sshd" if local else "poweroff",
    }
    if ctx.cluster.cloud == "gcp" and ctx.cluster.extra.get("autodown"):
        config.update(self_delete_config())
    if local:  # every local node shares this machine's network: only connections to this node's sshd count
        config["ssh_address"] = ctx.node.private_address
        if layout.quick:
            config["sshd_pid_file"] = f"{ctx.workdir}/sshd.pid"
        else:
            config["sshd_pid"] = 1  # a VM-like node's sshd is its namespace's PID 1: ending it ends the node
    return config


def self_delete_config() -> dict[str, Any]:
    """Autodown on GCP: the watcher deletes its own VM (provision/data/autostop_watch.py), at Google's endpoints or,
    when the controller points at stand-ins, at theirs."""
    from infra.gcp_api import ENDPOINT_ENV
    from workloads.launch import metadata_override

    config: dict[str, Any] = {"self_delete": "gcp"}
    if os.environ.get(ENDPOINT_ENV):
        config["gcp_compute_url"] = os.environ[ENDPOINT_ENV].rstrip("/")
    cloud, url = metadata_override() or ("", "")
    if cloud == "gcp":
        config["gcp_metadata_url"] = url.rstrip("/")
    return config


def start_detached(layout: Layout) -> str:
    """Start the watcher in a session of its own (no systemd), replacing one that runs."""
    return (f"{stop_detached(layout)}; setsid nohup python3 {q(layout.script)} {q(layout.config)} "
            f">> {q(layout.state)}.log 2>&1 < /dev/null & echo $! > {q(layout.pid)}")


def stop_detached(layout: Layout) -> str:
    return (f"p=$(cat {q(layout.pid)} 2>/dev/null); [ -n \"$p\" ] && grep -q autostop_watch /proc/$p/cmdline "
            f"2>/dev/null && kill $p; rm -f {q(layout.pid)}; true")


SYSTEMD = '[ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]'


class AutostopStep(Step):
    name = "autostop"
    description = "the idle watcher: the node stops itself after the cluster's autostop time without work"

    def skip_reason(self, ctx: StepContext) -> str | None:
        if ctx.cluster.cloud == "hosts":
            return "machines of a hosts file are yours: no autostop"
        if ctx.cluster.cloud == "local" and not idle_seconds(ctx):  # `up --autostop off` removes a local watcher
            return "autostop is off (`gpuforge up --autostop 30s` turns it on)"
        return None

    def files(self, ctx: StepContext, layout: Layout) -> dict[str, tuple[bytes, str, str]]:
        """name -> (content, where it goes, mode): what the step uploads to the node."""
        config = json.dumps(watcher_config(ctx, layout), sort_keys=True).encode()
        files = {"autostop_watch.py": (watcher_source(), layout.script, "0755"),
                 "autostop.json": (config, layout.config, "0644"),
                 "autostop-boot.sh": (f"#!/bin/sh\n{start_detached(layout)}\n".encode(), layout.boot, "0755")}
        if not layout.quick:
            unit = UNIT.format(script=layout.script, config=layout.config).encode()
            files["gpuforge-autostop.service"] = (unit, f"/etc/systemd/system/{SERVICE}.service", "0644")
        return files

    def staging(self, ctx: StepContext) -> str:
        return f"{ctx.workdir}/.gpuforge/autostop-upload"

    def plan(self, ctx: StepContext) -> list[Cmd]:
        layout = Layout(ctx)
        root = not layout.quick
        if not idle_seconds(ctx):
            return [self.removal(layout, root)]
        files, staging = self.files(ctx, layout), self.staging(ctx)
        listing = ", ".join(f"{name} ({hashlib.sha256(data).hexdigest()[:12]})" for name, (data, _, _) in files.items())
        installs = " && ".join(f"install -m {mode} {q(staging + '/' + name)} {q(dest)}"
                               for name, (_, dest, mode) in files.items() if name != "gpuforge-autostop.service")
        cmds = [
            Cmd(f"mkdir -p {q(staging)}", desc="an upload folder"),
            Cmd(f"# sftp put {listing} to {staging}", desc=f"the watcher, its config ({idle_seconds(ctx)} s idle), "
                                                           "its boot script"),
            Cmd(f"mkdir -p {' '.join(q(d) for d in layout.dirs)} && {installs}", sudo=root, desc="installed"),
        ]
        if layout.quick:
            return [*cmds, Cmd(start_detached(layout), desc="start it")]
        unit = f"/etc/systemd/system/{SERVICE}.service"
        return [*cmds, Cmd(
            f"if {SYSTEMD}; then install -m 0644 {q(staging + '/' + SERVICE + '.service')} {unit} && "
            f"systemctl daemon-reload && systemctl enable --quiet {SERVICE} && systemctl restart {SERVICE}; "
            f"else {start_detached(layout)}; fi",
            sudo=True, desc=f"the {SERVICE} service under systemd (else the boot script starts it); (re)started")]

    def apply(self, conn: Any, ctx: StepContext) -> None:
        import io

        cmds = self.plan(ctx)
        if not idle_seconds(ctx):
            return run_plan(conn, ctx, self.name, cmds)
        run_cmd(conn, ctx.node.name, self.name, cmds[0])
        for name, (data, _, _) in self.files(ctx, Layout(ctx)).items():
            conn.put(io.BytesIO(data), f"{self.staging(ctx)}/{name}")
        run_plan(conn, ctx, self.name, cmds[2:])

    def removal_for(self, ctx: StepContext) -> Cmd:
        layout = Layout(ctx)
        return self.removal(layout, not layout.quick)

    def removal(self, layout: Layout, root: bool) -> Cmd:
        systemd = (f"if {SYSTEMD}; then systemctl disable --now --quiet {SERVICE} 2>/dev/null; "
                   f"rm -f /etc/systemd/system/{SERVICE}.service; systemctl daemon-reload; fi; ") if root else ""
        return Cmd(f"{systemd}{stop_detached(layout)}; rm -f {q(layout.boot)} {q(layout.config)} {q(layout.state)}",
                   sudo=root, desc="autostop is off: no watcher")

    def check(self, conn: Any, ctx: StepContext) -> bool:
        """The watcher runs (or, autostop off, none is installed)."""
        layout = Layout(ctx)
        if not idle_seconds(ctx):
            return conn.run(f"test ! -e {q(layout.config)}", hide=True, warn=True).ok
        running = (f"if {SYSTEMD}; then systemctl is-active --quiet {SERVICE}; else p=$(cat {q(layout.pid)}) && "
                   f"grep -q autostop_watch /proc/$p/cmdline; fi")
        return conn.run(running, hide=True, warn=True).ok
