"""Cluster resolution: names, hosts files, stack output JSON; every bad entry a clear error."""

import json

import pytest

from infra.cluster import ClusterInfo, NodeInfo
from provision import inventory
from provision.errors import InventoryError


def write(tmp_path, text, name="lab.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_hosts_file_becomes_a_cluster(tmp_path):
    key = tmp_path / "id"
    key.write_text("x")
    path = write(tmp_path, f"""
name: lab
user: ubuntu
key: {key}
storage: s3://team-bucket
hosts:
  - address: 203.0.113.10
    private_address: 10.0.0.10
    gpus: 8
  - address: gpu2.example.com
    port: 2222
    user: admin
""")
    cluster = inventory.load_hosts_file(path)
    assert cluster.name == "lab" and cluster.cloud == "hosts" and cluster.storage_url == "s3://team-bucket"
    a, b = cluster.nodes
    assert (a.public_address, a.private_address, a.gpu_count, a.user, a.key_path) == ("203.0.113.10", "10.0.0.10", 8, "ubuntu", str(key))
    assert (b.private_address, b.ssh_port, b.user, b.rank) == ("gpu2.example.com", 2222, "admin", 1)


@pytest.mark.parametrize(
    "text, message",
    [
        ("hosts: []", "needs a non-empty `hosts:` list"),
        ("hosts:\n  - port: 22", "hosts[0]: each host needs `address:`"),
        ("hosts:\n  - address: 10.0.0.1\n  - address: 'bad host!'", "hosts[1]: address 'bad host!' is neither"),
        ("hosts:\n  - address: 10.0.0.1\n    port: 70000", "hosts[0]: port must be 1..65535, got 70000"),
        ("hosts:\n  - address: 10.0.0.1\n    gpus: -1", "gpus must be a whole number >= 0"),
        ("hosts:\n  - address: 10.0.0.1\n    colour: red", "unknown field(s) ['colour']"),
        ("hosts:\n  - address: 10.0.0.1\n    key: /no/such/key", "key file /no/such/key does not exist"),
        ("storage: ftp://x\nhosts:\n  - address: 10.0.0.1", "storage 'ftp://x' must be a file://, s3:// or gs:// URL"),
        ("name: Bad_Name!\nhosts:\n  - address: 10.0.0.1", "cluster name 'bad-name!'"),
        ("hosts: [", "cannot read the hosts file"),
        ("hosts:\n  - address: 10.0.0.1\n  - address: 10.0.0.1", "hosts[1] is 10.0.0.1:22, the same machine as hosts[0]"),
        ("hosts:\n  - address: 10.0.0.1\n    port: 2222\n  - address: 10.0.0.1\n    port: 2222", "the same machine"),
        ("hosts:\n  - {address: 10.0.0.1, name: a}\n  - {address: 10.0.0.2, name: a}", "hosts[1] has the name 'a'"),
    ],
)
def test_bad_hosts_file_names_the_entry(tmp_path, text, message):
    with pytest.raises(InventoryError) as info:
        inventory.load_hosts_file(write(tmp_path, text))
    assert message in str(info.value)


def test_resolve_by_name_selection_and_unknown(tmp_path):
    cluster = ClusterInfo(name="c1", cloud="hosts", nodes=(NodeInfo(name="n", rank=0, public_address="10.0.0.1", private_address="10.0.0.1"),))
    inventory.register(tmp_path, cluster)
    with pytest.raises(InventoryError, match="no cluster selected"):
        inventory.resolve(tmp_path)
    inventory.select(tmp_path, "c1")
    assert inventory.resolve(tmp_path).name == "c1"
    with pytest.raises(InventoryError, match="unknown cluster 'nope'; known clusters: c1"):
        inventory.resolve(tmp_path, "nope")


def test_resolve_reads_a_recorded_stack_output_without_registering_it(tmp_path):
    fixture = __import__("pathlib").Path(__file__).parent / "fixtures" / "stack_output_aws.json"
    cluster = inventory.resolve(tmp_path, str(fixture))
    assert cluster.cloud == "aws" and len(cluster.nodes) >= 1
    assert cluster.known_hosts.endswith("known_hosts") and cluster.state_dir == str(tmp_path / "clusters" / cluster.name)
    assert not (tmp_path / "clusters" / cluster.name / "cluster.json").exists(), "--cluster FILE is for this call only"
    assert inventory.known_clusters(tmp_path) == []


def test_a_file_never_overwrites_a_registered_cluster_of_the_same_name(tmp_path):
    local = ClusterInfo(name="lab", cloud="local", nodes=(NodeInfo(name="n", rank=0, public_address="127.0.0.2",
                                                                   private_address="127.0.0.2"),))
    inventory.register(tmp_path, local)
    path = write(tmp_path, "name: lab\nhosts:\n  - address: 10.0.0.1\n")
    with pytest.raises(InventoryError, match="cluster lab already exists"):
        inventory.resolve(tmp_path, str(path))
    assert inventory.resolve(tmp_path, "lab").cloud == "local"


def test_no_cluster_selected_lists_the_clusters_there_are(tmp_path):
    for name in ("alpha", "beta"):
        inventory.register(tmp_path, ClusterInfo(name=name, cloud="hosts", nodes=(
            NodeInfo(name="n", rank=0, public_address="10.0.0.1", private_address="10.0.0.1"),)))
    with pytest.raises(InventoryError, match=r"no cluster selected \(known clusters: alpha, beta; pick one with"):
        inventory.resolve(tmp_path)


def test_bad_stack_output_is_a_clear_error(tmp_path):
    path = tmp_path / "out.json"
    path.write_text(json.dumps({"cluster": {"name": "x", "cloud": "aws", "nodes": []}}))
    with pytest.raises(InventoryError, match=str(path)):
        inventory.resolve(tmp_path, str(path))
