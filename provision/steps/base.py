"""The step contract: every provisioning concern is a Step the runner drives on every node.

A step says whether it applies to a node (`skip_reason`), what its inputs are (`fingerprint`),
whether it is already done (`check`), and what it runs (`plan`: an ordered list of Cmd, which is
also what `fab setup --dry-run` prints). The runner (provision/runner.py) skips a step whose
marker fingerprint matches and whose check passes, runs `apply` otherwise, and writes the marker
only after success.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from provision.errors import StepError

if TYPE_CHECKING:
    from infra.cluster import ClusterInfo, NodeInfo
    from provision.facts import Facts


@dataclass(frozen=True)
class Cmd:
    """One shell command of a step's plan."""

    run: str
    """A shell command line (pipes, `&&`, redirects allowed): the whole of it runs as root when `sudo` is set."""
    sudo: bool = False
    """Run the whole line as root, through `root_command` (never a `sudo` prefix on the first word)."""
    desc: str = ""
    timeout: float | None = None
    reboot: bool = False
    """This command reboots the node; the runner waits for SSH to go down and come back."""
    env: tuple[tuple[str, str], ...] = ()
    """Environment variables set inside the command's shell (after sudo, which resets the environment)."""
    reboot_when: str = ""
    """For a reboot: only when the previous command printed this (an installer that asks for a reboot)."""


@dataclass
class StepContext:
    """What a step knows about the node it runs on."""

    cluster: ClusterInfo
    node: NodeInfo
    facts: Facts | None = None
    options: dict[str, Any] = field(default_factory=dict)
    """Run-wide inputs: the wheel to ship, the version matrix entry, --instance-type for plans."""

    @property
    def workdir(self) -> str:
        return self.node.workdir

    @property
    def venv(self) -> str:
        return f"{self.node.workdir}/venv"

    @property
    def python(self) -> str:
        return f"{self.venv}/bin/python"

    @property
    def shares_controller(self) -> bool:
        """A quick-mode local node: it sees this machine's files as the controller does and borrows the
        controller's Python packages. Every other node (a cloud VM, a machine of a hosts file, a VM-like local
        node) is a machine of its own and gets the full plan, whatever `cluster.cloud` says."""
        return node_mode(self.cluster) == CONTROLLER_MODE


CONTROLLER_MODE, MACHINE_MODE = "controller", "machine"


def node_mode(cluster: ClusterInfo) -> str:
    """What the cluster's nodes are: `controller` (quick local nodes) or `machine` (their own disk and packages).
    The local provider records it in `extra["node_mode"]`; records written before it existed are quick-mode
    when local."""
    mode = cluster.extra.get("node_mode")
    if mode in (CONTROLLER_MODE, MACHINE_MODE):
        return mode
    return CONTROLLER_MODE if cluster.cloud == "local" else MACHINE_MODE


def root_command(command: str, env: Mapping[str, str] | tuple[tuple[str, str], ...] = (), login_root: bool = False) -> str:
    """The one way gpuforge runs something as root: the whole command line inside `sh -c`, under `sudo -n`
    unless the login already is root, with `env` exported inside that shell (sudo resets the environment).

        >>> root_command("apt-get update && apt-get install -y x", {"DEBIAN_FRONTEND": "noninteractive"})
        "sudo -n sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get update && apt-get install -y x'"

    `sudo -n` fails at once with "a password is required" instead of waiting for a password nobody types."""
    pairs = env.items() if isinstance(env, Mapping) else env
    exports = " ".join(f"{key}={shlex.quote(str(value))}" for key, value in pairs)
    script = f"export {exports}; {command}" if exports else command
    shell = f"sh -c {shlex.quote(script)}"
    return shell if login_root else f"sudo -n {shell}"


def login_is_root(conn: Any) -> bool:
    return getattr(conn, "user", "") == "root"


def fingerprint_of(*parts: Any) -> str:
    """A short stable hash of a step's inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Step:
    """Base class: subclasses set `name`, `description`, and override `plan` (and usually `check`)."""

    name: str = ""
    description: str = ""
    gpu: bool = False
    """GPU steps are skipped, and said to be, on nodes without an NVIDIA GPU."""

    def skip_reason(self, ctx: StepContext) -> str | None:
        """Why this step does not apply to this node, or None when it does."""
        if self.gpu and ctx.facts is not None and not ctx.facts.has_gpu:
            return "no NVIDIA GPU on this node"
        return None

    def fingerprint(self, ctx: StepContext) -> str:
        """Hash of the inputs; a changed fingerprint re-runs the step."""
        return fingerprint_of(self.name, [c.run for c in self.plan(ctx)])

    def probe(self, ctx: StepContext) -> str | None:
        """A read-only command whose result decides `check` (through `judge`), or None. It may use the node's
        paths and the run's options, never its facts: the runner sends every step's probe in the node's first
        command, beside the facts, so that a re-run that finds everything in place costs one round trip."""
        return None

    def judge(self, ctx: StepContext, result: Any) -> bool:
        """`check` from the probe's result (`.ok`, `.stdout`): by default, the probe succeeded."""
        return result.ok

    def check(self, conn: Any, ctx: StepContext) -> bool:
        """Is the step's effect already in place on the node? Default: the probe's verdict, or, without a
        probe, trust the marker alone."""
        probe = self.probe(ctx)
        if probe is None:
            return True
        return self.judge(ctx, conn.run(probe, hide=True, warn=True))

    def existing_note(self, ctx: StepContext) -> str:
        """What the node already had, when `check` found the step's work done without a marker."""
        return ""

    def plan(self, ctx: StepContext) -> list[Cmd]:
        raise NotImplementedError(f"step {self.name} has no plan")

    def apply(self, conn: Any, ctx: StepContext) -> None:
        run_plan(conn, ctx, self.name, self.plan(ctx))


def command_line(conn: Any, cmd: Cmd) -> str:
    """What is sent to the node for `cmd`: root commands through root_command, others as they are
    (their env exported in front)."""
    if cmd.sudo:
        return root_command(cmd.run, cmd.env, login_root=login_is_root(conn))
    if cmd.env:
        exports = " ".join(f"{key}={shlex.quote(value)}" for key, value in cmd.env)
        return f"export {exports}; {cmd.run}"
    return cmd.run


SUDO_NEEDS_PASSWORD = "a password is required"


def run_cmd(conn: Any, node: str, step: str, cmd: Cmd) -> Any:
    """Run one Cmd; a non-zero exit raises StepError with the command and its output tail."""
    result = conn.run(command_line(conn, cmd), hide=True, warn=True, timeout=cmd.timeout, in_stream=False)
    if result.exited != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        if cmd.sudo and SUDO_NEEDS_PASSWORD in result.stderr:
            tail = (f"{tail}\nthe login user {getattr(conn, 'user', '?')} needs passwordless sudo for this step "
                    "(as cloud images give their default user)")
        raise StepError(node, step, cmd.run, result.exited, tail)
    return result


def run_plan(conn: Any, ctx: StepContext, step: str, cmds: list[Cmd]) -> None:
    """Run a plan's commands in order. Reboot commands are handled by the runner's reboot hook."""
    reboot = ctx.options.get("reboot_hook")
    said = ""
    for cmd in cmds:
        if cmd.reboot:
            if cmd.reboot_when and cmd.reboot_when not in said:
                continue
            if reboot is None:
                raise StepError(ctx.node.name, step, cmd.run, None, "a reboot is needed but no reboot hook is set")
            reboot(conn, ctx, cmd)
        else:
            result = run_cmd(conn, ctx.node.name, step, cmd)
            said = f"{result.stdout}\n{result.stderr}"
