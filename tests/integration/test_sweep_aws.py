"""The AWS leftover sweep against a moto server: find exactly one cluster's resources, purge them.

moto 5.2.5 has no placement-group API (HTTP 500), so `PlacementGroups` answers those two calls
through botocore's before-call hook on the test's session; every other call goes to moto.
"""

from __future__ import annotations

import itertools
import logging
import urllib.request

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from moto.server import ThreadedMotoServer

from infra import sweep
from infra.sweep import Leftover, find_aws_leftovers, purge_leftovers, render_leftovers

pytestmark = pytest.mark.integration

REGION = "us-east-1"
AMI = "ami-12c6146b"  # an image moto ships in every region


class PlacementGroups:
    """Describe/Delete placement groups for a boto3 session, with tag filters, in memory."""

    def __init__(self, session: boto3.Session):
        self.groups: dict[str, dict] = {}
        self._ids = itertools.count(1)
        for op in ("DescribePlacementGroups", "DeletePlacementGroup"):
            session.events.register(f"before-parameter-build.ec2.{op}", self.keep_params)
            session.events.register(f"before-call.ec2.{op}", self.answer)

    def add(self, name: str, cluster: str) -> str:
        group_id = f"pg-{next(self._ids):017x}"
        self.groups[name] = {"GroupName": name, "GroupId": group_id, "Strategy": "cluster",
                             "State": "available", "Tags": [{"Key": "gpuforge:cluster", "Value": cluster}]}
        return group_id

    def keep_params(self, params: dict, context: dict, **_: object) -> None:
        context["placement_params"] = dict(params)

    def answer(self, model, context: dict, **_: object):
        params = context["placement_params"]
        ok = AWSResponse("https://ec2.amazonaws.com/", 200, {}, None)
        if model.name == "DeletePlacementGroup":
            if self.groups.pop(params["GroupName"], None) is None:
                return AWSResponse("", 400, {}, None), {"Error": {"Code": "InvalidPlacementGroup.Unknown",
                                                                 "Message": params["GroupName"]}}
            return ok, {}
        groups = list(self.groups.values())
        for flt in params.get("Filters", []):
            key = flt["Name"].removeprefix("tag:")
            groups = [g for g in groups if any(t["Key"] == key and t["Value"] in flt["Values"]
                                               for t in g["Tags"])]
        return ok, {"PlacementGroups": groups}


@pytest.fixture(scope="module")
def moto_url():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws(moto_url, monkeypatch):
    """A boto3 session on a freshly reset moto server, and its placement-group stand-in."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")).close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)
    return session, PlacementGroups(session)


def tags(resource_type: str, cluster: str | None, name: str = "") -> list[dict]:
    pairs = ([{"Key": "gpuforge:cluster", "Value": cluster}] if cluster else []) + (
        [{"Key": "Name", "Value": name}] if name else [])
    return [{"ResourceType": resource_type, "Tags": pairs}] if pairs else []


def make_cluster(session: boto3.Session, groups: PlacementGroups, cluster: str) -> dict[str, str]:
    """What infra/aws.py makes, tagged, plus a leaked data volume; returns kind -> id."""
    ec2, s3 = session.client("ec2"), session.client("s3")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16", TagSpecifications=tags("vpc", cluster))["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone=f"{REGION}a",
                               TagSpecifications=tags("subnet", cluster))["Subnet"]["SubnetId"]
    igw = ec2.create_internet_gateway(
        TagSpecifications=tags("internet-gateway", cluster))["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    table = ec2.create_route_table(VpcId=vpc, TagSpecifications=tags("route-table", cluster))
    table_id = table["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=table_id, SubnetId=subnet)
    sg = ec2.create_security_group(GroupName=f"{cluster}-nodes", Description="nodes", VpcId=vpc,
                                   TagSpecifications=tags("security-group", cluster))["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg}]}])
    key = ec2.create_key_pair(KeyName=f"{cluster}-key", TagSpecifications=tags("key-pair", cluster))
    instance = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="g5.xlarge",
                                 SubnetId=subnet, SecurityGroupIds=[sg],
                                 TagSpecifications=tags("instance", cluster, f"{cluster}-node-0"))
    eip = ec2.allocate_address(Domain="vpc", TagSpecifications=tags("elastic-ip", cluster))["AllocationId"]
    volume = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=100,
                               TagSpecifications=tags("volume", cluster, f"{cluster}-leaked"))["VolumeId"]
    bucket = f"{cluster}-storage"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": [{"Key": "gpuforge:cluster", "Value": cluster}]})
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for body in (b"v1", b"v2"):
        s3.put_object(Bucket=bucket, Key="runs/r1/ckpt.pt", Body=body)
    s3.delete_object(Bucket=bucket, Key="runs/r1/ckpt.pt")  # leaves a delete marker over two versions
    return {"vpc": vpc, "subnet": subnet, "internet-gateway": igw, "route-table": table_id,
            "security-group": sg, "key-pair": key["KeyPairId"], "instance": instance["Instances"][0]["InstanceId"],
            "elastic-ip": eip, "volume": volume, "bucket": bucket,
            "placement-group": groups.add(f"{cluster}-pg", cluster)}


def make_bystanders(session: boto3.Session, groups: PlacementGroups) -> dict[str, str]:
    """Another cluster's volume, security group and bucket, and an untagged volume."""
    ec2, s3 = session.client("ec2"), session.client("s3")
    other = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=8, TagSpecifications=tags("volume", "other"))
    untagged = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=8)
    sg = ec2.create_security_group(GroupName="other-nodes", Description="other",
                                   TagSpecifications=tags("security-group", "other"))
    s3.create_bucket(Bucket="other-storage")
    s3.put_bucket_tagging(Bucket="other-storage", Tagging={"TagSet": [{"Key": "gpuforge:cluster",
                                                                      "Value": "other"}]})
    s3.create_bucket(Bucket="untagged-bucket")
    groups.add("other-pg", "other")
    return {"other-volume": other["VolumeId"], "untagged-volume": untagged["VolumeId"],
            "other-sg": sg["GroupId"]}


