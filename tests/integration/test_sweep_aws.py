"""The AWS sweep against a moto server: find exactly one cluster's resources (what infra/aws.py makes, launch
template and IAM role/profile/policy included), purge them, and leave a stranger's look-alikes alone.

moto lacks placement groups; tests/fakes/moto_ext.py adds them to the server (with the API's errors), so every
client the sweep builds sees them.
"""

from __future__ import annotations

import json

import boto3
import pytest

from infra.sweep import AWS_PURGE_ORDER, Leftover, find_aws_leftovers, purge_leftovers, render_leftovers
from tests.fakes.s3 import apply_s3_env, reset_moto, start_moto_server

pytestmark = pytest.mark.integration

REGION = "us-east-1"
AMI = "ami-12c6146b"  # an image moto ships in every region
TRUST = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]})


@pytest.fixture(scope="module")
def moto_url():
    url, stop = start_moto_server()
    yield url
    stop()


@pytest.fixture
def session(moto_url, monkeypatch):
    """A boto3 session on a freshly reset moto server."""
    reset_moto(moto_url)
    apply_s3_env(monkeypatch, moto_url)
    return boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)


def tags(resource_type: str, cluster: str | None, name: str = "", cluster_id: str = "") -> list[dict]:
    pairs = ([{"Key": "gpuforge:cluster", "Value": cluster}] if cluster else []) + (
        [{"Key": "gpuforge:cluster-id", "Value": cluster_id}] if cluster_id else []) + (
        [{"Key": "Name", "Value": name}] if name else [])
    return [{"ResourceType": resource_type, "Tags": pairs}] if pairs else []


def make_cluster(session: boto3.Session, cluster: str, cluster_id: str = "abc123def456",
                 region_tag: str = REGION) -> dict[str, str]:
    """What infra/aws.py makes, tagged, plus a leaked data volume; returns kind -> id."""
    ec2, s3, iam = session.client("ec2"), session.client("s3"), session.client("iam")
    t = lambda kind, name="": tags(kind, cluster, name, cluster_id)  # noqa: E731
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16", TagSpecifications=t("vpc"))["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone=f"{REGION}a",
                               TagSpecifications=t("subnet"))["Subnet"]["SubnetId"]
    igw = ec2.create_internet_gateway(TagSpecifications=t("internet-gateway"))["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    table = ec2.create_route_table(VpcId=vpc, TagSpecifications=t("route-table"))["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=table, SubnetId=subnet)
    sg = ec2.create_security_group(GroupName=f"{cluster}-nodes", Description="nodes", VpcId=vpc,
                                   TagSpecifications=t("security-group"))["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg}]}])
    key = ec2.create_key_pair(KeyName=f"{cluster}-key", TagSpecifications=t("key-pair"))
    group = ec2.create_placement_group(GroupName=f"{cluster}-pg", Strategy="cluster",
                                       TagSpecifications=t("placement-group"))["PlacementGroup"]
    template = ec2.create_launch_template(
        LaunchTemplateName=f"{cluster}-lt", TagSpecifications=t("launch-template"),
        LaunchTemplateData={"ImageId": AMI, "InstanceType": "g5.xlarge", "TagSpecifications": t("instance")})
    instance = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="g5.xlarge", SubnetId=subnet,
                                 SecurityGroupIds=[sg], Placement={"GroupName": group["GroupName"]},
                                 TagSpecifications=t("instance", f"{cluster}-0"))
    eip = ec2.allocate_address(Domain="vpc", TagSpecifications=t("elastic-ip"))["AllocationId"]
    volume = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=100,
                               TagSpecifications=t("volume", f"{cluster}-leaked"))["VolumeId"]
    iam_tags = [{"Key": "gpuforge:cluster", "Value": cluster}, {"Key": "gpuforge:cluster-id", "Value": cluster_id},
                {"Key": "gpuforge:region", "Value": region_tag}]
    role = f"{cluster}-node-role-{cluster_id[:6]}"
    iam.create_role(RoleName=role, Path="/gpuforge/", AssumeRolePolicyDocument=TRUST, Tags=iam_tags)
    iam.put_role_policy(RoleName=role, PolicyName="bucket-access", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]}))
    profile = f"{cluster}-profile-{cluster_id[:6]}"
    iam.create_instance_profile(InstanceProfileName=profile, Path="/gpuforge/", Tags=iam_tags)
    iam.add_role_to_instance_profile(InstanceProfileName=profile, RoleName=role)
    bucket = f"gpuforge-{cluster}-{cluster_id}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": iam_tags[:2]})
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for body in (b"v1", b"v2"):
        s3.put_object(Bucket=bucket, Key="runs/r1/ckpt.pt", Body=body)
    s3.delete_object(Bucket=bucket, Key="runs/r1/ckpt.pt")  # leaves a delete marker over two versions
    return {"vpc": vpc, "subnet": subnet, "internet-gateway": igw, "route-table": table, "security-group": sg,
            "key-pair": key["KeyPairId"], "instance": instance["Instances"][0]["InstanceId"], "elastic-ip": eip,
            "volume": volume, "bucket": bucket, "placement-group": group["GroupId"],
            "launch-template": template["LaunchTemplate"]["LaunchTemplateId"], "iam-role": role,
            "iam-instance-profile": profile}


