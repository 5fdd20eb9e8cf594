"""The launcher: start a run on the cluster's nodes with torchrun, watch it, stop it, fetch it.

    spec = RunSpec(job="convnet-digits", nodes=2, run_id="digits-1", storage_url=cluster.storage_url)
    start_run(cluster, spec, home)      # detached: survives the SSH connection closing
    follow_run(cluster, "digits-1")     # rank 0's output until the run ends; returns its exit status

Every node gets a supervisor (workloads/supervise.py) that runs `torchrun` with static rendezvous
on rank 0's private address and the environment below, and keeps `status.json` in the node's run
folder. The run fails fast: a node whose process dies fails the run, and the others are stopped.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shlex
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from infra.cluster import ClusterInfo, NodeInfo
from workloads.errors import ConfigError
from workloads.runs import LaunchError, NodeStatus, RunStatus, load_record, record_nodes, save_record

logger = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DEFAULT_START_TIMEOUT_S = 900.0  # torch import + rendezvous + first step; a big model's first step can take minutes
DIST_TIMEOUT_S = 300  # GPUFORGE_DIST_TIMEOUT for the ranks: bounds a collective waiting on a dead peer
NCCL_ENV_FILE = "/etc/gpuforge/nccl.env"  # written by the efa step (provision/versions.py)
FETCH_SKIP = re.compile(r"^(step-\d+|nodes)/")  # checkpoints stay in storage unless asked for


@dataclass(kw_only=True)
class RunSpec:
    job: str = ""
    script: str = ""
    """A user's training script: its directory is shipped to every node and run under torchrun."""
    args: list[str] = field(default_factory=list)
    """key=value overrides for a job, or the script's own arguments."""
    nodes: int = 0
    """0 means every node of the cluster."""
    nproc_per_node: int = 0
    """0 means the node's GPU count, or 1 on CPU."""
    run_id: str = ""
    storage_url: str = ""
    start_timeout: float = DEFAULT_START_TIMEOUT_S
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if bool(self.job) == bool(self.script):
            raise ConfigError("give exactly one of --job NAME or --script PATH")
        if self.nodes < 0:
            raise ConfigError(f"--nodes must be >= 1; got {self.nodes}")
        if self.nproc_per_node < 0:
            raise ConfigError(f"--nproc-per-node must be >= 1; got {self.nproc_per_node}")
        if not self.run_id:
            self.run_id = f"{self.job or Path(self.script).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not RUN_ID.match(self.run_id):
            raise ConfigError(f"run id {self.run_id!r} must be letters, digits, '.', '_' or '-' (at most 100)")


# -- validation and planning (no side effects) ----------------------------------------------------


def validate_spec(cluster: ClusterInfo, spec: RunSpec) -> list[NodeInfo]:
    """Everything that can be wrong with the request, before anything is started: the nodes used."""
    if spec.nodes > len(cluster.nodes):
        raise ConfigError(f"--nodes {spec.nodes} is more than cluster {cluster.name} has ({len(cluster.nodes)})")
    if spec.job:
        from workloads.config import apply_overrides
        from workloads.jobs import get_job

        cfg = apply_overrides(get_job(spec.job), spec.args)
        if cfg.framework == "tensorflow" and spec.nproc_per_node > 1:
            raise ConfigError(f"{spec.job} is a TensorFlow job: one worker per node (MultiWorkerMirroredStrategy "
                              "uses every GPU of its node); drop --nproc-per-node")
        if cfg.job == "convnet-digits-student" and not cfg.teacher:
            raise ConfigError("convnet-digits-student needs teacher=RUN_ID (a finished convnet-digits run)")
    else:
        path = Path(spec.script)
        if not path.is_file():
            raise ConfigError(f"--script {spec.script}: no such file")
    if not spec.storage_url:
        raise ConfigError(f"cluster {cluster.name} has no storage URL; set one (hosts file `storage:`) to run jobs")
    return list(cluster.nodes[: spec.nodes or len(cluster.nodes)])


