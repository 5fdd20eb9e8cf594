"""Recovery of a run: when a node is lost, bring the cluster back to its size, set it up, and restart the run
from its last complete checkpoint, at most N times.

    status = follow_with_recovery(cluster, home, "digits-1", recover=3)   # what `fab train --recover 3` runs

The controller is this process: the user's `gpuforge train --recover N`, which follows the run. Nothing of
ours runs elsewhere to do it; while this process is not running (the laptop asleep), a lost node still stops
the run (fail-fast), and nothing recovers it until `gpuforge train --resume --run-id ID --recover N`.

What is recovered (diagnose()):
- a node unreachable over SSH (the machine is gone: terminated, powered off, its network lost);
- a node whose supervisor vanished without saying how the run ended ("dead": the node rebooted);
- a node preempted (its metadata gave notice; the run saved a checkpoint and stopped, workloads/preempt.py);
- ranks that failed only because a peer went away (gloo/NCCL's peer-loss errors, workloads/failures.py).
What is not: a rank that failed on its own (its error is not a peer loss) while its peers were healthy: the
user's code fails the same way when run again.

Bringing the cluster back (bring_back()): a local node is restarted (its sshd and "disk" as they were, as a
rebooted machine); a cloud cluster's stack is brought up again, which replaces a lost instance in its zone; when that
zone has no capacity for it, the whole cluster moves to the next zone that offers the type (every node replaced
there: placement and subnet hold one zone; provision/cloud_clusters.py up_in_zones); machines of a hosts file are waited for.
Then `setup_cluster` (idempotent: only a new node does work) and `start_run(resume)`: our jobs continue from
their newest complete checkpoint. Each recovery is recorded in the run's record (workloads/runs.py) with
its cause, node, steps lost and the seconds of each phase; `gpuforge status` shows them.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from infra.cluster import ClusterInfo
from provision import inventory
from provision.errors import ProvisionError
from workloads.control import follow_run, run_status, stop_run
from workloads.launch import resume_spec, start_run
from workloads.remote import on_nodes
from workloads.runs import LOST, LaunchError, RunStatus, add_recovery, load_record, record_nodes
from workloads.task import MAX_RECOVERY

logger = logging.getLogger(__name__)

MAX_RECOVER = MAX_RECOVERY  # --recover's ceiling, as a task's `recovery:` (workloads/task.py)
HOST_WAIT_S = 600.0  # a machine of a hosts file that went away: how long to wait for it to answer SSH again
CHECKPOINT = re.compile(r"^step-(\d+)/manifest\.json$")


@dataclass
class Loss:
    kind: str
    """preempted, unreachable, dead or peer-loss."""
    nodes: list[str]
    why: str


def diagnose(status: RunStatus) -> Loss | None:
    """Why the run ended, when a recovery can help; None when the run itself failed (or ended well)."""
    lost = [n for n in status.nodes if n.state in LOST]
    if lost:
        return Loss(lost[0].state, [n.node for n in lost], "; ".join(f"{n.node} {n.state}: {n.reason}" for n in lost))
    preempted = [n for n in status.nodes if n.state == "preempted"]
    if preempted:
        noticed = [n for n in preempted if "a peer had the notice" not in n.reason] or preempted
        return Loss("preempted", [n.node for n in noticed], "; ".join(f"{n.node}: {n.reason}" for n in noticed))
    failed = [n for n in status.nodes if n.state == "failed"]
    if failed and all(n.secondary for n in failed):
        return Loss("peer-loss", [n.node for n in failed], "; ".join(f"{n.node}: {n.reason}" for n in failed))
    return None


def unreachable_nodes(cluster: ClusterInfo) -> list[int]:
    results = on_nodes(cluster, list(cluster.nodes), lambda c, n: c.run("true", hide=True, timeout=20))
    return [n.rank for n, r in zip(cluster.nodes, results) if isinstance(r, Exception)]


def bring_back(cluster: ClusterInfo, home: Path, out: Callable[[str], None]) -> ClusterInfo:
    """The cluster at its size again, every node answering SSH; the (maybe new) cluster record."""
    down = unreachable_nodes(cluster)
    if cluster.cloud == "local":
        from infra.local import restart_node

        for rank in down:
            out(f"restarting {cluster.node(rank).name}")
            restart_node(cluster, rank)
        return cluster
    if cluster.cloud in ("aws", "gcp"):
        from infra.stacks import refresh_stack
        from provision.cloud_clusters import up_cloud

        out(f"bringing the {cluster.cloud} stack up again (replaces lost instances)")
        refresh_stack(cluster.name, inventory.cluster_dir(home, cluster.name), on_output=lambda line: None)
        up_cloud(home, cluster.cloud, cluster.name, {}, yes=True, may_move=True)
        return inventory.resolve(home, cluster.name)
    deadline = time.monotonic() + HOST_WAIT_S
    while down:
        if time.monotonic() > deadline:
            names = ", ".join(cluster.node(r).name for r in down)
            raise ProvisionError(f"{names} of hosts cluster {cluster.name} did not come back within {HOST_WAIT_S:.0f} s")
        time.sleep(5)
        down = unreachable_nodes(cluster)
    return cluster


def latest_checkpoint(storage_url: str, run_id: str) -> int | None:
    """The newest step with a checkpoint manifest in the run's storage (what a resumed job continues from)."""
    from workloads.storage import open_store

    steps = [int(m.group(1)) for key in open_store(storage_url).child("runs", run_id).list() if (m := CHECKPOINT.match(key))]
    return max(steps) if steps else None


