"""The launcher: start a run on the cluster's nodes, under torchrun or as the task's own command.

    spec = RunSpec(job="convnet-digits", nodes=2, run_id="digits-1", storage_url=cluster.storage_url)
    start_run(cluster, spec, home)      # detached: survives the SSH connection closing
    follow_run(cluster, home, "digits-1")   # rank 0's output until the run ends; returns its status

A run is one of: a job of ours (`job`), a user's script we start under torchrun (`script`, in the
shipped `workdir`), or a shell command run on every node as it is (`command`: the task's `run:`,
which calls torchrun, `accelerate launch` or plain python itself). Every node gets a supervisor
(workloads/supervise.py) that starts it with the environment below and keeps `status.json` in the
node's run folder. The run fails fast: a node whose process dies fails the run, the others are
stopped, and the run says which rank failed, where, with what exit code and error.

`resume=True` starts an ended run again under the same id (attempt N+1): our jobs continue from
their newest complete checkpoint; a script or command sees the same GPUFORGE_RUN_ID and outputs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shlex
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from infra.cluster import ClusterInfo, NodeInfo
from workloads.control import (busy_runs, cancel_run, exec_on_nodes, fetch_run, follow_run, logs, node_status,
                               read_log, run_dir, run_status, stop_run)
from workloads.cluster_marks import pick_alive_port, write_marks
from workloads.errors import ConfigError
from workloads.remote import Connections, on_nodes, raise_first
from workloads.runs import LaunchError, find_record, load_record, save_record

logger = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DEFAULT_START_TIMEOUT_S = 900.0  # torch import + rendezvous + first step; a big model's first step can take minutes
DIST_TIMEOUT_S = 300  # GPUFORGE_DIST_TIMEOUT for the ranks: bounds a collective waiting on a dead peer
NCCL_ENV_FILE = "/etc/gpuforge/nccl.env"  # written by the efa step (provision/versions.py)
PREEMPTIBLE_ENV = "GPUFORGE_PREEMPTIBLE"  # workloads/notice.py: "1" when the nodes' supervisors watch for a notice
METADATA_URL_ENV = "GPUFORGE_METADATA_URL"  # tests and emulators: the preemption watcher's metadata service


@dataclass(kw_only=True)
class RunSpec:
    job: str = ""
    script: str = ""
    """A user's script, relative to `workdir` (or a path, whose folder is then the workdir)."""
    command: str = ""
    """A shell command run on every node as it is (a task's `run:`)."""
    args: list[str] = field(default_factory=list)
    """key=value overrides for a job, or the script's own arguments."""
    workdir: str = ""
    """The folder shipped to every node for a script or command (see workloads/ship.py)."""
    nodes: int = 0
    """0 means every node of the cluster."""
    nproc_per_node: int = 0
    """0 means the node's GPU count, or 1 on CPU."""
    run_id: str = ""
    storage_url: str = ""
    start_timeout: float = DEFAULT_START_TIMEOUT_S
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    """Names only: the values travel in a 0600 file, never in a spec, record or command line."""
    outputs: dict[str, Any] | None = None
    """{"path": folder relative to the run's working dir, "every": seconds}: synced to <run>/outputs/."""
    task: str = ""
    """The task's name, when the run comes from a task file."""
    resume: bool = False
    ship_limit_mb: float = 0.0
    """0: the default limit of workloads/ship.py."""

    def __post_init__(self) -> None:
        if sum(map(bool, (self.job, self.script, self.command))) != 1:
            raise ConfigError("give exactly one of --job NAME or --script PATH (or a task with `run:`)")
        if self.nodes < 0:
            raise ConfigError(f"--nodes must be >= 1; got {self.nodes}")
        if self.nproc_per_node < 0:
            raise ConfigError(f"--nproc-per-node must be >= 1; got {self.nproc_per_node}")
        if self.script and not self.workdir:
            path = Path(self.script).expanduser()
            self.workdir, self.script = str(path.resolve().parent) if path.exists() else "", path.name if path.exists() else self.script
        if not self.run_id:
            stem = self.task or self.job or Path(self.script).stem
            self.run_id = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not RUN_ID.match(self.run_id):
            raise ConfigError(f"run id {self.run_id!r} must be letters, digits, '.', '_' or '-' (at most 100)")

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RunSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record["spec"].items() if k in known})


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
    elif spec.script:
        path = Path(spec.workdir or ".") / spec.script
        if path.is_dir():
            raise ConfigError(f"--script {spec.script} is a folder; give the script file in it")
        if not spec.workdir or not path.is_file():
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