def procs_per_node(spec: RunSpec, node: NodeInfo) -> int:
    if is_tensorflow_job(spec):
        return 1
    return spec.nproc_per_node or max(1, node.gpu_count)


def is_tensorflow_job(spec: RunSpec) -> bool:
    """A job whose model trains with TensorFlow (workloads/tf_trainer.py): it needs TF_CONFIG."""
    if not spec.job:
        return False
    from workloads.config import apply_overrides
    from workloads.jobs import get_job

    return apply_overrides(get_job(spec.job), spec.args).framework == "tensorflow"


def run_dir(node: NodeInfo, run_id: str) -> str:
    return f"{node.workdir}/runs/{run_id}"


def run_env(cluster: ClusterInfo, spec: RunSpec, nodes: list[NodeInfo], node: NodeInfo, port: int,
            worker_ports: list[int] | None = None) -> dict[str, str]:
    """The environment of every training process (DESIGN.md), with SkyPilot and dstack aliases."""
    ips = "\n".join(n.private_address for n in nodes)
    nproc = procs_per_node(spec, node)
    gpus = str(node.gpu_count)
    env = {
        "MASTER_ADDR": nodes[0].private_address, "MASTER_PORT": str(port), "NODE_RANK": str(node.rank),
        "NNODES": str(len(nodes)), "NPROC_PER_NODE": str(nproc),
        "GPUFORGE_RUN_ID": spec.run_id, "GPUFORGE_STORAGE": f"{spec.storage_url.rstrip('/')}/runs/{spec.run_id}",
        "GPUFORGE_RUN_DIR": run_dir(node, spec.run_id), "GPUFORGE_NODE": node.name,
        "GPUFORGE_DIST_TIMEOUT": str(DIST_TIMEOUT_S), "PYTHONUNBUFFERED": "1",
        "SKYPILOT_NODE_RANK": str(node.rank), "SKYPILOT_NODE_IPS": ips, "SKYPILOT_NUM_NODES": str(len(nodes)),
        "SKYPILOT_NUM_GPUS_PER_NODE": gpus,
        "DSTACK_NODE_RANK": str(node.rank), "DSTACK_MASTER_NODE_IP": nodes[0].private_address,
        "DSTACK_NODES_IPS": ips, "DSTACK_NODES_NUM": str(len(nodes)), "DSTACK_GPUS_PER_NODE": gpus,
    }
    if cluster.cloud == "local":  # all nodes share this machine's cores: don't oversubscribe them
        total = sum(procs_per_node(spec, n) for n in nodes)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // total))
    if worker_ports:  # a TensorFlow job: MultiWorkerMirroredStrategy finds its peers in TF_CONFIG
        from workloads.tf_trainer import tf_config

        env["TF_CONFIG"] = tf_config([n.private_address for n in nodes], worker_ports, nodes.index(node))
    env.update(spec.env)
    return env


def node_command(spec: RunSpec, nodes: list[NodeInfo], node: NodeInfo, port: int) -> tuple[list[str], str]:
    """torchrun for one node (static rendezvous on rank 0's private address) and its working dir."""
    python = f"{node.workdir}/venv/bin/python"
    torchrun = [python, "-m", "torch.distributed.run", f"--nnodes={len(nodes)}",
                f"--nproc-per-node={procs_per_node(spec, node)}", f"--node-rank={node.rank}",
                f"--master-addr={nodes[0].private_address}", f"--master-port={port}", "--max-restarts=0"]
    if spec.job:
        return [*torchrun, "-m", "workloads.train", "--job", spec.job, "--run-id", spec.run_id,
                "--storage", spec.storage_url, *spec.args], run_dir(node, spec.run_id)
    code = f"{run_dir(node, spec.run_id)}/code"
    return [*torchrun, f"{code}/{Path(spec.script).name}", *spec.args], code


