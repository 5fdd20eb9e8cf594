"""What "ready" means after the cluster all-reduce: the NCCL backend on GPU nodes, the transport the instance
type should use (NCCL over EFA through aws-ofi-nccl on EFA types across nodes), and a bus bandwidth at least
READY_FRACTION of the type's reference (infra/catalog/allreduce.csv: the interconnect's published bandwidth,
one direction, with its source; NVLink within a node, the network across nodes).

    >>> judge(record, log, "aws", "p4d.24xlarge", nodes=2, gpus=True)   # doctest: +SKIP
    'all-reduce passed across 2 nodes (nccl over EFA, 16 ranks): busbw 44.1 GB/s at 256M >= 0.5 x 50 GB/s'
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from provision.errors import ProvisionError

REFERENCES = Path(__file__).resolve().parents[1] / "infra" / "catalog" / "allreduce.csv"
READY_FRACTION = 0.5  # nccl-tests reach ~0.8 of the link on healthy p4d/p5 at large messages; half is a broken link
# aws-ofi-nccl logs under NCCL_DEBUG=INFO: "NET/OFI Selected provider is efa, fabric is efa (found 4 nics)" (older
# plugins: "Selected Provider is efa"); NCCL's own socket transport: "NET/Socket : Using [0]ens5:...".
EFA_SELECTED = re.compile(r"NET/OFI Selected [Pp]rovider is efa\b")
SOCKET_USED = re.compile(r"NET/Socket : Using")
# What NCCL then runs on: "Using network Libfabric" (older: "AWS Libfabric"), or "Using network Socket" when the
# plugin failed after naming the provider ("aws-ofi-nccl initialization failed", aws/aws-ofi-nccl#889).
NETWORK_USED = re.compile(r"NCCL INFO Using network (.+?)\s*$", re.M)


@dataclass(frozen=True)
class Reference:
    busbw_gbps: float
    transport: str
    source: str


def reference(cloud: str, instance_type: str, scope: str) -> Reference | None:
    with open(REFERENCES, newline="") as f:
        for row in csv.DictReader(f):
            if (row["cloud"], row["instance_type"], row["scope"]) == (cloud, instance_type, scope):
                return Reference(float(row["busbw_gbps"]), row["transport"], row["source"])
    return None


def efa_used(log: str) -> bool:
    """NCCL ran over EFA: the plugin selected the efa provider, and NCCL's network is the plugin's (older NCCL
    names no network: then no fallback to its sockets)."""
    if not EFA_SELECTED.search(log):
        return False
    networks = NETWORK_USED.findall(log)
    return "Libfabric" in networks[-1] if networks else not SOCKET_USED.search(log)


def judge(record: dict, log: str, cloud: str, instance_type: str, nodes: int, gpus: bool, efa: bool = False) -> str:
    """The verdict line, or ProvisionError naming what is not ready."""
    backend, ranks = record.get("backend", ""), record.get("world_size", 0)
    where = f"across {nodes} nodes" if nodes > 1 else "on 1 node"
    if not gpus:
        return f"all-reduce passed {where} ({backend}, {ranks} ranks; CPU nodes: a connectivity check, no bandwidth goal)"
    if backend != "nccl":
        raise ProvisionError(f"the all-reduce ran over {backend or 'an unknown backend'}, not NCCL, on GPU nodes: "
                             "torch cannot use NCCL there (see the log above)")
    transport = "NVLink/PCIe" if nodes == 1 else "the network"
    if nodes > 1 and efa:
        if not efa_used(log):
            used = "NCCL's TCP sockets" if SOCKET_USED.search(log) else "no EFA"
            raise ProvisionError(f"{instance_type} has EFA, but NCCL used {used} across nodes (no "
                                 "'NET/OFI Selected provider is efa' in its NCCL_DEBUG=INFO log): check the efa step, "
                                 "the security group (all traffic inside the cluster) and /etc/gpuforge/nccl.env")
        transport = "EFA"
    results = record.get("results") or []
    largest = max(results, key=lambda r: r["bytes"]) if results else None
    ref = reference(cloud, instance_type, "inter" if nodes > 1 else "intra")
    if largest is None or ranks < 2:
        return f"all-reduce passed {where} (nccl over {transport}, {ranks} rank; one GPU: no bandwidth to judge)"
    if ref is None:
        return (f"all-reduce passed {where} (nccl over {transport}, {ranks} ranks): busbw {largest['busbw_gbps']:.1f} "
                f"GB/s at {largest['size']}; no reference for {instance_type} in {REFERENCES.name}, not judged")
    floor = READY_FRACTION * ref.busbw_gbps
    if largest["busbw_gbps"] < floor:
        raise ProvisionError(f"all-reduce bus bandwidth {largest['busbw_gbps']:.1f} GB/s at {largest['size']} is below "
                             f"{READY_FRACTION} x {ref.busbw_gbps:g} GB/s, the {instance_type} reference ({ref.source})")
    return (f"all-reduce passed {where} (nccl over {transport}, {ranks} ranks): busbw {largest['busbw_gbps']:.1f} GB/s "
            f"at {largest['size']} >= {READY_FRACTION} x {ref.busbw_gbps:g} GB/s")
