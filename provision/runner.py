"""The step runner behind `fab setup`: every step on every node, nodes in parallel.

Per node: connect (waiting for SSH); one command gathers the facts, reads the step markers and runs
every step's probe (provision/first_look.py); then for each step: skip it when it does not apply (and say why), leave it when its marker fingerprint
matches and its check passes, otherwise apply it and write the marker. A failed or unreachable
node is reported with its address, the failing step, the command and its output tail; the other
nodes finish; re-running completes the failed node.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from infra.cluster import ClusterInfo, NodeInfo
from provision.errors import NodeUnreachableError, ProvisionError, SshError, StepError
from provision.facts import GATHER_COMMAND, Facts, check_driver_sees_all, parse_facts
from provision.first_look import ProbeResult, first_look_command, parse_first_look
from provision.support import check_supported
from infra.ssh import known_hosts_path, open_connection, wait_for_ssh
from provision.steps import all_steps
from provision.steps.base import Cmd, Step, StepContext, command_line, run_cmd

logger = logging.getLogger(__name__)

SSH_WAIT_S = 300.0  # a fresh cloud VM takes 1-3 minutes to accept SSH
REBOOT_DOWN_S = 120.0  # how long a rebooting node may take to drop its SSH connection
REBOOT_UP_S = 900.0  # and to come back (a driver install's first boot can be slow)

CHANGED, UNCHANGED, SKIPPED, FAILED, PLANNED = "changed", "unchanged", "skipped", "failed", "planned"


@dataclass
class StepReport:
    step: str
    status: str
    detail: str = ""
    seconds: float = 0.0


@dataclass
class NodeReport:
    node: str
    address: str
    facts: Facts | None = None
    steps: list[StepReport] = field(default_factory=list)
    error: str = ""
    plan: list[tuple[str, list[Cmd]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def changed(self) -> list[str]:
        return [s.step for s in self.steps if s.status == CHANGED]


class NodeLog:
    """A per-node log file of every command run and its output."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            self.file.write(f"{time.strftime('%H:%M:%S')} {text.rstrip()}\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


class LoggedConnection:
    """Wraps a Fabric connection so every command and its output lands in the node log."""

    def __init__(self, conn: Any, log: NodeLog):
        self._conn, self._log = conn, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def run(self, command: str, **kwargs: Any) -> Any:
        self._log.write(f"$ {command}")
        result = self._conn.run(command, **kwargs)
        for stream in (result.stdout, result.stderr):
            if stream.strip():
                self._log.write(stream)
        self._log.write(f"exit {result.exited}")
        return result

    def put(self, local: str, remote: str) -> Any:
        self._log.write(f"sftp put {local} {remote}")
        return self._conn.put(local, remote)


def marker_dir(ctx: StepContext) -> str:
    return f"{ctx.workdir}/.gpuforge/markers"


def write_marker(conn: Any, ctx: StepContext, step: Step, fingerprint: str) -> None:
    record = json.dumps({"step": step.name, "fingerprint": fingerprint, "time": round(time.time())})
    path = shlex.quote(f"{marker_dir(ctx)}/{step.name}.json")
    run_cmd(conn, ctx.node.name, step.name, Cmd(f"mkdir -p {shlex.quote(marker_dir(ctx))} && echo {shlex.quote(record)} > {path}.tmp && mv {path}.tmp {path}"))


def clear_marker(conn: Any, ctx: StepContext, step: Step) -> None:
    conn.run(f"rm -f {shlex.quote(marker_dir(ctx))}/{step.name}.json", hide=True, warn=True)


def gather_facts(conn: Any) -> Facts:
    result = conn.run(GATHER_COMMAND, hide=True, warn=True)
    return parse_facts(result.stdout)


def first_look(conn: Any, ctx: StepContext, steps: list[Step]) -> tuple[Facts, dict[str, str], dict[str, ProbeResult]]:
    """Facts, markers and every step's probe result, in one command."""
    probes = {step.name: probe for step in steps if (probe := step.probe(ctx))}
    look = parse_first_look(conn.run(first_look_command(marker_dir(ctx), probes), hide=True, warn=True).stdout)
    return parse_facts(look.facts_output), look.markers, look.probes


