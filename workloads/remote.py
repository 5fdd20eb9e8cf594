"""Running a function on many nodes at once over SSH, each node's result or error kept apart.

    with Connections(cluster) as pool:               # one SSH handshake per node for everything below
        on_nodes(cluster, nodes, check, pool)
        on_nodes(cluster, nodes, start, pool)

Without a pool, each call connects and closes on its own.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from infra.cluster import ClusterInfo, NodeInfo
from workloads.runs import LaunchError


class Connections:
    """Open connections to a cluster's nodes, made on first use and kept until `close`."""

    def __init__(self, cluster: ClusterInfo):
        self.cluster = cluster
        self.open: dict[str, Any] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()

    def get(self, node: NodeInfo) -> Any:
        from infra.ssh import connect

        with self.lock:
            node_lock = self.locks.setdefault(node.name, threading.Lock())
        with node_lock:  # two threads asking for one node share one handshake
            if node.name not in self.open:
                self.open[node.name] = connect(self.cluster, node)
            return self.open[node.name]

    def drop(self, node: NodeInfo) -> None:
        """Forget a node's connection (after it failed): the next use connects again."""
        conn = self.open.pop(node.name, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for conn in self.open.values():
            conn.close()
        self.open.clear()

    def __enter__(self) -> Connections:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def on_nodes(cluster: ClusterInfo, nodes: list[NodeInfo], fn: Callable[[Any, NodeInfo], Any],
             pool: Connections | None = None) -> list[Any]:
    """fn(connection, node) on every node in parallel; exceptions come back in place of results. With a `pool`,
    its connections are used (and kept open); otherwise each node's is opened and closed here."""
    from infra.ssh import connect

    def one(node: NodeInfo) -> Any:
        try:
            conn = pool.get(node) if pool is not None else connect(cluster, node)
        except Exception as exc:  # noqa: BLE001 - returned, so one node cannot hide the others
            return exc
        try:
            return fn(conn, node)
        except Exception as exc:  # noqa: BLE001
            transport = getattr(conn, "transport", None)
            if pool is not None and not (transport and transport.is_active()):
                pool.drop(node)  # the connection itself went: the next call reconnects
            return exc
        finally:
            if pool is None:
                conn.close()

    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool_threads:
        return list(pool_threads.map(one, nodes))


def raise_first(results: list[Any], nodes: list[NodeInfo], what: str) -> None:
    """One LaunchError naming every node whose result is an error."""
    errors = [(n, r) for n, r in zip(nodes, results) if isinstance(r, Exception)]
    if errors:
        raise LaunchError("; ".join(f"{what} on {n.name} ({n.address}): {e}" for n, e in errors))
