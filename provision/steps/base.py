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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from provision.errors import StepError

if TYPE_CHECKING:
    from infra.cluster import ClusterInfo, NodeInfo
    from provision.facts import Facts


@dataclass(frozen=True)
class Cmd:
    """One shell command of a step's plan."""

    run: str
    sudo: bool = False
    desc: str = ""
    timeout: float | None = None
    reboot: bool = False
    """This command reboots the node; the runner waits for SSH to go down and come back."""


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
    def is_local(self) -> bool:
        return self.cluster.cloud == "local"


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

    def check(self, conn: Any, ctx: StepContext) -> bool:
        """Is the step's effect already in place on the node? Default: trust the marker alone."""
        return True

    def existing_note(self, ctx: StepContext) -> str:
        """What the node already had, when `check` found the step's work done without a marker."""
        return ""

    def plan(self, ctx: StepContext) -> list[Cmd]:
        raise NotImplementedError(f"step {self.name} has no plan")

    def apply(self, conn: Any, ctx: StepContext) -> None:
        run_plan(conn, ctx, self.name, self.plan(ctx))


def run_cmd(conn: Any, node: str, step: str, cmd: Cmd) -> Any:
    """Run one Cmd; a non-zero exit raises StepError with the command and its output tail."""
    runner = conn.sudo if cmd.sudo else conn.run
    result = runner(cmd.run, hide=True, warn=True, timeout=cmd.timeout, in_stream=False)
    if result.exited != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise StepError(node, step, cmd.run, result.exited, tail)
    return result


def run_plan(conn: Any, ctx: StepContext, step: str, cmds: list[Cmd]) -> None:
    """Run a plan's commands in order. Reboot commands are handled by the runner's reboot hook."""
    reboot = ctx.options.get("reboot_hook")
    for cmd in cmds:
        if cmd.reboot:
            if reboot is None:
                raise StepError(ctx.node.name, step, cmd.run, None, "a reboot is needed but no reboot hook is set")
            reboot(conn, ctx, cmd)
        else:
            run_cmd(conn, ctx.node.name, step, cmd)
