"""The cluster-wide check that ends `fab setup` on GPU clusters: an all-reduce across every node
(torch.distributed, NCCL on GPUs, gloo on CPUs), printing bus bandwidth per message size.

A cluster is ready only when this passes. It runs `provision.allreduce` under torchrun on every
node at once, rank 0's private address as master, bounded in time like any launch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from infra.cluster import ClusterInfo, NodeInfo
from provision.errors import ProvisionError
from provision.steps.base import StepContext
from provision.allreduce_ready import judge
from provision.steps.gpu import allreduce_command

logger = logging.getLogger(__name__)

ALLREDUCE_TIMEOUT_S = 600  # torch import, rendezvous and the sizes; a hung NCCL init must not hang setup
CPU_SIZES = "64K,1M"  # gloo on CPUs: a connectivity check, not a bandwidth benchmark


@dataclass
class AllreduceResult:
    backend: str
    world_size: int
    rows: list[dict[str, Any]]
    table: str
    verdict: str = ""
    """What passed, by provision/allreduce_ready.py's rules (backend, transport, bandwidth against the reference)."""


def run_allreduce(cluster: ClusterInfo, nodes: list[NodeInfo], gpus: bool, options: dict[str, Any],
                  sizes: str | None = None, iters: int = 20) -> AllreduceResult:
    """Start the all-reduce on every node together; raise ProvisionError naming the nodes that failed."""
    from provision.allreduce import parse_allreduce_output
    from workloads.launch import on_nodes, pick_port

    sizes = sizes or ("1M,16M,256M" if gpus else CPU_SIZES)
    port = on_nodes(cluster, nodes[:1], pick_port)[0]
    if isinstance(port, Exception):
        raise ProvisionError(f"all-reduce check: cannot pick a port on {nodes[0].name}: {port}")

    def one(conn: Any, node: NodeInfo) -> Any:
        ctx = StepContext(cluster, node, options=options)
        nproc = max(1, node.gpu_count) if gpus else 1
        command = allreduce_command(ctx, len(nodes), node.rank, nodes[0].private_address, port, nproc, sizes, iters,
                                    backend="nccl" if gpus else "gloo", nccl_debug=gpus)
        return conn.run(command, hide=True, warn=True, timeout=ALLREDUCE_TIMEOUT_S)

    results = on_nodes(cluster, nodes, one)
    failed = [(n, r) for n, r in zip(nodes, results) if isinstance(r, Exception) or r.exited != 0]
    if failed:
        details = "; ".join(f"{n.name} ({n.address}): " + (str(r) if isinstance(r, Exception) else
                            "\n".join((r.stdout + r.stderr).strip().splitlines()[-5:])) for n, r in failed)
        raise ProvisionError(f"all-reduce check across {len(nodes)} nodes failed: {details}")
    head = results[0].stdout
    parsed = parse_allreduce_output(head)
    table = "\n".join(line for line in head.splitlines() if not line.startswith("{") and "NCCL INFO" not in line)
    verdict = judge(parsed, head + results[0].stderr, options.get("cloud") or cluster.cloud,
                    options.get("instance_type") or nodes[0].instance_type, len(nodes), gpus, efa=efa_type(cluster, nodes))
    return AllreduceResult(parsed.get("backend", ""), parsed.get("world_size", 0), parsed.get("results", []), table, verdict)


def efa_type(cluster: ClusterInfo, nodes: list[NodeInfo]) -> bool:
    """The nodes' instance type has EFA interfaces (the catalog says so)."""
    if cluster.cloud not in ("aws", "gcp"):
        return False
    from infra.catalog import find_instance
    from infra.errors import CatalogError

    try:
        return find_instance(cluster.cloud, nodes[0].instance_type).efa_interfaces > 0
    except CatalogError:
        return False
