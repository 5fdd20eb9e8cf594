"""ClusterSpec: catalog-backed validation with one clear line per problem, and stack config mapping."""

from __future__ import annotations

import re

import pytest

from infra.errors import SpecError
from infra.spec import SSH_CIDRS_HINT, ClusterSpec

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHxZ9p7test gpuforge@test"


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"cloud": "aws", "nodes": 0}, "nodes must be between 1 and 128, got 0"),
        ({"cloud": "aws", "nodes": "two"}, "nodes: Input should be a valid integer"),
        (
            {"cloud": "aws", "instance_type": "p4d.24xlage"},
            "unknown aws instance type 'p4d.24xlage'; did you mean p4d.24xlarge",
        ),
        ({"cloud": "gcp", "instance_type": "p4d.24xlarge"}, "unknown gcp instance type 'p4d.24xlarge'"),
        ({"cloud": "aws", "region": "us-central1"}, "unknown aws region 'us-central1'"),
        ({"cloud": "gcp", "region": "us-east-1"}, "unknown gcp region 'us-east-1'; did you mean us-east1"),
        ({"cloud": "aws", "zone": "us-west-2a"}, "zone 'us-west-2a' is in region us-west-2, not us-east-1"),
        ({"cloud": "gcp", "zone": "us-central1-z"}, "unknown zone 'us-central1-z' for gcp region us-central1"),
        ({"cloud": "aws", "ssh_cidrs": ["10.0.0.1/24"]}, "ssh_cidrs entry '10.0.0.1/24' is not a CIDR"),
        ({"cloud": "aws", "ssh_cidrs": "203.0.113.4/33"}, "ssh_cidrs entry '203.0.113.4/33' is not a CIDR"),
        ({"cloud": "aws", "ssh_cidrs": '["oops"'}, "is not a JSON list"),
        ({"cloud": "gcp", "instance_type": "n1-standard-8"}, "n1-standard-8 has no built-in GPUs"),
        (
            {"cloud": "gcp", "instance_type": "a2-highgpu-8g", "accelerator": "nvidia-tesla-t4:1"},
            "applies only to GCP n1 machine types",
        ),
        (
            {"cloud": "aws", "instance_type": "g5.xlarge", "accelerator": "nvidia-tesla-t4:1"},
            "applies only to GCP n1 machine types",
        ),
        (
            {"cloud": "gcp", "instance_type": "n1-standard-8", "accelerator": "nvidia-tesla-t4:3"},
            "nvidia-tesla-t4 comes in counts 1, 2, 4, not 3",
        ),
        (
            {"cloud": "gcp", "instance_type": "n1-standard-8", "accelerator": "nvidia-tesla-k80:1"},
            "unknown GCP accelerator 'nvidia-tesla-k80'",
        ),
        (
            {"cloud": "gcp", "instance_type": "n1-standard-16", "accelerator": "nvidia-tesla-v100:1"},
            "n1-standard-16 has 16 vCPUs but 1 x nvidia-tesla-v100 allows at most 12",
        ),
        ({"cloud": "azure"}, "cloud: Input should be 'local', 'aws' or 'gcp' (got 'azure')"),
        ({"name": "My_Cluster"}, "name 'My_Cluster' must be 1-24 characters"),
        ({"disk_gb": 20}, "disk_gb must be between 100 and 16384, got 20"),
        ({"os": "centos-7"}, "os: Input should be 'ubuntu-22.04' or 'ubuntu-24.04'"),
        ({"project": "X"}, "project 'X' is not a GCP project id"),
        ({"ssh_public_key": "not-a-key"}, "is not one OpenSSH public key line"),
        ({"instance": "x"}, "unknown field 'instance'; valid fields: cloud, name, nodes"),
    ],
)
def test_bad_values_raise_one_clear_line(kwargs, fragment):
    with pytest.raises(SpecError) as err:
        ClusterSpec(**kwargs)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message and "pydantic" not in message