def script_archive(script: Path) -> bytes:
    """The script's directory as a tar.gz (no VCS folders, caches or virtualenvs)."""
    skip = {".git", "__pycache__", ".venv", "venv", ".mypy_cache", ".pytest_cache"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        root = script.resolve().parent
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and not skip.intersection(rel.parts):
                tar.add(path, arcname=str(rel))
    return buf.getvalue()


# -- talking to the nodes ----------------------------------------------------------------------


def on_nodes(cluster: ClusterInfo, nodes: list[NodeInfo], fn: Callable[[Any, NodeInfo], Any]) -> list[Any]:
    """fn(connection, node) on every node in parallel; exceptions come back in place of results."""
    from infra.ssh import connect

    def one(node: NodeInfo) -> Any:
        try:
            conn = connect(cluster, node)
        except Exception as exc:  # noqa: BLE001 - returned, so one node cannot hide the others
            return exc
        try:
            return fn(conn, node)
        except Exception as exc:  # noqa: BLE001
            return exc
        finally:
            conn.close()

    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        return list(pool.map(one, nodes))


def raise_first(results: list[Any], nodes: list[NodeInfo], what: str) -> None:
    errors = [(n, r) for n, r in zip(nodes, results) if isinstance(r, Exception)]
    if errors:
        raise LaunchError("; ".join(f"{what} on {n.name} ({n.address}): {e}" for n, e in errors))


def check_ready(conn: Any, node: NodeInfo) -> None:
    python = f"{node.workdir}/venv/bin/python"
    if not conn.run(f"test -x {shlex.quote(python)}", hide=True, warn=True).ok:
        raise LaunchError(f"node is not set up ({python} is missing); run `fab setup` first")


def check_tensorflow(conn: Any, node: NodeInfo) -> None:
    probe = f"ls -d {shlex.quote(node.workdir)}/venv/lib/python3*/site-packages/tensorflow >/dev/null 2>&1"
    if not conn.run(probe, hide=True, warn=True).ok:
        raise LaunchError("the node has no TensorFlow in its environment; run `fab setup --tensorflow` first")


def pick_port(conn: Any, node: NodeInfo) -> int:
    probe = f"import socket; s = socket.socket(); s.bind(({node.private_address!r}, 0)); print(s.getsockname()[1])"
    result = conn.run(f"{shlex.quote(node.workdir + '/venv/bin/python')} -c {shlex.quote(probe)}", hide=True)
    return int(result.stdout.strip())


def pick_worker_ports(cluster: ClusterInfo, nodes: list[NodeInfo], taken: set[int]) -> list[int]:
    """A free port per node for TensorFlow's workers, all different (local nodes share one port space)."""
    ports: list[int] = []
    for node in nodes:
        for _ in range(20):
            port = on_nodes(cluster, [node], pick_port)[0]
            raise_first([port], [node], "choosing a TensorFlow worker port")
            if port not in taken:
                break
        taken.add(port)
        ports.append(port)
    return ports


def start_run(cluster: ClusterInfo, spec: RunSpec, home: Path) -> list[NodeInfo]:
    """Validate, then start the run's supervisor on every node; returns the nodes used."""
    nodes = validate_spec(cluster, spec)
    try:
        load_record(home, cluster, spec.run_id)
        raise ConfigError(f"run {spec.run_id} already exists on cluster {cluster.name}; pick another --run-id")
    except LaunchError:
        pass
    raise_first(on_nodes(cluster, nodes, check_ready), nodes, "checking the node")
    if is_tensorflow_job(spec):
        raise_first(on_nodes(cluster, nodes, check_tensorflow), nodes, "checking the node")
    port = on_nodes(cluster, nodes[:1], pick_port)[0]
    raise_first([port], nodes[:1], "choosing the master port")
    worker_ports = pick_worker_ports(cluster, nodes, {port}) if is_tensorflow_job(spec) else None
    archive = script_archive(Path(spec.script)) if spec.script else None
    save_record(home, cluster, spec, nodes, port)

    def start(conn: Any, node: NodeInfo) -> None:
        directory = run_dir(node, spec.run_id)
        command, cwd = node_command(spec, nodes, node, port)
        conn.run(f"mkdir -p {shlex.quote(directory)}", hide=True)
        if archive is not None:
            conn.run(f"mkdir -p {shlex.quote(cwd)}", hide=True)
            conn.put(io.BytesIO(archive), f"{directory}/code.tar.gz")
            conn.run(f"tar -xzf {shlex.quote(directory)}/code.tar.gz -C {shlex.quote(cwd)}", hide=True)
        run_spec = {"run_id": spec.run_id, "node": node.name, "node_rank": node.rank, "nnodes": len(nodes),
                    "command": command, "cwd": cwd, "env": run_env(cluster, spec, nodes, node, port, worker_ports),
                    "storage_url": spec.storage_url, "env_file": NCCL_ENV_FILE,
                    "start_timeout": spec.start_timeout if spec.job else 0}
        conn.put(io.BytesIO(json.dumps(run_spec, indent=1).encode()), f"{directory}/run.json")
        python = shlex.quote(f"{node.workdir}/venv/bin/python")
        d = shlex.quote(directory)
        # The redirections apply to the whole background group, so nothing holds the SSH channel open.
        conn.run(f"(cd {d} && exec setsid nohup {python} -m workloads.supervise --run-dir {d}) "
                 f"> {d}/supervisor.out 2>&1 < /dev/null &", hide=True, pty=False)

    results = on_nodes(cluster, nodes, start)
    if any(isinstance(r, Exception) for r in results):
        cancel_run(cluster, home, spec.run_id)  # never leave half a run behind
        raise_first(results, nodes, "starting the run")
    return nodes


STATUS_PROBE = 'cat {d}/status.json 2>/dev/null || echo "{{}}"; echo; echo "#progress"; cat {d}/progress.json 2>/dev/null'


def node_status(conn: Any, node: NodeInfo, run_id: str) -> NodeStatus:
    d = shlex.quote(run_dir(node, run_id))
    out = conn.run(STATUS_PROBE.format(d=d), hide=True, warn=True).stdout
    status_text, _, progress_text = out.partition("#progress")
    status = json.loads(status_text.strip() or "{}")
    progress = json.loads(progress_text.strip() or "{}")
    return NodeStatus(node=node.name, rank=node.rank, state=status.get("state", "not started"),
                      reason=status.get("reason", ""), exit_code=status.get("exit_code"), step=progress.get("step"),
                      total_steps=progress.get("total_steps"), loss=progress.get("loss"), tail=status.get("tail", ""),
                      ended=status.get("ended"), secondary=bool(status.get("secondary")))


def run_status(cluster: ClusterInfo, home: Path, run_id: str | None = None, enforce: bool = True) -> RunStatus:
    """Every node's state; with `enforce`, a failed run's still-running nodes are stopped (fail-fast)."""
    record = load_record(home, cluster, run_id)
    run_id = record["spec"]["run_id"]
    nodes = record_nodes(cluster, record)
    results = on_nodes(cluster, nodes, lambda c, n: node_status(c, n, run_id))
    statuses = [r if not isinstance(r, Exception) else NodeStatus(n.name, n.rank, "unreachable", str(r))
                for n, r in zip(nodes, results)]
    status = RunStatus(run_id, statuses)
    if enforce and status.state == "failed" and any(n.state == "running" for n in statuses):
        cancel_run(cluster, home, run_id)
        return run_status(cluster, home, run_id, enforce=False)
    return status


def cancel_run(cluster: ClusterInfo, home: Path, run_id: str | None = None) -> list[str]:
    """Stop the run's process groups on every node (the supervisor forwards SIGTERM, then SIGKILL)."""
    record = load_record(home, cluster, run_id)
    run_id = record["spec"]["run_id"]
    nodes = record_nodes(cluster, record)
    script = (
        "d={d}; [ -f $d/status.json ] || exit 0; "
        "sup=$(sed -n 's/.*\"supervisor_pid\": *\\([0-9]*\\).*/\\1/p' $d/status.json); "
        "pg=$(sed -n 's/.*\"pgid\": *\\([0-9]*\\).*/\\1/p' $d/status.json); "
        "[ -n \"$sup\" ] && kill -TERM $sup 2>/dev/null; "
        "for i in $(seq 1 60); do [ -n \"$sup\" ] && kill -0 $sup 2>/dev/null || break; sleep 0.25; done; "
        "[ -n \"$pg\" ] && kill -KILL -$pg 2>/dev/null; true"
    )
    results = on_nodes(cluster, nodes, lambda c, n: c.run(script.format(d=shlex.quote(run_dir(n, run_id))), hide=True, warn=True))
    return [f"{n.name}: {'cancel sent' if not isinstance(r, Exception) else r}" for n, r in zip(nodes, results)]


def read_log(conn: Any, node: NodeInfo, run_id: str, offset: int = 0, tail_lines: int = 0) -> tuple[str, int]:
    path = shlex.quote(f"{run_dir(node, run_id)}/output.log")
    if tail_lines:
        return conn.run(f"tail -n {tail_lines} {path} 2>/dev/null", hide=True, warn=True).stdout, 0
    out = conn.run(f"tail -c +{offset + 1} {path} 2>/dev/null", hide=True, warn=True).stdout
    return out, offset + len(out.encode())


def logs(cluster: ClusterInfo, home: Path, run_id: str | None = None, node: str | None = None, tail_lines: int = 0) -> dict[str, str]:
    record = load_record(home, cluster, run_id)
    nodes = record_nodes(cluster, record)
    if node is not None:
        nodes = [cluster.node(node)]
    results = on_nodes(cluster, nodes, lambda c, n: read_log(c, n, record["spec"]["run_id"], tail_lines=tail_lines)[0])
    return {n.name: (r if not isinstance(r, Exception) else f"<unreachable: {r}>") for n, r in zip(nodes, results)}


def follow_run(cluster: ClusterInfo, home: Path, run_id: str | None = None, out: Callable[[str], None] = print,
               poll: float = 1.0, timeout: float | None = None) -> RunStatus:
    """Stream rank 0's output until the run ends (stopping the others on a failure); the final status."""
    from infra.ssh import connect

    record = load_record(home, cluster, run_id)
    run_id = record["spec"]["run_id"]
    head = record_nodes(cluster, record)[0]
    conn = connect(cluster, head)
    offset, deadline = 0, time.monotonic() + timeout if timeout else None
    try:
        while True:
            text, offset = read_log(conn, head, run_id, offset)
            if text:
                out(text.rstrip("\n"))
            status = run_status(cluster, home, run_id)
            if status.state != "running":
                text, offset = read_log(conn, head, run_id, offset)
                if text:
                    out(text.rstrip("\n"))
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchError(f"run {run_id} still running after {timeout:.0f} s")
            time.sleep(poll)
    finally:
        conn.close()


def fetch_run(cluster: ClusterInfo, home: Path, run_id: str | None, dest: Path, checkpoints: bool = False) -> list[Path]:
    """Copy the run's summary, metrics, config and model files from storage to `dest/<run id>/`."""
    from workloads.storage import open_store

    record = load_record(home, cluster, run_id)
    run_id = record["spec"]["run_id"]
    store = open_store(record["spec"]["storage_url"]).child("runs", run_id)
    keys = [k for k in store.list() if checkpoints or not FETCH_SKIP.match(k)]
    if not keys:
        raise LaunchError(f"run {run_id} has nothing in {store.url} yet")
    target = Path(dest) / run_id
    copied = []
    for key in keys:
        path = target / key
        path.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(key, path)
        copied.append(path)
    return copied


def exec_on_nodes(cluster: ClusterInfo, command: str, nodes: list[NodeInfo] | None = None) -> list[tuple[NodeInfo, Any]]:
    """Run a shell command on every node (in its work directory); results in rank order."""
    nodes = nodes or list(cluster.nodes)

    def run(conn: Any, node: NodeInfo) -> Any:
        return conn.run(f"cd {shlex.quote(node.workdir)} 2>/dev/null; {command}", hide=True, warn=True, pty=False)

    return list(zip(nodes, on_nodes(cluster, nodes, run)))