def make_strangers(session: boto3.Session) -> dict[str, str]:
    """Look-alikes: another cluster's resources, and untagged ones named like ours."""
    ec2, s3, iam = session.client("ec2"), session.client("s3"), session.client("iam")
    other = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=8, TagSpecifications=tags("volume", "other"))
    untagged = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=8)
    sg = ec2.create_security_group(GroupName="demo-nodes-prod", Description="a stranger's, named like ours")
    template = ec2.create_launch_template(LaunchTemplateName="demo-lt-mine", LaunchTemplateData={"ImageId": AMI})
    ec2.create_placement_group(GroupName="demo-pg-mine", Strategy="cluster")
    iam.create_role(RoleName="demo-node-role-mine", Path="/gpuforge/", AssumeRolePolicyDocument=TRUST)
    iam.create_role(RoleName="demo-app", AssumeRolePolicyDocument=TRUST,
                    Tags=[{"Key": "gpuforge:cluster", "Value": "demo"}])  # outside our path: not ours to list
    s3.create_bucket(Bucket="gpuforge-demo-backups")
    s3.create_bucket(Bucket="other-storage")
    s3.put_bucket_tagging(Bucket="other-storage", Tagging={"TagSet": [{"Key": "gpuforge:cluster", "Value": "other"}]})
    return {"other-volume": other["VolumeId"], "untagged-volume": untagged["VolumeId"], "sg": sg["GroupId"],
            "template": template["LaunchTemplate"]["LaunchTemplateId"]}


def test_find_aws_leftovers_lists_exactly_this_clusters_resources(session):
    made = make_cluster(session, "demo")
    make_strangers(session)

    found = find_aws_leftovers("demo", REGION, session=session)

    by_kind = {lo.kind: lo for lo in found if lo.kind != "volume"}
    assert {k: lo.id for k, lo in by_kind.items()} == {k: v for k, v in made.items() if k != "volume"}
    assert made["volume"] in {lo.id for lo in found if lo.kind == "volume"}
    assert all(lo.owner == "demo" and lo.owner_id == "abc123def456" for lo in found)
    assert by_kind["instance"].name == "demo-0" and by_kind["instance"].detail.startswith("running")
    assert by_kind["bucket"].detail == "3 object version(s), 4 bytes"
    assert by_kind["iam-role"].detail == "inline policies: bucket-access"
    assert [lo.kind for lo in found] == sorted((lo.kind for lo in found), key=AWS_PURGE_ORDER.index)
    assert render_leftovers(found).row_count == len(found)