def test_private_key_is_refused_without_echoing_it():
    secret = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"
    with pytest.raises(SpecError) as err:
        ClusterSpec(ssh_public_key=secret)
    assert "private key" in str(err.value) and "b3BlbnNzaC1rZXkt" not in str(err.value)


def test_several_problems_are_reported_together():
    with pytest.raises(SpecError) as err:
        ClusterSpec(cloud="aws", nodes=0, disk_gb=1)
    assert "nodes must be" in str(err.value) and "disk_gb must be" in str(err.value)


@pytest.mark.parametrize(
    "cloud,instance_type,region,zone",
    [("aws", "g5.xlarge", "us-east-1", "us-east-1a"), ("gcp", "g2-standard-8", "us-central1", "us-central1-a")],
)
def test_cloud_defaults(cloud, instance_type, region, zone):
    spec = ClusterSpec(cloud=cloud)
    assert (spec.instance_type, spec.region, spec.zone) == (instance_type, region, zone)
    assert spec.ssh_cidrs == () and spec.spot is False
    assert spec.os == "ubuntu-22.04"


def test_zone_defaults_to_first_zone_of_region():
    assert ClusterSpec(cloud="aws", region="eu-west-1").zone == "eu-west-1a"


def test_spec_is_frozen():
    spec = ClusterSpec(cloud="aws")
    with pytest.raises(Exception):
        spec.nodes = 3  # type: ignore[misc]


def test_properties_come_from_the_catalog():
    spec = ClusterSpec(cloud="aws", nodes=2, instance_type="p4d.24xlarge")
    assert (spec.gpu_model, spec.gpu_count, spec.gpu_memory_gib) == ("A100", 8, 40)
    assert spec.efa_interfaces == 4 and spec.nvswitch is True
    assert spec.cost_per_hour == pytest.approx(2 * spec.instance.price_per_hour, abs=1e-3)
    n1 = ClusterSpec(cloud="gcp", instance_type="n1-standard-8", accelerator="nvidia-tesla-t4")
    assert n1.accelerator == "nvidia-tesla-t4:1"  # normalized
    assert (n1.gpu_model, n1.gpu_count, n1.accelerator_name, n1.accelerator_count) == ("T4", 1, "nvidia-tesla-t4", 1)
    local = ClusterSpec()
    assert (local.gpu_count, local.cost_per_hour, local.instance) == (0, 0.0, None)


@pytest.mark.parametrize(
    "raw,expected",
    [
        ('["203.0.113.4/32", "2001:db8::/64"]', ("203.0.113.4/32", "2001:db8::/64")),
        ("203.0.113.4/32, 198.51.100.0/24", ("203.0.113.4/32", "198.51.100.0/24")),
        ("203.0.113.4", ("203.0.113.4/32",)),
        ("", ()),
    ],
)
def test_ssh_cidrs_accept_json_list_or_comma_string(raw, expected):
    assert ClusterSpec(ssh_cidrs=raw).ssh_cidrs == expected


def test_from_stack_config_maps_camel_case_keys():
    spec = ClusterSpec.from_stack_config(
        {
            "gpuforge:cloud": "gcp",
            "gpuforge:nodes": "2",
            "gpuforge:instanceType": "n1-standard-8",
            "gpuforge:accelerator": "nvidia-tesla-t4:1",
            "gpuforge:zone": "us-central1-b",
            "gpuforge:spot": "true",
            "gpuforge:diskGb": "300",
            "gpuforge:sshCidrs": '["203.0.113.4/32"]',
            "gpuforge:sshPublicKey": KEY,
            "gpuforge:sshKeyPath": "/home/me/.ssh/gpuforge",
            "gpuforge:clusterId": "abc123def456",
            "gpuforge:os": "ubuntu-24.04",
            "gcp:project": "my-project-1",
            "aws:region": "eu-west-1",  # another cloud's config is ignored
        },
        name="dev",
    )
    assert (spec.cloud, spec.name, spec.nodes, spec.zone, spec.spot, spec.disk_gb) == (
        "gcp", "dev", 2, "us-central1-b", True, 300
    )
    assert spec.ssh_cidrs == ("203.0.113.4/32",) and spec.ssh_key_path == "/home/me/.ssh/gpuforge"
    assert spec.cluster_id == "abc123def456" and spec.project == "my-project-1" and spec.os == "ubuntu-24.04"
    assert spec.region == "us-central1"


