"""A task on a cluster: what can be checked here first, the task's `setup:` on every node, its run.

    task, workdir = load_task("task.yaml")
    prepared = prepare_task(task, workdir)           # secrets read, workdir collected: refusals before anything
    run_task_setup(cluster, nodes, prepared, out=print)   # once per node, again only when it changed
    start_run(cluster, task_run_spec(prepared, cluster), home, prepared.secrets, prepared.bundle)

`provision/cli/task_tasks.py` (`gpuforge launch`) drives these around creating and setting up the cluster.
"""

from __future__ import annotations

import hashlib
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from infra.cluster import ClusterInfo, NodeInfo
from workloads.launch import RunSpec, venv_of
from workloads.remote import on_nodes
from workloads.runs import LaunchError
from workloads.secretfile import Redactor, put_secret_file, resolve_secrets
from workloads.ship import DEFAULT_LIMIT_MB, Bundle, code_dir, collect_workdir, ship_bundle
from workloads.task import Task

# Files whose change means the dependencies changed: `setup:` runs again when one of them does.
REQUIREMENT_FILES = ("requirements", "pyproject.toml", "setup.py", "setup.cfg", "environment.yml", "environment.yaml",
                     "uv.lock", "poetry.lock", "Pipfile", "Pipfile.lock", "constraints")
SETUP_TIMEOUT_S = 3600  # a big `pip install` on a fresh node takes minutes; an hour is a hung one


@dataclass
class PreparedTask:
    task: Task
    workdir: Path
    bundle: Bundle
    secrets: dict[str, str]

    @property
    def redactor(self) -> Redactor:
        return Redactor(self.secrets.values())


def prepare_task(task: Task, workdir: Path, ship_limit_mb: float = 0.0) -> PreparedTask:
    """Everything about the task that is checked on this machine: its secrets and its workdir."""
    secrets = resolve_secrets(task.secrets)
    bundle = collect_workdir(workdir, ship_limit_mb or DEFAULT_LIMIT_MB)
    return PreparedTask(task, workdir, bundle, secrets)


def setup_fingerprint(prepared: PreparedTask) -> str:
    """The setup's text and the workdir's requirement files: what decides whether it runs again."""
    h = hashlib.sha256(prepared.task.setup.encode() + b"\0")
    for rel, _ in prepared.bundle.files:
        name = rel.rsplit("/", 1)[-1]
        if rel.count("/") <= 1 and name.startswith(REQUIREMENT_FILES):
            h.update(rel.encode() + b"\0" + (prepared.bundle.root / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


class NodeOutput:
    """A Fabric out_stream: whole lines, secrets masked, prefixed by the node, to `out` and a log file."""

    def __init__(self, node: str, out: Callable[[str], None], redactor: Redactor, log: Path | None):
        self.node, self.out, self.redactor = node, out, redactor
        self.buffer = ""
        self.lock = threading.Lock()
        self.log = open(log, "a") if log else None
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        with self.lock:
            self.buffer += text
            *lines, self.buffer = self.buffer.split("\n")
            for line in lines:
                self.emit(line)

    def emit(self, line: str) -> None:
        line = self.redactor.text(line.rstrip("\r"))
        self.lines = [*self.lines[-19:], line]
        self.out(f"[{self.node}] {line}")
        if self.log:
            self.log.write(line + "\n")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        with self.lock:
            if self.buffer:
                self.emit(self.buffer)
                self.buffer = ""
        if self.log:
            self.log.close()


def run_task_setup(cluster: ClusterInfo, nodes: list[NodeInfo], prepared: PreparedTask, out: Callable[[str], None] = print,
                   log_dir: Path | None = None) -> list[str]:
    """Ship the code and run the task's `setup:` on every node where it has not run as it is now;
    one line per node ("ran in 12.3 s" / "unchanged"). A failure names the node and its last lines."""
    ship_bundle(cluster, nodes, prepared.bundle)
    task = prepared.task
    if not task.setup.strip():
        return [f"{n.name}: no setup" for n in nodes]
    fingerprint = setup_fingerprint(prepared)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)

    def setup(conn: Any, node: NodeInfo) -> str:
        import time

        marker = f"{venv_of(node)}/gpuforge-setup/{task.name}"
        done = conn.run(f"cat {shlex.quote(marker)} 2>/dev/null", hide=True, warn=True).stdout.strip()
        if done == fingerprint:
            return f"{node.name}: setup unchanged"
        cwd = code_dir(node.workdir, prepared.bundle.digest)
        env_file = f"{node.workdir}/.gpuforge/setup-env-{task.name}.json"
        put_secret_file(conn, env_file, {**task.envs, **prepared.secrets})
        stream = NodeOutput(node.name, out, prepared.redactor, log_dir / f"setup-{task.name}-{node.name}.log" if log_dir else None)
        started = time.monotonic()
        python = shlex.quote(f"{venv_of(node)}/bin/python")
        try:
            result = conn.run(f"{python} -m workloads.task_exec --env-file {shlex.quote(env_file)} --cwd {shlex.quote(cwd)} "
                              f"-- bash -e -c {shlex.quote(task.setup)}", hide=True, warn=True, pty=False,
                              out_stream=stream, err_stream=stream, timeout=SETUP_TIMEOUT_S)
        finally:
            stream.close()
            conn.run(f"rm -f {shlex.quote(env_file)}", hide=True, warn=True)
        if result.exited != 0:
            last = "\n".join(stream.lines[-10:])
            raise LaunchError(f"setup of task {task.name} failed with exit code {result.exited}:\n{last}")
        conn.run(f"mkdir -p {shlex.quote(str(Path(marker).parent))} && echo {fingerprint} > {shlex.quote(marker)}", hide=True)
        return f"{node.name}: setup ran in {time.monotonic() - started:.1f} s"

    results = on_nodes(cluster, nodes, setup)
    errors = [(n, r) for n, r in zip(nodes, results) if isinstance(r, Exception)]
    if errors:
        raise LaunchError("; ".join(f"{n.name} ({n.address}): {e}" for n, e in errors))
    return results


def task_run_spec(prepared: PreparedTask, cluster: ClusterInfo, run_id: str = "", resume: bool = False,
                  nodes: int = 0) -> RunSpec:
    """The RunSpec of a task on a cluster: its `run:` command or `script:` under torchrun."""
    task = prepared.task
    return RunSpec(command=task.run if not task.script else "", script=task.script, args=list(task.args),
                   workdir=str(prepared.workdir), nodes=nodes or task.nodes, nproc_per_node=task.nproc_per_node,
                   run_id=run_id, storage_url=cluster.storage_url, start_timeout=task.start_timeout,
                   env=dict(task.envs), secrets=sorted(prepared.secrets), task=task.name, resume=resume,
                   outputs=task.outputs.model_dump() if task.outputs else None)