def metadata_override() -> tuple[str, str] | None:
    """(cloud, URL) of METADATA_URL_ENV (`aws=URL` or `gcp=URL`: a stand-in of that cloud's metadata service), if set."""
    override = os.environ.get(METADATA_URL_ENV, "")
    if not override:
        return None
    cloud, _, url = override.partition("=")
    if cloud not in ("aws", "gcp") or not url.startswith("http"):
        raise ConfigError(f"{METADATA_URL_ENV}={override!r}: give aws=URL or gcp=URL")
    return cloud, url


def preemption_watch(cluster: ClusterInfo) -> dict[str, str] | None:
    """What each node's supervisor watches for a preemption notice (workloads/preempt.py): the cloud's metadata
    service on spot/preemptible nodes; METADATA_URL_ENV (`aws=URL` or `gcp=URL`) points it at a stand-in, read
    every second (the real AWS service every 5 s, as AWS advises)."""
    override = metadata_override()
    if override:
        cloud, url = override
        return {"cloud": cloud, "url": url, "poll_s": 1.0}
    if cluster.cloud in ("aws", "gcp") and cluster.extra.get("spot"):
        return {"cloud": cluster.cloud}
    return None


def venv_of(node: NodeInfo) -> str:
    return f"{node.workdir}/venv"


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
    if preemption_watch(cluster):  # the trainer's ranks check for a notice only where one can come
        env[PREEMPTIBLE_ENV] = "1"
    if spec.outputs:
        env["GPUFORGE_OUTPUTS"] = f"{working_dir(spec, node)}/{spec.outputs['path']}"
    if cluster.cloud == "local":  # all nodes share this machine's cores: don't oversubscribe them
        total = sum(procs_per_node(spec, n) for n in nodes)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // total))
    if worker_ports:  # a TensorFlow job: MultiWorkerMirroredStrategy finds its peers in TF_CONFIG
        from workloads.tf_trainer import tf_config

        env["TF_CONFIG"] = tf_config([n.private_address for n in nodes], worker_ports, nodes.index(node))
    env.update(spec.env)
    return env


def working_dir(spec: RunSpec, node: NodeInfo) -> str:
    """Where the run's process starts: its copy of the shipped code, or the run folder for our jobs."""
    return run_dir(node, spec.run_id) + ("/code" if spec.workdir else "")


def node_command(spec: RunSpec, nodes: list[NodeInfo], node: NodeInfo, port: int) -> tuple[list[str], str]:
    """The node's command (torchrun with static rendezvous on rank 0's private address, or the task's
    shell command) and its working dir."""
    cwd = working_dir(spec, node)
    if spec.command:
        return ["bash", "-e", "-c", spec.command], cwd
    torchrun = [f"{venv_of(node)}/bin/python", "-m", "workloads.agent",  # torchrun, minus its exit-barrier race
                f"--nnodes={len(nodes)}",
                f"--nproc-per-node={procs_per_node(spec, node)}", f"--node-rank={node.rank}",
                f"--master-addr={nodes[0].private_address}", f"--master-port={port}", "--max-restarts=0"]
    if spec.job:
        return [*torchrun, "-m", "workloads.train", "--job", spec.job, "--run-id", spec.run_id,
                "--storage", spec.storage_url, *spec.args], cwd
    return [*torchrun, f"{cwd}/{spec.script}", *spec.args], cwd


# -- talking to the nodes ----------------------------------------------------------------------


def check_ready(conn: Any, node: NodeInfo) -> None:
    python = f"{venv_of(node)}/bin/python"
    if not conn.run(f"test -x {shlex.quote(python)}", hide=True, warn=True).ok:
        raise LaunchError(f"node is not set up ({python} is missing); run `gpuforge setup` first")


def check_tensorflow(conn: Any, node: NodeInfo) -> None:
    probe = f"ls -d {shlex.quote(node.workdir)}/venv/lib/python3*/site-packages/tensorflow >/dev/null 2>&1"
    if not conn.run(probe, hide=True, warn=True).ok:
        raise LaunchError("the node has no TensorFlow in its environment; run `gpuforge setup --tensorflow` first")


