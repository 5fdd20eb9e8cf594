"""An AWS cluster's whole life through the real `gpuforge` tasks, against a moto server (with tests/fakes/moto_ext.py),
the real Pulumi program run by tests/fakes/engine.py's stand-in for `pulumi up` (Pulumi's mocks, preview=False,
resources created in moto), and the real trainer writing to the bucket.

up -> a second up after a newer image is published (no node replaced) -> train writes to the bucket -> down (the
data is kept and reported) -> down --delete-data (the bucket goes, every version); an up that fails early, for want
of capacity in every zone, or because the controller dies mid-up -> down -> nothing of the cluster is left. Through
all of it, a stranger's look-alikes (same name prefixes, our tag key for another cluster, a colleague's cluster of the
same name) are untouched.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone

import boto3
import pytest

from infra.sweep import find_aws_leftovers
from provision.registry import human_bytes
from tests.fakes import moto_ext
from tests.fakes.engine_aws import AwsCloud
from tests.fakes.s3 import ACCOUNT_ID, apply_s3_env, reset_moto, start_moto_server
from tests.integration.lifecycle import gpuforge, install_engines
from tests.support import TINY_CONVNET, run, train_cmd

pytestmark = pytest.mark.integration

REGION = "us-east-1"
BASE_AMI = "ami-12c6146b"  # an image moto ships in every region
UP = ["up", "--cloud", "aws", "--name", "demo", "--instance-type", "p4d.24xlarge", "--nodes", "2",
      "--ssh-cidr", "203.0.113.4/32", "--yes"]
TRUST = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]})


@pytest.fixture(scope="module")
def moto_url():
    url, stop = start_moto_server()
    yield url
    stop()


@pytest.fixture
def aws(moto_url, monkeypatch, tmp_path):
    """A fresh moto account, our home, the stand-in engine, and a session to look at what exists."""
    reset_moto(moto_url)
    apply_s3_env(monkeypatch, moto_url)
    monkeypatch.setenv("GPUFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 otherwise, and ids would be cut in tables
    engines = install_engines(monkeypatch, {"aws": AwsCloud(moto_url, REGION)})
    session = boto3.Session(region_name=REGION)
    return session, engines


def publish_ami(session, name: str, created: datetime) -> str:
    """A baked gpuforge AMI for A100s (open modules) on Ubuntu 22.04, as images/aws.py tags it."""
    ec2 = session.client("ec2")
    builder = ec2.run_instances(ImageId=BASE_AMI, MinCount=1, MaxCount=1, InstanceType="t3.micro")
    builder_id = builder["Instances"][0]["InstanceId"]
    image = ec2.create_image(InstanceId=builder_id, Name=name)["ImageId"]
    ec2.terminate_instances(InstanceIds=[builder_id])
    ec2.create_tags(Resources=[image], Tags=[{"Key": "gpuforge:baked", "Value": "true"},
                                             {"Key": "gpuforge:os", "Value": "ubuntu-22.04"},
                                             {"Key": "gpuforge:driver-modules", "Value": "open"}])
    from moto.ec2.models import ec2_backends

    ec2_backends[ACCOUNT_ID][REGION].amis[image].creation_date = created
    return image


def seed_strangers(session) -> dict[str, str]:
    """Look-alikes that are not this cluster's: named like ours, our tag key for other clusters, and a colleague's
    cluster called `demo` too (same tag value, another cluster id)."""
    ec2, s3, iam = session.client("ec2"), session.client("s3"), session.client("iam")
    colleague = [{"Key": "gpuforge:cluster", "Value": "demo"}, {"Key": "gpuforge:cluster-id", "Value": "colleague000"}]
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16", TagSpecifications=[
        {"ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": "demo-vpc"}]}])["Vpc"]["VpcId"]
    sg = ec2.create_security_group(GroupName="demo-sg-prod", Description="mine", VpcId=vpc)["GroupId"]
    colleague_vpc = ec2.create_vpc(CidrBlock="10.2.0.0/16", TagSpecifications=[
        {"ResourceType": "vpc", "Tags": colleague}])["Vpc"]["VpcId"]
    prod = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=8, TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": "gpuforge:cluster", "Value": "prod"}]}])["VolumeId"]
    iam.create_role(RoleName="demo-node-role-0000000", Path="/gpuforge/", AssumeRolePolicyDocument=TRUST)
    s3.create_bucket(Bucket="gpuforge-demo-notmine")
    s3.put_object(Bucket="gpuforge-demo-notmine", Key="precious", Body=b"keep me")
    return {"vpc": vpc, "sg": sg, "colleague-vpc": colleague_vpc, "prod-volume": prod}


def assert_strangers_untouched(session, strangers: dict[str, str]) -> None:
    ec2, s3, iam = session.client("ec2"), session.client("s3"), session.client("iam")
    vpcs = {v["VpcId"] for v in ec2.describe_vpcs()["Vpcs"]}
    assert {strangers["vpc"], strangers["colleague-vpc"]} <= vpcs
    assert strangers["sg"] in {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    assert strangers["prod-volume"] in {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    assert "demo-node-role-0000000" in {r["RoleName"] for r in iam.list_roles()["Roles"]}
    assert s3.get_object(Bucket="gpuforge-demo-notmine", Key="precious")["Body"].read() == b"keep me"


def ours(session, cluster_id: str) -> list:
    """What is left in the region carrying this cluster's id."""
    return [lo for lo in find_aws_leftovers("demo", REGION, session=session) if lo.owner_id == cluster_id]


