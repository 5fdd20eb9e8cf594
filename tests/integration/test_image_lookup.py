"""Which image `fab up` records at a cluster's first up (images/lookup.py): the newest usable baked image, against
moto (EC2's DescribeImages) and tests/fakes/gce.py (images.list with the documented filter, getFromFamily)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import boto3
import pytest
from google.cloud import compute_v1
from moto import mock_aws

from images.lookup import find_aws_image, find_gcp_image, newest_ami
from tests.fakes.gce import FakeCompute

pytestmark = pytest.mark.integration

FAMILY = "gpuforge-ubuntu2204-cu130-torch213"
LABELS = {"gpuforge-baked": "true", "gpuforge-os": "ubuntu-2204", "gpuforge-driver-modules": "open"}


def test_aws_skips_our_own_deprecated_amis_which_describe_images_still_returns():
    """DescribeImages returns an owner's deprecated AMIs whatever IncludeDeprecated says (EC2 API reference); moto
    has no deprecation, so the records here are DescribeImages-shaped (ImageId, State, CreationDate,
    DeprecationTime as ISO 8601 UTC)."""
    now = datetime(2026, 12, 2, tzinfo=timezone.utc)
    records = [
        {"ImageId": "ami-0older", "State": "available", "CreationDate": "2026-11-01T00:00:00.000Z"},
        {"ImageId": "ami-0deprecated", "State": "available", "CreationDate": "2026-11-20T00:00:00.000Z",
         "DeprecationTime": "2026-12-01T00:00:00.000Z"},
        {"ImageId": "ami-0pending", "State": "pending", "CreationDate": "2026-11-25T00:00:00.000Z"},
        {"ImageId": "ami-0later-deprecation", "State": "available", "CreationDate": "2026-11-10T00:00:00.000Z",
         "DeprecationTime": "2027-06-01T00:00:00.000Z"},
    ]
    assert newest_ami(records, now)["ImageId"] == "ami-0later-deprecation"


def test_aws_baked_ami_with_its_root_device_from_moto():
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        builder = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        image = ec2.create_image(InstanceId=builder, Name="baked")["ImageId"]
        ec2.create_tags(Resources=[image], Tags=[{"Key": "gpuforge:baked", "Value": "true"},
                                                 {"Key": "gpuforge:os", "Value": "ubuntu-22.04"},
                                                 {"Key": "gpuforge:driver-modules", "Value": "open"}])
        choice = find_aws_image(ec2, boto3.client("ssm", region_name="us-east-1"), "ubuntu-22.04", "A100")
        assert (choice.id, choice.source, choice.root_device) == (image, "baked", "/dev/sda1")


def test_gcp_takes_the_newest_ready_undeprecated_image_of_our_family():
    with FakeCompute(project="p") as gce:
        def image(name: str, created: str, **extra: object) -> None:
            gce.seed("images", "global", {"name": name, "family": FAMILY, "labels": LABELS, "status": "READY",
                                          "creationTimestamp": created, **extra})

        image("good", "2026-11-01T00:00:00Z")
        image("newer-but-pending", "2026-11-05T00:00:00Z", status="PENDING")
        image("newest-but-deprecated", "2026-11-09T00:00:00Z", deprecated={"state": "DEPRECATED"})
        image("other-family", "2026-11-10T00:00:00Z", family="someone-elses")
        images = compute_v1.ImagesClient(**gce.client_kwargs())

        choice = find_gcp_image(images, "p", "ubuntu-22.04", "A100")

        assert choice.name == "good" and choice.source == "baked" and choice.id.endswith("/images/good")