def pick_port(conn: Any, node: NodeInfo) -> int:
    probe = f"import socket; s = socket.socket(); s.bind(({node.private_address!r}, 0)); print(s.getsockname()[1])"
    # -S -I: no site-packages (a venv's .pth files cost tens of ms), nothing from the environment; socket is stdlib
    result = conn.run(f"{shlex.quote(venv_of(node) + '/bin/python')} -S -I -c {shlex.quote(probe)}", hide=True)
    return int(result.stdout.strip())


def pick_worker_ports(cluster: ClusterInfo, nodes: list[NodeInfo], taken: set[int],
                      pool: Connections | None = None) -> list[int]:
    """A free port per node for TensorFlow's workers, all different (local nodes share one port space)."""
    ports: list[int] = []
    for node in nodes:
        for _ in range(20):
            port = on_nodes(cluster, [node], pick_port, pool)[0]
            raise_first([port], [node], "choosing a TensorFlow worker port")
            if port not in taken:
                break
        taken.add(port)
        ports.append(port)
    return ports


def check_run_id(home: Path, cluster: ClusterInfo, spec: RunSpec) -> int:
    """The attempt this start is: 1 for a new run, N+1 when resuming; refusals name what to do."""
    record = find_record(home, cluster, spec.run_id)
    if record is None:
        if spec.resume:
            from workloads.control import known_run_ids

            known = ", ".join(known_run_ids(home, cluster)[-10:]) or "none"
            raise ConfigError(f"--resume: no run {spec.run_id!r} on cluster {cluster.name} to resume; runs: {known}")
        return 1
    if not spec.resume:
        raise ConfigError(f"run {spec.run_id} already exists on cluster {cluster.name}; add --resume to continue it "
                          "(from its newest complete checkpoint), or pick another --run-id")
    old = RunSpec.from_record(record)
    if (old.job, Path(old.script).name, bool(old.command)) != (spec.job, Path(spec.script).name, bool(spec.command)):
        raise ConfigError(f"--resume: run {spec.run_id} ran {old.job or old.script or 'a task command'}; "
                          "resume it with the same job, script or task")
    state = run_status(cluster, home, spec.run_id, enforce=False).state
    if state == "running":
        raise ConfigError(f"run {spec.run_id} is still running; `gpuforge cancel {spec.run_id}` first to restart it")
    return int(record.get("attempt", 1)) + 1


def check_not_busy(cluster: ClusterInfo, nodes: list[NodeInfo], pool: Connections | None = None) -> None:
    busy = busy_runs(cluster, nodes, pool)
    if busy:
        what = "; ".join(f"run {rid} on {', '.join(names)}" for rid, names in sorted(busy.items()))
        raise ConfigError(f"the nodes are busy: {what} is running; wait for it (`gpuforge logs --follow`), "
                          "or stop it with `gpuforge cancel`")


def start_run(cluster: ClusterInfo, spec: RunSpec, home: Path, secrets: dict[str, str] | None = None,
              bundle: Any = None) -> list[NodeInfo]:
    """Validate, ship the code, then start the run's supervisor on every node; returns the nodes used.

    `secrets` are the values of `spec.secrets` (see workloads/secretfile.py); `bundle` is the workdir
    already collected (workloads/ship.py), else it is collected here."""
    from workloads.ship import DEFAULT_LIMIT_MB, collect_workdir, ship_bundle

    nodes = validate_spec(cluster, spec)
    secrets = secrets or {}
    missing = sorted(set(spec.secrets) - set(secrets))
    if missing:
        raise ConfigError(f"secret(s) {', '.join(missing)} have no value")
    if spec.workdir and bundle is None:
        bundle = collect_workdir(Path(spec.workdir), spec.ship_limit_mb or DEFAULT_LIMIT_MB)
    attempt = check_run_id(home, cluster, spec)
    with Connections(cluster) as pool:  # one SSH handshake per node for the whole start
        raise_first(on_nodes(cluster, nodes, check_ready, pool), nodes, "checking the node")
        if is_tensorflow_job(spec):
            raise_first(on_nodes(cluster, nodes, check_tensorflow, pool), nodes, "checking the node")
        check_not_busy(cluster, nodes, pool)
        port = on_nodes(cluster, nodes[:1], pick_port, pool)[0]
        raise_first([port], nodes[:1], "choosing the master port")
        worker_ports = pick_worker_ports(cluster, nodes, {port}, pool) if is_tensorflow_job(spec) else None
        alive_port = pick_alive_port(cluster, nodes[0], {port, *(worker_ports or [])}, pool) \
            if len(nodes) < len(cluster.nodes) else 0
        if bundle is not None:
            ship_bundle(cluster, nodes, bundle, pool)
        save_record(home, cluster, spec, nodes, port, attempt)
        results = on_nodes(cluster, nodes, lambda conn, node: start_node(conn, node, cluster, spec, nodes, port, attempt,
                                                                       worker_ports, bundle, secrets, alive_port), pool)
        if any(isinstance(r, Exception) for r in results):
            stop_run(cluster, nodes, spec.run_id, pool, why="the run did not start on every node")  # never half a run
            raise_first(results, nodes, "starting the run")
    if alive_port:  # the nodes outside the run stay up while it is active (workloads/cluster_marks.py)
        write_marks(cluster, nodes, spec.run_id, nodes[0].private_address, alive_port)
    return nodes