def registration(home) -> dict:
    return json.loads((home / "clusters" / "demo" / "registration.json").read_text())


def live_instances(session, cluster_id: str) -> dict[str, str]:
    found = session.client("ec2").describe_instances(Filters=[
        {"Name": "tag:gpuforge:cluster-id", "Values": [cluster_id]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return {next(t["Value"] for t in i["Tags"] if t["Key"] == "Name"): i["InstanceId"]
            for r in found["Reservations"] for i in r["Instances"]}


def test_up_second_up_train_down_keeps_the_data_then_delete_data(aws, capsys, tmp_path):
    session, engines = aws
    home = tmp_path / "home"
    strangers = seed_strangers(session)
    now = datetime.now(timezone.utc)
    first_image = publish_ami(session, "gpuforge-ubuntu2204-cu130-torch213-a", now - timedelta(days=2))

    up = gpuforge(capsys, *UP)
    assert up.code == 0, up.text
    cluster_id = registration(home)["cluster_id"]
    assert registration(home)["state"] == "ready"
    nodes = live_instances(session, cluster_id)
    assert set(nodes) == {"demo-0", "demo-1"}
    assert engines.made[-1].config("demo")["gpuforge:image"] == first_image  # recorded at the first up
    assert f"image {first_image} (baked gpuforge image" in up.out

    publish_ami(session, "gpuforge-ubuntu2204-cu130-torch213-b", now - timedelta(hours=1))  # a newer one
    again = gpuforge(capsys, "up", "--cloud", "aws", "--name", "demo", "--yes")
    assert again.code == 0, again.text
    assert {op for op, _, _ in engines.last_steps()} == {"same"}  # nothing created, replaced or deleted
    assert live_instances(session, cluster_id) == nodes
    assert engines.made[-1].config("demo")["gpuforge:instanceType"] == "p4d.24xlarge"  # kept, not re-defaulted

    cluster = json.loads((home / "clusters" / "demo" / "cluster.json").read_text())
    bucket = cluster["storage_url"].removeprefix("s3://")
    trained = run(train_cmd("--job", "convnet-digits", "--storage", cluster["storage_url"], "--run-id", "r1",
                            *TINY_CONVNET, "export=none", "quantize=false", "max_steps=2", "ckpt_every=1"),
                  **{k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    assert trained.returncode == 0, trained.stderr
    s3 = session.client("s3")
    listing = s3.list_object_versions(Bucket=bucket)
    versions = listing["Versions"] + listing.get("DeleteMarkers", [])
    assert any(v["Key"] == "runs/r1/summary.json" for v in versions)

    down = gpuforge(capsys, "down", "--cluster", "demo")
    assert down.code == 0, down.text
    assert f"kept the data: s3://{bucket} ({len(versions)} object version(s)" in " ".join(down.out.split())
    assert "`gpuforge down --delete-data --cluster demo` deletes it" in down.out
    assert [lo.kind for lo in ours(session, cluster_id)] == ["bucket"]  # everything else is gone
    assert s3.list_object_versions(Bucket=bucket)["Versions"]
    assert_strangers_untouched(session, strangers)

    refused = gpuforge(capsys, "down", "--cluster", "demo", "--delete-data", stdin="n\n")
    assert refused.code == 1 and f"s3://{bucket}" in refused.out and "nothing deleted" in refused.err
    assert s3.list_object_versions(Bucket=bucket)["Versions"]

    s3.put_object(Bucket=bucket, Key="runs/r1/summary.json", Body=b"overwritten")  # a noncurrent version too
    listing = s3.list_object_versions(Bucket=bucket)
    held = human_bytes(sum(v["Size"] for v in listing["Versions"]))  # what the bucket holds, every version counted
    gone = gpuforge(capsys, "down", "--cluster", "demo", "--delete-data", stdin="y\n")
    assert gone.code == 0, gone.text
    assert f"s3://{bucket}" in gone.out and "delete it? [y/N]" in gone.out and held in gone.out, (held, gone.out)
    assert bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert ours(session, cluster_id) == [] and not (home / "clusters" / "demo").exists()
    assert_strangers_untouched(session, strangers)
    sweep = gpuforge(capsys, "sweep", "--cloud", "aws", "--cluster", "demo")
    assert sweep.code == 0 and cluster_id not in sweep.out and "colleague000" in sweep.out


def test_rolling_to_a_newer_image_is_previewed_and_confirmed(aws, capsys, tmp_path):
    session, engines = aws
    now = datetime.now(timezone.utc)
    old = publish_ami(session, "gpuforge-a", now - timedelta(days=2))
    assert gpuforge(capsys, *UP).code == 0
    cluster_id = registration(tmp_path / "home")["cluster_id"]
    nodes = live_instances(session, cluster_id)
    new = publish_ami(session, "gpuforge-b", now - timedelta(hours=1))

    declined = gpuforge(capsys, "up", "--cloud", "aws", "--name", "demo", "--roll-image", stdin="n\n")
    assert declined.code == 1
    assert f"rolling the image from {old} to {new} replaces 2 node(s): demo-node-0, demo-node-1" in \
        " ".join(declined.out.split())
    assert live_instances(session, cluster_id) == nodes and engines.made[-1].config("demo")["gpuforge:image"] == old

    rolled = gpuforge(capsys, "up", "--cloud", "aws", "--name", "demo", "--roll-image", "--yes")
    assert rolled.code == 0, rolled.text
    assert engines.made[-1].config("demo")["gpuforge:image"] == new
    assert set(live_instances(session, cluster_id)) == {"demo-0", "demo-1"}
    assert not set(live_instances(session, cluster_id).values()) & set(nodes.values())
    assert gpuforge(capsys, "down", "--cluster", "demo", "--delete-data", "--yes").code == 0
    assert ours(session, cluster_id) == []


def test_a_zone_without_capacity_is_skipped_for_the_next_that_offers_the_type(aws, capsys, tmp_path):
    session, engines = aws
    publish_ami(session, "gpuforge-a", datetime.now(timezone.utc))
    moto_ext.exhaust(f"{REGION}a", "p4d.24xlarge")

    up = gpuforge(capsys, *UP)

    assert up.code == 0, up.text
    cluster_id = registration(tmp_path / "home")["cluster_id"]
    assert f"{REGION}a has no p4d.24xlarge capacity now; trying {REGION}b (it offers the type)" in \
        " ".join(up.out.split())
    assert engines.made[-1].config("demo")["gpuforge:zone"] == f"{REGION}b"
    ec2 = session.client("ec2")
    subnets = ec2.describe_subnets(Filters=[{"Name": "tag:gpuforge:cluster-id", "Values": [cluster_id]}])["Subnets"]
    assert [s["AvailabilityZone"] for s in subnets] == [f"{REGION}b"]  # the us-east-1a attempt's subnet is gone
    assert set(live_instances(session, cluster_id)) == {"demo-0", "demo-1"}
    assert gpuforge(capsys, "down", "--cluster", "demo", "--yes").code == 0
    assert ours(session, cluster_id) == []


@pytest.mark.parametrize("point", ["early", "no-capacity-anywhere", "controller-killed"])
def test_a_failed_up_then_down_leaves_nothing_of_the_cluster(aws, capsys, tmp_path, point):
    session, engines = aws
    home = tmp_path / "home"
    strangers = seed_strangers(session)
    publish_ami(session, "gpuforge-a", datetime.now(timezone.utc))
    if point == "early":
        moto_ext.fail_next("CreateSecurityGroup", "InternalError", "An internal error has occurred.")
    elif point == "no-capacity-anywhere":
        for zone in "abcdef":
            moto_ext.exhaust(f"{REGION}{zone}", "p4d.24xlarge")
    else:
        engines.crash_after = ("ec2/instance:Instance", "demo-node-0")

    up = gpuforge(capsys, *UP)

    assert up.code != 0 and "Traceback" not in up.err
    state = registration(home)
    assert state["state"] in ("failed", "creating")  # registered before the first cloud call
    cluster_id = state["cluster_id"]
    assert ours(session, cluster_id), "the failed up should have left resources behind for down to find"
    if point == "no-capacity-anywhere":
        assert "no capacity for 2 x p4d.24xlarge in any zone that offers it" in up.err
        assert "`gpuforge down --cluster demo` removes what this `up` created" in up.err
    if point == "controller-killed":
        assert up.code == 130
        recorded = {r.id for r in engines.made[-1].recorded("demo")}
        orphan = live_instances(session, cluster_id)["demo-0"]
        assert orphan not in recorded  # only its tags can find it now
    resolve = gpuforge(capsys, "status", "--cluster", "demo")
    assert resolve.code != 0 and "gpuforge down --cluster demo" in resolve.err

    down = gpuforge(capsys, "down", "--cluster", "demo")

    assert down.code == 0, down.text
    assert ours(session, cluster_id) == []  # the empty bucket too: no data to keep
    assert not (home / "clusters" / "demo").exists()
    assert_strangers_untouched(session, strangers)
    sweep = gpuforge(capsys, "sweep", "--cloud", "aws")
    assert cluster_id not in sweep.out


def test_a_quota_too_small_stops_before_anything_is_created_and_names_it(aws, capsys, tmp_path):
    session, _ = aws
    publish_ami(session, "gpuforge-a", datetime.now(timezone.utc))
    moto_ext.set_quota(REGION, "L-417A185B", 96)  # one p4d's worth of vCPUs

    up = gpuforge(capsys, *UP)

    assert up.code == 1
    assert "L-417A185B" in up.err and "Running On-Demand P instances" in up.err
    assert "aws service-quotas request-service-quota-increase" in up.err and "--desired-value 192" in up.err
    assert session.client("ec2").describe_vpcs(Filters=[{"Name": "tag-key", "Values": ["gpuforge:cluster"]}])[
        "Vpcs"] == []
    assert not (tmp_path / "home" / "clusters" / "demo" / "registration.json").exists()


def test_the_elastic_ip_quota_is_checked_before_anything_for_efa_nodes(aws, capsys, tmp_path):
    """One Elastic IP per EFA node: 2 more with 4 of the default 5 in use stop the up before any resource exists (the
    AllocateAddress that would fail mid-up, with AddressLimitExceeded, is never reached)."""
    session, engines = aws
    publish_ami(session, "gpuforge-a", datetime.now(timezone.utc))
    for _ in range(4):
        session.client("ec2").allocate_address(Domain="vpc")  # 4 of the default 5 in use

    up = gpuforge(capsys, *UP)

    assert up.code == 1 and "L-0263D0A3" in up.err and "EC2-VPC Elastic IPs" in up.err, up.err
    assert "need 2 Elastic IP(s), but 4 of the 5 allowed are in use" in " ".join(up.err.split()), up.err
    assert not engines.all_steps()  # no `pulumi up` ran
    assert session.client("ec2").describe_vpcs(Filters=[{"Name": "tag-key", "Values": ["gpuforge:cluster"]}])[
        "Vpcs"] == []
    assert not (tmp_path / "home" / "clusters" / "demo" / "registration.json").exists()


def test_a_type_sold_only_as_capacity_blocks_is_refused_before_anything(aws, capsys, monkeypatch):
    """What DescribeInstanceTypes answers in a region where AWS sells the type only through Capacity Blocks for ML
    (moto's copy of the API lists on-demand for every type; this test edits that one record)."""
    from moto.ec2.models import ec2_backends

    record = next(t for t in ec2_backends[ACCOUNT_ID][REGION].instance_types if t["InstanceType"] == "p5e.48xlarge")
    monkeypatch.setitem(record, "SupportedUsageClasses", ["capacity-block"])
    up = gpuforge(capsys, *[a if a != "p4d.24xlarge" else "p5e.48xlarge" for a in UP])
    assert up.code == 1 and "p5e.48xlarge is sold in us-east-1 only as capacity-block, not on-demand" in up.err


def test_a_zone_that_does_not_offer_the_type_is_refused_naming_those_that_do(aws, capsys):
    up = gpuforge(capsys, *UP, "--zone", f"{REGION}f")
    assert up.code == 1
    assert f"zone {REGION}f does not offer p4d.24xlarge; zones of {REGION} that do: {REGION}a, {REGION}b" in up.err


def running_nodes(session) -> dict[str, str]:
    found = session.client("ec2").describe_instances(Filters=[
        {"Name": "tag:gpuforge:cluster", "Values": ["demo"]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return {next(t["Value"] for t in i["Tags"] if t["Key"] == "Name"): i["InstanceId"]
            for r in found["Reservations"] for i in r["Instances"]}


def test_a_second_up_after_a_newer_image_is_published_replaces_no_node(aws, capsys):
    """Regression: every up re-resolved the image, and the newer one replaced every running node."""
    session, engines = aws
    now = datetime.now(timezone.utc)
    publish_ami(session, "gpuforge-a", now - timedelta(days=2))
    assert gpuforge(capsys, *UP).code == 0
    nodes = running_nodes(session)
    publish_ami(session, "gpuforge-b", now - timedelta(hours=1))

    again = gpuforge(capsys, *UP)

    assert again.code == 0, again.text
    assert running_nodes(session) == nodes
    assert not [step for step in engines.last_steps() if step[0] in ("replace", "create", "delete")]


def test_down_with_checkpoints_in_the_bucket_succeeds_and_keeps_them(aws, capsys, tmp_path):
    """Regression: the bucket was neither retained nor force-destroyed, so `down` failed on any bucket a run had
    written to."""
    session, _ = aws
    publish_ami(session, "gpuforge-a", datetime.now(timezone.utc))
    assert gpuforge(capsys, *UP).code == 0
    bucket = json.loads((tmp_path / "home" / "clusters" / "demo" / "cluster.json").read_text())[
        "storage_url"].removeprefix("s3://")
    session.client("s3").put_object(Bucket=bucket, Key="runs/r1/step-3/model.pt", Body=b"x" * 2048)

    down = gpuforge(capsys, "down", "--cluster", "demo")

    assert down.code == 0, down.text
    assert session.client("s3").get_object(Bucket=bucket, Key="runs/r1/step-3/model.pt")["Body"].read() == b"x" * 2048
    assert f"s3://{bucket} (1 object version(s), 2.0 KB)" in " ".join(down.out.split())
    assert running_nodes(session) == {}


def up_for_recovery(session, capsys, tmp_path):
    """The 2-node cluster up: our home, its cluster id and its live instances by name."""
    publish_ami(session, "gpuforge-a100-1", datetime.now(timezone.utc) - timedelta(days=1))
    assert gpuforge(capsys, *UP).code == 0
    home = tmp_path / "home"
    cluster_id = registration(home)["cluster_id"]
    return home, cluster_id, live_instances(session, cluster_id)


def test_recovery_replaces_a_terminated_instance_in_the_same_zone(aws, capsys, tmp_path):
    """A spot node reclaimed (terminated in moto): recovery's bring_back refreshes the stack and brings it up again,
    which creates that node's instance anew, in the zone it was in; the other node is untouched."""
    from provision import inventory
    from provision.recovery import bring_back

    session, _ = aws
    home, cluster_id, before = up_for_recovery(session, capsys, tmp_path)
    ec2 = session.client("ec2")
    zone_of = {i["InstanceId"]: i["Placement"]["AvailabilityZone"]
               for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]}
    lost_name = sorted(before)[1]
    ec2.terminate_instances(InstanceIds=[before[lost_name]])
    assert lost_name not in live_instances(session, cluster_id)

    lines: list[str] = []
    cluster = bring_back(inventory.resolve(home, "demo"), home, lines.append)
    after = live_instances(session, cluster_id)
    assert set(after) == set(before) and after[lost_name] != before[lost_name]
    others = [name for name in before if name != lost_name]
    assert all(after[name] == before[name] for name in others), "the healthy node must not be replaced"
    new_zone = next(i["Placement"]["AvailabilityZone"] for r in ec2.describe_instances(
        InstanceIds=[after[lost_name]])["Reservations"] for i in r["Instances"])
    assert new_zone == zone_of[before[lost_name]]
    assert len(cluster.nodes) == 2
    assert gpuforge(capsys, "down", "--cluster", "demo", "--delete-data", "--yes").code == 0


def test_recovery_moves_the_cluster_to_the_next_zone_when_its_zone_has_no_capacity(aws, capsys, tmp_path):
    """The lost node's zone has no capacity for its replacement: the whole cluster moves to the next zone that offers
    the type (a placement group and a subnet hold one zone): every node is replaced there, in a new placement group
    and subnet, saying so; the old zone's group and subnet are gone and the cluster's zone is the new one."""
    from provision import inventory
    from provision.recovery import bring_back

    session, engines = aws
    home, cluster_id, before = up_for_recovery(session, capsys, tmp_path)
    ec2 = session.client("ec2")
    ec2.terminate_instances(InstanceIds=[before["demo-1"]])
    moto_ext.exhaust(f"{REGION}a", "p4d.24xlarge")
    capsys.readouterr()

    cluster = bring_back(inventory.resolve(home, "demo"), home, lambda line: None)

    said = " ".join(capsys.readouterr().out.split())
    assert f"{REGION}a has no p4d.24xlarge capacity now; trying {REGION}b" in said
    assert f"moving cluster demo to {REGION}b: all 2 node(s) are replaced there" in said
    after = live_instances(session, cluster_id)
    assert set(after) == {"demo-0", "demo-1"} and not set(after.values()) & set(before.values())
    # moto places an instance in its default subnet whatever the launch template says; what the cloud was asked
    # for is the template's default version (the one the instances were launched from) and the group each joined
    template = ec2.describe_launch_template_versions(
        LaunchTemplateName=ec2.describe_launch_templates()["LaunchTemplates"][0]["LaunchTemplateName"],
        Versions=["$Default"])["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    group = template["Placement"]["GroupName"]
    assert template["Placement"]["AvailabilityZone"] == f"{REGION}b" and group.startswith(f"demo-pg-{REGION}b")
    assert {moto_ext.STATE.group_of_instance[i] for i in after.values()} == {group}
    subnet = ec2.describe_subnets(SubnetIds=[template["NetworkInterfaces"][0]["SubnetId"]])["Subnets"][0]
    assert subnet["AvailabilityZone"] == f"{REGION}b"
    mine = [{"Name": "tag:gpuforge:cluster-id", "Values": [cluster_id]}]
    assert [s["AvailabilityZone"] for s in ec2.describe_subnets(Filters=mine)["Subnets"]] == [f"{REGION}b"]
    assert len(ec2.describe_placement_groups(Filters=mine)["PlacementGroups"]) == 1
    assert engines.made[-1].config("demo")["gpuforge:zone"] == f"{REGION}b"
    assert registration(home)["zone"] == f"{REGION}b" and len(cluster.nodes) == 2
    assert gpuforge(capsys, "down", "--cluster", "demo", "--delete-data", "--yes").code == 0