def test_find_aws_leftovers_lists_exactly_this_clusters_resources(aws):
    session, groups = aws
    made = make_cluster(session, groups, "demo")
    make_bystanders(session, groups)

    found = find_aws_leftovers("demo", REGION, session=session)

    by_kind = {lo.kind: lo for lo in found if lo.kind != "volume"}
    assert {k: lo.id for k, lo in by_kind.items()} == {k: v for k, v in made.items() if k != "volume"}
    volumes = {lo.id for lo in found if lo.kind == "volume"}
    assert made["volume"] in volumes  # the leaked one; the instance's root volume may be listed too
    assert all(lo.cloud == "aws" and lo.region == REGION for lo in found)
    assert by_kind["instance"].name == "demo-node-0" and by_kind["instance"].detail.startswith("running")
    assert by_kind["bucket"].detail.startswith("has objects")
    assert [lo.kind for lo in found] == sorted((lo.kind for lo in found), key=sweep.AWS_PURGE_ORDER.index)
    assert render_leftovers(found).row_count == len(found)


def test_purge_aws_leftovers_removes_them_and_spares_others(aws):
    session, groups = aws
    made = make_cluster(session, groups, "demo")
    spared = make_bystanders(session, groups)

    results = purge_leftovers(find_aws_leftovers("demo", REGION, session=session), session=session)

    assert [(lo.kind, err) for lo, err in results if err] == []
    assert find_aws_leftovers("demo", REGION, session=session) == []
    ec2, s3 = session.client("ec2"), session.client("s3")
    state = ec2.describe_instances(InstanceIds=[made["instance"]])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "terminated"
    assert {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]} >= {
        spared["other-volume"], spared["untagged-volume"]}
    assert spared["other-sg"] in {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == {"other-storage", "untagged-bucket"}
    assert set(groups.groups) == {"other-pg"}
    assert [lo.kind for lo in find_aws_leftovers("other", REGION, session=session)] == [
        "volume", "placement-group", "security-group", "bucket"]


def test_find_aws_leftovers_skips_terminated_instances(aws):
    session, _ = aws
    ec2 = session.client("ec2")
    instance = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1,
                                 TagSpecifications=tags("instance", "demo"))["Instances"][0]["InstanceId"]
    ec2.terminate_instances(InstanceIds=[instance])

    assert [lo for lo in find_aws_leftovers("demo", REGION, session=session) if lo.kind == "instance"] == []


def test_purge_aws_goes_on_after_a_failure(aws):
    session, _ = aws
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
                                                "resource-policy, firewall, subnetwork, network, bucket")]
