"""Running a function on many nodes at once over SSH, each node's result or error kept apart."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from infra.cluster import ClusterInfo, NodeInfo
from workloads.runs import LaunchError


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
    """One LaunchError naming every node whose result is an error."""
    errors = [(n, r) for n, r in zip(nodes, results) if isinstance(r, Exception)]
    if errors:
        raise LaunchError("; ".join(f"{what} on {n.name} ({n.address}): {e}" for n, e in errors))