class Runner:
    """Runs steps over a cluster; `on_event(node, step, status)` feeds the progress display."""

    def __init__(self, cluster: ClusterInfo, steps: list[Step] | None = None, options: dict[str, Any] | None = None,
                 log_dir: Path | None = None, ssh_wait: float = SSH_WAIT_S,
                 on_event: Callable[[str, str, str], None] | None = None,
                 validate_facts: Callable[[NodeInfo, Facts], None] | None = None):
        self.cluster, self.steps = cluster, steps if steps is not None else all_steps()
        self.options = options or {}
        self.log_dir = log_dir or Path(cluster.state_dir or ".") / "logs"
        self.ssh_wait, self.on_event = ssh_wait, on_event or (lambda node, step, status: None)
        self.validate_facts = validate_facts

    def run(self, dry_run: bool = False) -> list[NodeReport]:
        with ThreadPoolExecutor(max_workers=max(1, len(self.cluster.nodes))) as pool:
            return list(pool.map(lambda n: self.run_node(n, dry_run), self.cluster.nodes))

    def run_node(self, node: NodeInfo, dry_run: bool) -> NodeReport:
        report = NodeReport(node.name, node.address)
        log = NodeLog(self.log_dir / f"setup-{node.name}.log")
        log.write(f"=== setup {'(dry run) ' if dry_run else ''}of {node.name} ({node.address})")
        ctx = StepContext(self.cluster, node, options={**self.options, "reboot_hook": self.reboot_hook})
        conn, current = None, ""
        try:
            self.on_event(node.name, "ssh", "running")
            conn = LoggedConnection(wait_for_ssh(self.cluster, node, self.ssh_wait), log)
            self.on_event(node.name, "facts", "running")
            report.facts, markers, probed = first_look(conn, ctx, self.steps)
            ctx.facts = report.facts
            log.write(f"facts: {report.facts.summary()}")
            check_supported(report.facts)
            if self.validate_facts is not None:
                self.validate_facts(node, report.facts)
            for step in self.steps:
                current = step.name
                self.on_event(node.name, step.name, "running")
                report.steps.append(self.run_step(conn, ctx, step, markers, dry_run, report, probed))
                report.facts = ctx.facts  # a reboot re-gathers them: the driver is there now
                self.on_event(node.name, step.name, report.steps[-1].status)
        except StepError as exc:
            report.steps.append(StepReport(exc.step, FAILED, str(exc)))
            detail = str(exc).split(": ", 1)[1] if str(exc).startswith(f"{node.name}: ") else str(exc)
            report.error = f"{node.name} ({node.address}): {detail}"
        except (ProvisionError, SshError) as exc:
            report.error = str(exc) if node.name in str(exc) else f"{node.name} ({node.address}): {exc}"
        except Exception as exc:  # noqa: BLE001 - one node's surprise (a dropped connection) must not hide the others
            logger.debug("unexpected failure on %s", node.name, exc_info=True)
            what = f"step {current}: " if current else ""
            report.steps.append(StepReport(current or "ssh", FAILED, f"{type(exc).__name__}: {exc}"))
            report.error = f"{node.name} ({node.address}): {what}lost the node ({type(exc).__name__}: {exc or 'connection closed'})"
        finally:
            if report.error:
                log.write(f"FAILED: {report.error}")
                self.on_event(node.name, "", FAILED)
            if conn is not None:
                conn.close()
            log.close()
        return report

    def run_step(self, conn: Any, ctx: StepContext, step: Step, markers: dict[str, str], dry_run: bool,
                 report: NodeReport, probed: dict[str, ProbeResult] | None = None) -> StepReport:
        """`probed`: probe results from the node's first command, good until this run writes to the node."""
        probed = {} if probed is None else probed
        started = time.monotonic()
        reason = step.skip_reason(ctx)
        if reason:
            return StepReport(step.name, SKIPPED, reason)
        fingerprint = step.fingerprint(ctx)
        if markers.get(step.name) == fingerprint and check_step(conn, ctx, step, probed):
            return StepReport(step.name, UNCHANGED, "already in place", time.monotonic() - started)
        if dry_run:
            report.plan.append((step.name, step.plan(ctx)))
            return StepReport(step.name, PLANNED, "would run")
        if step.name in markers:
            probed.clear()  # the node changes from here on: later checks ask it again
            clear_marker(conn, ctx, step)  # a half-applied step must not look done if this run dies
        elif has_own_check(step) and check_step(conn, ctx, step, probed):
            write_marker(conn, ctx, step, fingerprint)  # right already: a Deep Learning AMI's driver, a baked image
            note = step.existing_note(ctx) or "already in place on this node"
            return StepReport(step.name, UNCHANGED, note, time.monotonic() - started)
        probed.clear()
        step.apply(conn, ctx)
        write_marker(conn, ctx, step, fingerprint)
        return StepReport(step.name, CHANGED, step.description, time.monotonic() - started)

    def reboot_hook(self, conn: Any, ctx: StepContext, cmd: Cmd) -> None:
        """Reboot a node and wait until SSH comes back, then carry on with a fresh connection."""
        node = ctx.node
        conn.run(command_line(conn, cmd), hide=True, warn=True, timeout=30)
        deadline = time.monotonic() + REBOOT_DOWN_S
        while time.monotonic() < deadline:  # wait for the old connection to drop
            try:
                if not conn.run("true", hide=True, warn=True, timeout=5).ok:
                    break
            except Exception:  # noqa: BLE001 - any failure here means the node went down
                break
            time.sleep(1)
        else:
            raise StepError(node.name, "reboot", cmd.run, None, f"the node did not go down within {REBOOT_DOWN_S:.0f} s")
        conn.close()
        inner = conn._conn if isinstance(conn, LoggedConnection) else conn
        try:
            reopen(inner, self.cluster, node, REBOOT_UP_S)  # the same object: the step's plan carries on with it
        except NodeUnreachableError as exc:
            raise StepError(node.name, "reboot", cmd.run, None, f"the node did not come back within {REBOOT_UP_S:.0f} s: {exc}") from exc
        ctx.facts = gather_facts(conn)  # what the node is after the boot: the new driver loaded, or not
        if ctx.facts.has_gpu:  # the boot loaded the driver: nvidia-smi must list every GPU on the bus now
            check_driver_sees_all(ctx.facts, require_driver=True)
        if self.validate_facts is not None:
            self.validate_facts(node, ctx.facts)


def has_own_check(step: Step) -> bool:
    """Steps that inspect the node itself (not only the marker) can recognise work done elsewhere."""
    return type(step).check is not Step.check or type(step).probe is not Step.probe


def check_step(conn: Any, ctx: StepContext, step: Step, probed: dict[str, ProbeResult]) -> bool:
    """The step's check, from its probe's result in the first command while that still holds."""
    if step.name in probed and type(step).check is Step.check:
        return step.judge(ctx, probed[step.name])
    return step.check(conn, ctx)


def reopen(conn: Any, cluster: ClusterInfo, node: NodeInfo, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            open_connection(conn, node, known_hosts_path(cluster))
            return
        except NodeUnreachableError:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
