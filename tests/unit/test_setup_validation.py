"""Setup stops on a cloud node whose GPUs differ from its instance type's catalog row."""

import pytest

from infra.cluster import ClusterInfo, NodeInfo
from provision.errors import ProvisionError
from provision.facts import Facts, Gpu
from provision.setup import catalog_validator


def cluster(cloud: str, instance_type: str) -> ClusterInfo:
    node = NodeInfo(name="node-0", rank=0, public_address="203.0.113.10", private_address="10.0.0.10",
                    instance_type=instance_type, gpu_count=8)
    return ClusterInfo(name="c", cloud=cloud, nodes=(node,))


def a100s(n: int) -> Facts:
    return Facts(os_id="ubuntu", os_version="22.04", gpus=tuple(Gpu(i, "NVIDIA A100-SXM4-40GB", 40960) for i in range(n)),
                 gpu_pci_count=n, driver_version="580.167.08")


def test_matching_gpus_pass():
    c = cluster("aws", "p4d.24xlarge")
    catalog_validator(c)(c.node(0), a100s(8))


def test_a_missing_gpu_stops_setup_naming_both_numbers():
    c = cluster("aws", "p4d.24xlarge")
    with pytest.raises(ProvisionError) as info:
        catalog_validator(c)(c.node(0), a100s(7))
    assert "7" in str(info.value) and "8" in str(info.value) and "p4d.24xlarge" in str(info.value)


def test_local_and_hosts_clusters_have_no_catalog_to_check():
    assert catalog_validator(cluster("local", "local")) is None
    assert catalog_validator(cluster("hosts", "")) is None
