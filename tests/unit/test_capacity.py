"""Capacity errors (try the next zone) told apart from quota errors (name the quota; another zone will not help), on
error texts the providers really printed, as recorded in public issue trackers."""

from __future__ import annotations

import pytest

from infra.capacity import aws_quota_hint, classify, gcp_quota_hint

# pulumi-aws / terraform-provider-aws, red-hat-storage/ocs-ci#9263
AWS_CAPACITY = ("Error: creating EC2 Instance: InsufficientInstanceCapacity: We currently do not have sufficient "
                "m6i.xlarge capacity in the Availability Zone you requested (us-east-2a). Our system will be working on "
                "provisioning additional capacity. You can currently get m6i.xlarge capacity by not specifying an "
                "Availability Zone in your request or choosing us-east-2b, us-east-2c.")
# bentoml/bentoctl#202
AWS_VCPU = ("creating EC2 Instance: VcpuLimitExceeded: You have requested more vCPU capacity than your current vCPU "
            "limit of 32 allows for the instance bucket that the specified instance type belongs to. Please visit "
            "http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit.")
AWS_EIP = "creating EC2 EIP: AddressLimitExceeded: The maximum number of addresses has been reached."
# scylladb/scylla-cluster-tests#12477
GCP_CAPACITY = ("503 SERVICE UNAVAILABLE ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS: The zone "
                "'projects/sct-project-1/zones/us-east1-c' does not have enough resources available to fulfill the "
                "request.  '(resource type:compute)'.")
# terraform-provider-google prints the operation's message only: hashicorp/terraform-provider-google#20573 and
# HAWQ#4 ("The zone ... does not have enough resources available to fulfill the request. Try a different zone")
GCP_CAPACITY_TF = ("Error waiting for instance to create: The zone 'projects/p/zones/us-central1-a' does not have enough "
                   "resources available to fulfill the request. Try a different zone, or try again later.")
GCP_QUOTA_TF = ("Error: Error waiting for instance to create: Quota 'CPUS_PER_VM_FAMILY' exceeded.  Limit: 176.0 in "
                "region us-central1.")
GCP_GLOBAL = "ERROR: (gcloud.compute.instances.create) Could not fetch resource: - Quota 'GPUS_ALL_REGIONS' exceeded. " \
             "Limit: 0.0 globally."


@pytest.mark.parametrize("cloud,text,kind", [
    ("aws", AWS_CAPACITY, "capacity"), ("aws", AWS_VCPU, "quota"), ("aws", AWS_EIP, "quota"),
    ("gcp", GCP_CAPACITY, "capacity"), ("gcp", GCP_CAPACITY_TF, "capacity"), ("gcp", GCP_QUOTA_TF, "quota"),
    ("gcp", GCP_GLOBAL, "quota"), ("aws", "InvalidKeyPair.Format: Key is not in valid OpenSSH format", "other"),
])
def test_recorded_provider_errors_are_classified(cloud, text, kind):
    assert classify(cloud, text, "p4d.24xlarge").kind == kind


def test_a_quota_error_names_the_quota():
    vcpu = classify("aws", AWS_VCPU, "p4d.24xlarge")
    assert (vcpu.quota, vcpu.quota_name, vcpu.limit) == ("L-417A185B", "Running On-Demand P instances", "32")
    assert classify("aws", AWS_VCPU, "g5.xlarge", spot=True).quota == "L-3819A6DF"
    assert classify("aws", AWS_EIP).quota == "L-0263D0A3"
    gcp = classify("gcp", GCP_QUOTA_TF)
    assert (gcp.quota, gcp.limit) == ("CPUS_PER_VM_FAMILY", "176.0") and "region us-central1" in gcp.quota_name
    assert classify("gcp", GCP_GLOBAL).quota_name == "GPUS_ALL_REGIONS (all regions)"


def test_hints_say_how_to_raise_the_quota():
    hint = aws_quota_hint("L-417A185B", "Running On-Demand P instances", "us-east-1", 192)
    assert "aws service-quotas request-service-quota-increase --service-code ec2 --quota-code L-417A185B" in hint
    assert "--desired-value 192 --region us-east-1" in hint
    assert "console.cloud.google.com/iam-admin/quotas?project=p" in gcp_quota_hint("NVIDIA_A100_GPUS", "us-central1", "p")