def stop_what_is_left(cluster: ClusterInfo, home: Path, run_id: str) -> None:
    """Nothing of the ended attempt may keep running on the nodes that still answer."""
    record = load_record(home, cluster, run_id)
    stop_run(cluster, record_nodes(cluster, record), run_id, why="the run is being recovered")


def recover_once(cluster: ClusterInfo, home: Path, run_id: str, status: RunStatus, loss: Loss,
                 out: Callable[[str], None], secrets: dict[str, str] | None = None) -> ClusterInfo:
    """One recovery: cluster back, setup, restart from the last complete checkpoint; recorded in the run."""
    from provision.setup import raise_for_failures, setup_cluster

    detected = time.time()
    lost_at = min((n.ended for n in status.nodes if n.ended), default=detected)
    stop_what_is_left(cluster, home, run_id)
    cluster = bring_back(cluster, home, out)
    back = time.time()
    out("setting up the nodes again (only a new node has work)")
    raise_for_failures(setup_cluster(cluster, home))
    set_up = time.time()
    spec = resume_spec(home, cluster, run_id)
    from_step = latest_checkpoint(spec.storage_url, run_id) if spec.job else None
    reached = max((n.step for n in status.nodes if n.step is not None), default=None)
    start_run(cluster, spec, home, secrets)
    restarted = time.time()
    steps_lost = reached - (from_step or 0) if reached is not None and spec.job else None
    add_recovery(home, cluster, run_id, {
        "time": detected, "kind": loss.kind, "nodes": loss.nodes, "why": loss.why, "reached_step": reached,
        "resumed_from_step": from_step, "steps_lost": steps_lost,
        "seconds": {"detection": round(detected - lost_at, 2), "node_back": round(back - detected, 2),
                    "setup": round(set_up - back, 2), "restart": round(restarted - set_up, 2)}})
    where = f"from step {from_step}" if from_step is not None else "from the start" if spec.job else "again"
    out(f"restarted run {run_id} {where}" + (f" ({steps_lost} step(s) lost)" if steps_lost is not None else ""))
    return cluster


def follow_until_end(cluster: ClusterInfo, home: Path, run_id: str, out: Callable[[str], None], poll: float,
                     timeout: float | None) -> RunStatus:
    """follow_run, going on when the node it streams from (rank 0's) is lost: the run's state then comes from
    the other nodes, until they end too (their ranks fail on the lost peer; the supervisors stop them)."""
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        left = None if deadline is None else max(1.0, deadline - time.monotonic())
        try:
            return follow_run(cluster, home, run_id, out=out, poll=poll, timeout=left)
        except LaunchError:
            raise  # the timeout
        except Exception as exc:  # noqa: BLE001 - the head node's connection failed: is the run still going?
            status = run_status(cluster, home, run_id)
            if status.state != "running":
                return status
            logger.info("following run %s: %s; waiting for the other nodes", run_id, exc)
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchError(f"run {run_id} still running after {timeout:.0f} s") from exc
            time.sleep(poll)


def follow_with_recovery(cluster: ClusterInfo, home: Path, run_id: str, recover: int,
                         out: Callable[[str], None] = print, secrets: dict[str, str] | None = None,
                         poll: float = 1.0, timeout: float | None = None) -> RunStatus:
    """Follow the run; after a loss diagnose() accepts, recover it, at most `recover` times; the final status."""
    used = 0
    while True:
        status = follow_until_end(cluster, home, run_id, out, poll, timeout)
        if status.state in ("succeeded", "cancelled"):
            return status
        loss = diagnose(status)
        if loss is None:
            out(f"run {run_id} {status.state} on its own (not a lost node): not recovered")
            return status
        if used >= recover:
            out(f"run {run_id} lost {', '.join(loss.nodes)} ({loss.kind}); all {recover} recoveries used")
            return status
        used += 1
        out(f"recovery {used}/{recover} of run {run_id}: {loss.kind}: {loss.why}")
        cluster = recover_once(cluster, home, run_id, status, loss, out, secrets)
