"""A run of ours keeps the whole cluster up, not only its own nodes (autostop: "a node is idle when no run of ours
is active on the cluster"), with no control plane.

    port = pick_alive_port(cluster, nodes, taken={master_port})    # the launcher, before the supervisors start
    AliveListener(address, port).start()                           # rank 0's supervisor, for the run's life
    write_marks(cluster, nodes, run_id, nodes[0].private_address, port)   # the launcher, after they started

Rank 0's supervisor listens on `alive_port` (it accepts and closes; nothing is read or written) for as long as it
lives. The launcher writes a mark on every node of the cluster that is not in the run
(`<workdir>/cluster-runs/<run id>.json`: the run and that address). A node's autostop watcher
(provision/data/autostop_watch.py) counts a mark as a run of ours while the address answers a TCP connect, and
for `mark_grace_s` after it last did (or after the mark was written: the supervisor is starting). So the mark
lives exactly as long as the run's supervisor, plus a bounded grace: the run's end, its head node's loss, a
crashed launcher or a lost controller all end it within that grace, and the watcher then deletes the mark and
the node's own idle clock decides. It fails toward stopping: a mark that cannot be checked keeps nobody up.
"""

from __future__ import annotations

import io
import json
import logging
import shlex
import socket
import threading
from typing import Any

from infra.cluster import ClusterInfo, NodeInfo
from workloads.remote import on_nodes

logger = logging.getLogger(__name__)

MARKS_DIR = "cluster-runs"  # under a node's workdir, beside runs/ (the watcher derives it from its runs_dir)


def marks_dir(node: NodeInfo) -> str:
    return f"{node.workdir}/{MARKS_DIR}"


def pick_alive_port(cluster: ClusterInfo, head: NodeInfo, taken: set[int], pool: Any = None) -> int:
    """A free port on the run's head node for its supervisor's liveness listener (not one the run uses)."""
    from workloads.launch import pick_port
    from workloads.remote import raise_first

    for _ in range(20):
        port = on_nodes(cluster, [head], pick_port, pool)[0]
        raise_first([port], [head], "choosing the liveness port")
        if port not in taken:
            return port
    raise RuntimeError(f"no free port on {head.name} besides {sorted(taken)}")


def write_marks(cluster: ClusterInfo, run_nodes: list[NodeInfo], run_id: str, address: str, port: int) -> None:
    """The mark on every node of the cluster outside the run; a node that does not answer (stopped) is skipped:
    a stopped node needs no mark, and `up` of it again finds the run's head by its own watcher's look."""
    inside = {n.rank for n in run_nodes}
    others = [n for n in cluster.nodes if n.rank not in inside]
    if not others:
        return
    mark = json.dumps({"run_id": run_id, "head": [address, port]}).encode()

    def put(conn: Any, node: NodeInfo) -> None:
        conn.run(f"mkdir -p {shlex.quote(marks_dir(node))}", hide=True)
        conn.put(io.BytesIO(mark), f"{marks_dir(node)}/{run_id}.json")

    for node, result in zip(others, on_nodes(cluster, others, put)):
        if isinstance(result, Exception):
            logger.info("no cluster mark of run %s on %s: %s", run_id, node.name, result)


class AliveListener(threading.Thread):
    """Accepts and closes connections on (address, port) until the process ends: the run is alive."""

    def __init__(self, address: str, port: int):
        super().__init__(daemon=True, name="alive-listener")
        self.sock = socket.create_server((address, port), backlog=16)

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()