def start_node(conn: Any, node: NodeInfo, cluster: ClusterInfo, spec: RunSpec, nodes: list[NodeInfo], port: int,
               attempt: int, worker_ports: list[int] | None, bundle: Any, secrets: dict[str, str],
               alive_port: int = 0) -> None:
    """The run's folder on one node (the earlier attempt's log kept, the shipped code copied in), its run.json
    and secrets, then its supervisor, detached."""
    from workloads.secretfile import put_secret_file
    from workloads.ship import code_dir

    directory = run_dir(node, spec.run_id)
    d = shlex.quote(directory)
    command, cwd = node_command(spec, nodes, node, port)
    prepare = f"mkdir -p {d}"
    if attempt > 1:  # keep the earlier attempt's log; its state must not look like this one's
        prepare = (f"(cd {d} && (test -f output.log && mv output.log output.{attempt - 1}.log; "
                   f"rm -rf status.json progress.json code secrets.json)); {prepare}")
    if bundle is not None:
        prepare += (f" && cp -a {shlex.quote(code_dir(node.workdir, bundle.digest))} {shlex.quote(cwd)} "
                    f"&& rm -f {shlex.quote(cwd)}/.gpuforge-complete")
    conn.run(prepare, hide=True)
    run_spec = {"run_id": spec.run_id, "node": node.name, "node_rank": node.rank, "nnodes": len(nodes),
                "command": command, "cwd": cwd, "env": run_env(cluster, spec, nodes, node, port, worker_ports),
                "venv": venv_of(node), "storage_url": spec.storage_url, "env_file": NCCL_ENV_FILE,
                "start_timeout": spec.start_timeout if spec.job else 0, "attempt": attempt,
                "outputs": spec.outputs, "secrets_file": f"{directory}/secrets.json" if secrets else "",
                "preemption": preemption_watch(cluster), "alive_port": alive_port}
    conn.put(io.BytesIO(json.dumps(run_spec, indent=1).encode()), f"{directory}/run.json")
    if secrets:
        put_secret_file(conn, f"{directory}/secrets.json", secrets)
    python = shlex.quote(f"{venv_of(node)}/bin/python")
    # The redirections apply to the whole background group, so nothing holds the SSH channel open.
    conn.run(f"(cd {d} && exec setsid nohup {python} -m workloads.supervise --run-dir {d}) "
             f"> {d}/supervisor.out 2>&1 < /dev/null &", hide=True, pty=False)


def resume_spec(home: Path, cluster: ClusterInfo, run_id: str) -> RunSpec:
    """The recorded spec of a run, marked to resume (what `fab train --resume --run-id ID` starts)."""
    record = load_record(home, cluster, run_id)
    spec = RunSpec.from_record(record)
    spec.resume = True
    return spec


__all__ = ["RunSpec", "start_run", "resume_spec", "validate_spec", "node_command", "run_env", "on_nodes",
           "raise_first", "pick_port", "follow_run", "run_status", "cancel_run", "fetch_run", "logs", "read_log",
           "exec_on_nodes", "node_status", "busy_runs", "LaunchError"]