def test_from_stack_config_falls_back_to_provider_region_and_default_cloud():
    spec = ClusterSpec.from_stack_config({"aws:region": "us-west-2"}, cloud_default="aws", name="x")
    assert (spec.cloud, spec.region, spec.zone) == ("aws", "us-west-2", "us-west-2a")


def test_from_stack_config_rejects_unknown_gpuforge_keys():
    expected = "unknown stack config key(s) gpuforge:instance_type; valid keys:"
    with pytest.raises(SpecError, match=re.escape(expected)) as err:
        ClusterSpec.from_stack_config({"gpuforge:instance_type": "g5.xlarge"})
    assert "gpuforge:instanceType" in str(err.value)


def test_stack_config_round_trip():
    spec = ClusterSpec(
        cloud="gcp", name="rt", nodes=3, instance_type="a2-highgpu-8g", spot=True, ssh_cidrs=["203.0.113.0/24"],
        ssh_public_key=KEY, project="my-project-1",
    )
    assert ClusterSpec.from_stack_config(spec.to_stack_config()) == spec


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"cloud": "aws"}, "ssh_public_key is empty"),
        ({"cloud": "gcp", "ssh_public_key": KEY}, "pulumi config set gcp:project"),
    ],
)
def test_check_deployable(kwargs, fragment):
    with pytest.raises(SpecError, match=re.escape(fragment)):
        ClusterSpec(**kwargs).check_deployable()
    ClusterSpec().check_deployable()  # local needs neither


def test_ssh_hint_shows_the_config_command():
    assert "pulumi config set --path 'gpuforge:sshCidrs[0]' 203.0.113.4/32" in SSH_CIDRS_HINT


ECDSA_KEY = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTY me@laptop"


def test_ec2_takes_only_rsa_and_ed25519_keys_gce_takes_ecdsa_too():
    """EC2 ImportKeyPair imports RSA and ED25519 keys only (regression: ECDSA and security keys were accepted and
    failed at the first `pulumi up`); GCE metadata ssh-keys takes any OpenSSH key."""
    with pytest.raises(SpecError, match="has type ecdsa-sha2-nistp256, but EC2 imports only ssh-ed25519 and ssh-rsa"):
        ClusterSpec(cloud="aws", ssh_public_key=ECDSA_KEY)
    assert ClusterSpec(cloud="gcp", project="my-project-1", ssh_public_key=ECDSA_KEY).ssh_public_key == ECDSA_KEY
    assert ClusterSpec(cloud="aws", ssh_public_key=KEY).ssh_public_key == KEY


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_ipv6_ssh_cidrs_are_refused_on_ipv4_only_networks(cloud):
    """Our VPC and networks have no IPv6: a rule for an IPv6 CIDR would admit nobody (regression: it was created)."""
    with pytest.raises(SpecError, match="'2001:db8::/64' is IPv6, but gpuforge's .* networks are IPv4-only"):
        ClusterSpec(cloud=cloud, project="my-project-1", ssh_cidrs=["203.0.113.4/32", "2001:db8::/64"])


def test_a_retired_stack_key_says_what_replaced_it():
    with pytest.raises(SpecError, match="forceDestroyBucket is no longer used: the bucket is kept .* --delete-data"):
        ClusterSpec.from_stack_config({"gpuforge:forceDestroyBucket": "true"}, name="x")
