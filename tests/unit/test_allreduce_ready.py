"""When the cluster all-reduce means "ready" (regression, issue 8 defect 3: it could not fail on speed or transport,
`auto` could pick gloo on GPU nodes, and one node was "across 1 node(s)")."""

from __future__ import annotations

from pathlib import Path

import pytest

from provision.allreduce_ready import READY_FRACTION, judge, reference
from provision.errors import ProvisionError

LOGS = Path(__file__).parent / "fixtures" / "nccl"


def record(backend: str, ranks: int, busbw: float) -> dict:
    return {"backend": backend, "world_size": ranks,
            "results": [{"size": "1M", "bytes": 1 << 20, "busbw_gbps": 1.0},
                        {"size": "256M", "bytes": 256 << 20, "busbw_gbps": busbw}]}


def test_two_p4d_nodes_over_efa_at_link_speed_are_ready():
    verdict = judge(record("nccl", 16, 44.0), (LOGS / "efa.log").read_text(), "aws", "p4d.24xlarge", 2, True, efa=True)
    assert verdict.startswith("all-reduce passed across 2 nodes (nccl over EFA, 16 ranks): busbw 44.0 GB/s at 256M")


def test_efa_types_over_tcp_sockets_are_not_ready():
    with pytest.raises(ProvisionError, match="p4d.24xlarge has EFA, but NCCL used NCCL's TCP sockets across nodes"):
        judge(record("nccl", 16, 44.0), (LOGS / "socket.log").read_text(), "aws", "p4d.24xlarge", 2, True, efa=True)


def test_an_efa_provider_whose_plugin_then_failed_is_not_ready():
    """The plugin named the EFA provider, failed to initialise, and NCCL fell back to its sockets (as published in
    aws/aws-ofi-nccl#889): "Selected provider is efa" alone must not pass for EFA."""
    with pytest.raises(ProvisionError, match="p4d.24xlarge has EFA, but NCCL used NCCL's TCP sockets across nodes"):
        judge(record("nccl", 16, 44.0), (LOGS / "efa-plugin-failed.log").read_text(), "aws", "p4d.24xlarge", 2, True,
              efa=True)


def test_bandwidth_below_the_stated_fraction_of_the_reference_is_not_ready():
    ref = reference("aws", "p4d.24xlarge", "inter")
    assert ref.busbw_gbps == 50 and "EFA" in ref.source
    with pytest.raises(ProvisionError, match=rf"12.0 GB/s at 256M is below {READY_FRACTION} x 50 GB/s, the p4d.24xlarge "
                                             r"reference \(4 x 100 Gbps EFA"):
        judge(record("nccl", 16, 12.0), (LOGS / "efa.log").read_text(), "aws", "p4d.24xlarge", 2, True, efa=True)


def test_gloo_on_gpu_nodes_is_not_ready():
    with pytest.raises(ProvisionError, match="ran over gloo, not NCCL, on GPU nodes"):
        judge(record("gloo", 8, 300.0), "", "aws", "p4d.24xlarge", 1, True)


def test_one_node_is_judged_against_nvlink_and_said_to_be_one_node():
    verdict = judge(record("nccl", 8, 230.0), "", "aws", "p4d.24xlarge", 1, True)
    assert verdict.startswith("all-reduce passed on 1 node (nccl over NVLink/PCIe, 8 ranks)") and "x 300 GB/s" in verdict
    with pytest.raises(ProvisionError, match="below 0.5 x 300 GB/s"):
        judge(record("nccl", 8, 90.0), "", "aws", "p4d.24xlarge", 1, True)


def test_cpu_clusters_check_connectivity_only():
    assert "connectivity check" in judge(record("gloo", 2, 0.1), "", "local", "local", 2, False)
