"""BakeSpec validation (bad values fail at construction, naming the value and the choices) and the
pure parts of the bake: image names, tags/labels, which old images are pruned, the seal commands."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from invoke import MockContext, Result

from images.common import (
    BuilderInstance,
    Cleanup,
    builder_cluster,
    aws_tags,
    gcp_label_value,
    gcp_labels,
    image_metadata,
    images_to_prune,
    seal_builder,
    seal_commands,
)
from images.errors import BakeError, BakeSpecError, CleanupError
from images.spec import AWS_BASE_PARAMETERS, GCP_BASE_FAMILIES, BakeNames, BakeSpec

CIDRS = ("203.0.113.4/32",)


def aws(**changes) -> BakeSpec:
    return BakeSpec(**{"cloud": "aws", "ssh_cidrs": CIDRS, **changes})


def gcp(**changes) -> BakeSpec:
    return BakeSpec(**{"cloud": "gcp", "project": "my-project-1", "ssh_cidrs": CIDRS, **changes})


def test_defaults_fill_builder_region_zone_and_plain_ubuntu_base():
    a, g = aws(), gcp()
    assert (a.instance_type, a.region, a.zone, a.keep, a.disk_gb) == ("g5.xlarge", "us-east-1", "us-east-1a", 3, 100)
    assert (g.instance_type, g.region, g.zone) == ("g2-standard-8", "us-central1", "us-central1-a")
    assert a.base_image_ref == AWS_BASE_PARAMETERS["ubuntu-22.04"] and "/canonical/ubuntu/" in a.base_image_ref
    assert gcp(os_name="ubuntu-24.04").base_image_ref == GCP_BASE_FAMILIES["ubuntu-24.04"]
    assert a.family == "gpuforge-ubuntu2204-cu130-torch213" and a.gpus == ("A10G", 1)
    assert gcp(instance_type="n1-standard-8", accelerator="nvidia-tesla-t4:2").gpus == ("T4", 2)


def test_ssh_cidrs_are_normalized_and_a_security_group_stands_in_for_them():
    assert aws(ssh_cidrs=["203.0.113.4/32", "198.51.100.0/24"]).ssh_cidrs == ("203.0.113.4/32", "198.51.100.0/24")
    with pytest.raises(BakeSpecError, match="IPv6"):  # the builder's network is IPv4-only, as a cluster's
        aws(ssh_cidrs=["2001:db8::/64"])
    spec = aws(ssh_cidrs=(), subnet_id="subnet-0123456789abcdef0", security_group_id="sg-0123456789abcdef0")
    assert spec.ssh_cidrs == ()


@pytest.mark.parametrize("make,changes,fragment", [
    (aws, {"cloud": "azure"}, "cloud 'azure' cannot be baked for; valid choices: aws, gcp"),
    (aws, {"os_name": "ubuntu-20.04"}, "os_name 'ubuntu-20.04': did you mean ubuntu-24.04 or ubuntu-22.04?"),
    (aws, {"instance_type": "g5.xlarg"}, "unknown aws instance type 'g5.xlarg'; did you mean g5.xlarge"),
    (aws, {"instance_type": "m5.large"}, "unknown aws instance type 'm5.large'"),  # CPU-only builders: refused
    (aws, {"region": "us-east-9"}, "unknown aws region 'us-east-9'; did you mean"),
    (aws, {"zone": "us-east-1z"}, "unknown zone 'us-east-1z' for aws region us-east-1"),
    (gcp, {"instance_type": "n1-standard-8"}, "n1-standard-8 has no built-in GPUs: set accelerator"),
    (gcp, {"project": ""}, "project is empty: a GCP bake needs the project"),
    (gcp, {"project": "X"}, "project 'X' is not a GCP project id"),
    (aws, {"keep": 0}, "keep must be an integer >= 1 (the image just baked is always kept), got 0"),
    (aws, {"keep": "3"}, "keep must be an integer >= 1"),
    (aws, {"disk_gb": 500}, "disk_gb must be between 40 and 100, got 500"),
    (aws, {"name": "My_Image"}, "name 'My_Image' must be 1-63 lowercase letters"),
    (aws, {"ssh_cidrs": ()}, "ssh_cidrs is empty: the controller must reach the builder over SSH"),
    (aws, {"ssh_cidrs": ("203.0.113.4/33",)}, "ssh_cidrs entry '203.0.113.4/33' is not a CIDR"),
    (aws, {"base_image": "ubuntu"}, "base_image 'ubuntu' is neither an AMI id"),
    (gcp, {"base_image": "ubuntu-2204-lts"}, "base_image 'ubuntu-2204-lts' is not a GCE image path"),
    (aws, {"subnet_id": "vpc-123"}, "subnet_id 'vpc-123' is not a subnet id"),
    (aws, {"security_group_id": "sg-0123456789abcdef0"}, "security_group_id needs subnet_id"),
    (aws, {"project": "my-project-1"}, "project applies only to gcp bakes"),
    (aws, {"accelerator": "nvidia-tesla-t4:1"}, "accelerator applies only to gcp bakes"),
    (gcp, {"subnet_id": "subnet-0123456789abcdef0"}, "subnet_id applies only to aws bakes"),
    (gcp, {"network": "Bad_Net"}, "network 'Bad_Net' is not a GCE resource name"),
])
def test_bad_spec_values_fail_at_construction_with_the_value_and_choices(make, changes, fragment):
    with pytest.raises(BakeSpecError) as caught:
        make(**changes)
    assert fragment in str(caught.value)
    assert isinstance(caught.value, BakeError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("make,base", [
    (aws, "ami-0123456789abcdef0"),
    (aws, "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"),
    (aws, "resolve:ssm:/golden/ami"),
    (gcp, "projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts"),
    (gcp, "https://www.googleapis.com/compute/v1/projects/my-project-1/global/images/mine-1"),
])
def test_base_image_overrides_are_taken_as_given(make, base):
    assert make(base_image=base).base_image_ref == base


def test_names_are_valid_cluster_and_image_names():
    spec = aws()
    names = BakeNames.new(spec, datetime(2026, 11, 23, 15, 30, 0, tzinfo=timezone.utc))
    assert names.image == "gpuforge-ubuntu2204-cu130-torch213-20261123-153000"
    assert names.builder.startswith("bake-261123-153000-") and len(names.builder) <= 24
    assert BakeNames.new(aws(name="golden-1")).image == "golden-1"


def test_tags_and_labels_match_what_infra_selects_on():
    meta = image_metadata(gcp(), "0123abcd0123abcd")
    tags, labels = aws_tags(meta), gcp_labels(meta)
    # infra/aws.py: tag:gpuforge:baked=true, tag:gpuforge:os=<os>; infra/gcp.py: labels gpuforge-baked, gpuforge-os
    assert tags["gpuforge:baked"] == "true" and tags["gpuforge:os"] == "ubuntu-22.04"
    assert labels["gpuforge-baked"] == "true" and labels["gpuforge-os"] == "ubuntu-2204"
    assert labels["gpuforge-driver"] == "580-167-08" and labels["gpuforge-gpu"] == "l4"
    assert labels["gpuforge-source"] == "0123abcd0123abcd"
    assert all(len(v) <= 63 and v == gcp_label_value(v) for v in labels.values())
    volta = image_metadata(gcp(instance_type="n1-standard-8", accelerator="nvidia-tesla-v100:1"), "x")
    assert volta["driver-modules"] == "proprietary" and volta["gpu"] == "V100"


@pytest.mark.parametrize("ages,keep,new,pruned", [
    ([1, 2, 3, 4], 3, 4, [1]),  # the new one (4) and the two before it stay
    ([1, 2, 3, 4], 1, 4, [3, 2, 1]),
    ([1, 2], 3, 2, []),
    ([5, 1, 2, 3], 2, 3, [2, 1]),  # an image newer than the one just baked (another bake) stays too
])
def test_images_beyond_keep_are_pruned_oldest_last_and_never_the_new_one(ages, keep, new, pruned):
    images = [{"id": f"img-{a}", "created": a} for a in ages]
    out = images_to_prune(images, keep, key=lambda i: (i["created"],), keep_id=f"img-{new}", id_of=lambda i: i["id"])
    assert [i["created"] for i in out] == pruned


def test_cleanup_tries_every_action_and_reports_what_is_left():
    done, events = [], []
    cleanup = Cleanup(events.append)
    cleanup.add("network", lambda: done.append("network"))
    cleanup.add("half image", lambda: done.append("image"), always=False)

    def broken() -> None:
        raise RuntimeError("DependencyViolation")

    cleanup.add("builder i-1", broken)
    with pytest.raises(CleanupError, match="builder i-1: DependencyViolation"):
        cleanup.run(failed=False)
    assert done == ["network"]  # newest first; the failure-only action was skipped


def test_seal_removes_the_bake_key_and_resets_cloud_init():
    from provision.steps.base import root_command

    commands = seal_commands("bake-261123-153000-ab12")
    # The cloud-init line is compound (`if ...; then ...; fi`): the whole of it goes through root_command.
    ctx = MockContext(run={commands[0][0]: Result(), root_command(commands[1][0]): Result()}, sudo={})
    seal_builder(ctx, "bake-261123-153000-ab12")
    assert "/ bake-261123-153000-ab12$/d" in commands[0][0] and "cloud-init clean" in commands[1][0]
    failing = MockContext(run={commands[0][0]: Result(exited=1, stderr="no such file")}, sudo={})
    with pytest.raises(BakeError, match="sealing the builder failed"):
        seal_builder(failing, "bake-261123-153000-ab12")


def test_default_target_is_the_builder_as_ubuntu_with_its_own_key_and_known_hosts(tmp_path):
    builder = BuilderInstance(
        cloud="gcp", id="123", name="bake-261123-153000-ab12", public_address="34.1.2.3", private_address="10.128.0.2",
        key_path=str(tmp_path / "id_ed25519"), instance_type="n1-standard-8", region="us-central1",
        zone="us-central1-a", state_dir=str(tmp_path), gpu_model="T4", gpu_count=1, accelerator="nvidia-tesla-t4:1")
    cluster = builder_cluster(builder)
    node = cluster.head
    assert (cluster.cloud, node.public_address, node.ssh_port, node.user) == ("gcp", "34.1.2.3", 22, "ubuntu")
    assert node.key_path == builder.key_path and node.workdir == "/opt/gpuforge"
    assert cluster.known_hosts == str(tmp_path / "known_hosts")  # pins recorded for this bake only
    assert cluster.extra["accelerator"] == "nvidia-tesla-t4:1"  # what the GPU steps read on n1