def test_purge_removes_them_keeps_the_data_unless_told_and_spares_strangers(session):
    made = make_cluster(session, "demo")
    spared = make_strangers(session)
    ec2, s3, iam = session.client("ec2"), session.client("s3"), session.client("iam")
    from infra.sweep import split_data

    data, rest = split_data(find_aws_leftovers("demo", REGION, session=session))
    results = purge_leftovers(rest, session=session)

    assert [(lo.kind, err) for lo, err in results if err] == []
    assert [lo.id for lo in data] == [made["bucket"]]
    assert [lo.kind for lo in find_aws_leftovers("demo", REGION, session=session)] == ["bucket"]
    results = purge_leftovers(data, session=session)  # what `--delete-data` does: versions included
    assert [err for _, err in results] == [None] and find_aws_leftovers("demo", REGION, session=session) == []
    state = ec2.describe_instances(InstanceIds=[made["instance"]])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "terminated"
    assert {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]} >= {
        spared["other-volume"], spared["untagged-volume"]}
    assert spared["sg"] in {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    assert [t["LaunchTemplateId"] for t in ec2.describe_launch_templates()["LaunchTemplates"]] == [spared["template"]]
    assert [g["GroupName"] for g in ec2.describe_placement_groups()["PlacementGroups"]] == ["demo-pg-mine"]
    assert {r["RoleName"] for r in iam.list_roles()["Roles"]} == {"demo-node-role-mine", "demo-app"}
    assert iam.list_instance_profiles()["InstanceProfiles"] == []
    assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == {"gpuforge-demo-backups", "other-storage"}
    assert [lo.kind for lo in find_aws_leftovers("other", REGION, session=session)] == ["volume", "bucket"]


def test_a_same_named_clusters_iam_in_another_region_is_not_claimed(session):
    make_cluster(session, "demo", cluster_id="west00000000", region_tag="us-west-2")

    found = find_aws_leftovers("demo", REGION, session=session)

    assert not [lo for lo in found if lo.kind.startswith("iam-")]


def test_the_sweep_of_every_cluster_lists_each_owner(session):
    make_cluster(session, "demo")
    make_cluster(session, "lab", cluster_id="lab000000000")

    owners = {lo.owner for lo in find_aws_leftovers(None, REGION, session=session)}

    assert owners == {"demo", "lab"}


def test_what_the_stack_recorded_is_claimed_even_without_our_tag(session):
    ec2 = session.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16", TagSpecifications=tags("vpc", "demo"))["Vpc"]["VpcId"]

    found = find_aws_leftovers("demo", REGION, session=session, recorded=frozenset({vpc}))

    assert [(lo.kind, lo.recorded) for lo in found] == [("vpc", True)]


def test_find_aws_leftovers_skips_terminated_instances(session):
    ec2 = session.client("ec2")
    instance = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1,
                                 TagSpecifications=tags("instance", "demo"))["Instances"][0]["InstanceId"]
    ec2.terminate_instances(InstanceIds=[instance])

    assert [lo for lo in find_aws_leftovers("demo", REGION, session=session) if lo.kind == "instance"] == []


def test_purge_aws_goes_on_after_a_failure(session):
    ec2 = session.client("ec2")
    stranger = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    volume = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=8, TagSpecifications=tags("volume", "demo"))
    ec2.attach_volume(VolumeId=volume["VolumeId"], InstanceId=stranger, Device="/dev/sdf")
    sg = ec2.create_security_group(GroupName="demo-nodes", Description="x", TagSpecifications=tags(
        "security-group", "demo"))["GroupId"]

    results = purge_leftovers(find_aws_leftovers("demo", REGION, session=session), session=session)

    errors = {lo.id: err for lo, err in results}
    assert errors[volume["VolumeId"]]  # in use by an instance that is not the cluster's
    assert errors[sg] is None
    assert [lo.id for lo in find_aws_leftovers("demo", REGION, session=session)] == [volume["VolumeId"]]


def test_purge_refuses_unknown_kinds_without_calling_the_cloud():
    image = Leftover("gcp", "image", "1", "demo-image", "global")
    assert purge_leftovers([image]) == [(image, "cannot purge a gcp image: only instance, disk, address, "
                                                "resource-policy, firewall, subnetwork, network, service-account, "
                                                "bucket")]
