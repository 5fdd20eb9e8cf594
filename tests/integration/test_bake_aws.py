"""The whole AWS bake against a moto server, with the SSH part run for real against a local-cluster node.

moto stands in for EC2 and SSM (Canonical's public parameter is seeded into its SSM backend, which
refuses `/aws/...` names through the API). The builder's "address" is a local sshd node: connect_target
hands the bake the local cluster, and the default provisioning (setup_cluster) runs over SSH against it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import tomllib
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from images.aws import bake_aws
from images.common import BuilderInstance
from images.errors import BakeError
from images.spec import AWS_BASE_PARAMETERS, BakeSpec
from infra.cluster import ClusterInfo, NodeInfo
from infra.local import create_local_cluster, destroy_local_cluster
from provision.wheel import project_root, source_fingerprint
from tests.fakes.s3 import ACCOUNT_ID, REGION, s3_env, start_moto_server

pytestmark = pytest.mark.integration

BASE_AMI = "ami-12c6146b"  # an image moto ships in every region (root device /dev/sda1)
BASE_AMI_RECORD = {"ami_id": BASE_AMI, "state": "available", "public": True, "owner_id": "099720109477",
                   "root_device_type": "ebs", "root_device_name": "/dev/sda1", "architecture": "x86_64",
                   "name": "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-20261101",
                   "virtualization_type": "hvm", "hypervisor": "xen", "image_type": "machine"}
CIDRS = ("203.0.113.4/32",)
FAMILY = "gpuforge-ubuntu2204-cu130-torch213"
OTHER_FAMILY = "gpuforge-ubuntu2404-cu130-torch213"


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory):
    # Only the base AMI, not moto's ~1,000 per-region "latest" AMIs and their snapshots: each reset
    # reloads them (~1 s), and every describe_snapshots lists them.
    amis = tmp_path_factory.mktemp("moto") / "amis.json"
    amis.write_text(json.dumps([BASE_AMI_RECORD]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOTO_AMIS_PATH", str(amis))
        url, stop = start_moto_server()
        yield url
        stop()


@pytest.fixture
def session(moto_url, monkeypatch):
    """A boto3 session on a freshly reset moto server with Canonical's 22.04 parameter seeded."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")).close()
    for name, value in s3_env(moto_url).items():
        monkeypatch.setenv(name, value)
    seed_parameter(AWS_BASE_PARAMETERS["ubuntu-22.04"], BASE_AMI)
    return boto3.Session(region_name=REGION)


def seed_parameter(name: str, value: str) -> None:
    from moto.ssm.models import Parameter, ssm_backends

    ssm_backends[ACCOUNT_ID][REGION]._parameters[name].append(Parameter(
        account_id=ACCOUNT_ID, name=name, value=value, parameter_type="String", description=None,
        allowed_pattern=None, keyid=None, last_modified_date=datetime.now(timezone.utc), version=1,
        data_type="aws:ec2:image"))


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpuforge-home")  # one wheel build for the module


@pytest.fixture
def node(home, monkeypatch):
    # Some runner commands (facts, markers) forward stdin; under pytest's capture reading it raises.
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    cluster = create_local_cluster("bake-aws-node", 1, home)
    yield cluster
    destroy_local_cluster(Path(cluster.state_dir))


def inventory(ec2) -> dict[str, set[str]]:
    """Everything moto holds that a bake could leave behind (ids), to compare before/after."""
    live = ["pending", "running", "stopping", "stopped", "shutting-down"]
    return {
        "instances": {i["InstanceId"] for r in ec2.describe_instances(
            Filters=[{"Name": "instance-state-name", "Values": live}])["Reservations"] for i in r["Instances"]},
        "key_pairs": {k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]},
        "security_groups": {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]},
        "vpcs": {v["VpcId"] for v in ec2.describe_vpcs()["Vpcs"]},
        "subnets": {s["SubnetId"] for s in ec2.describe_subnets()["Subnets"]},
        "gateways": {g["InternetGatewayId"] for g in ec2.describe_internet_gateways()["InternetGateways"]},
        "route_tables": {t["RouteTableId"] for t in ec2.describe_route_tables()["RouteTables"]},
        "volumes": {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"] if v["State"] != "deleted"},
        "images": {i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]},
        "snapshots": {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]},
    }


def seed_old_images(ec2, names_and_families: list[tuple[str, str]]) -> dict[str, str]:
    """Baked-looking images made from a throwaway instance; returns name -> image id."""
    instance = ec2.run_instances(ImageId=BASE_AMI, InstanceType="g5.xlarge", MinCount=1, MaxCount=1)["Instances"][0]
    ids = {}
    for name, family in names_and_families:
        tags = [{"Key": "gpuforge:baked", "Value": "true"}, {"Key": "gpuforge:family", "Value": family},
                {"Key": "gpuforge:os", "Value": "ubuntu-22.04"}]
        ids[name] = ec2.create_image(InstanceId=instance["InstanceId"], Name=name,
                                     TagSpecifications=[{"ResourceType": "image", "Tags": tags}])["ImageId"]
    ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
    return ids


def snapshots(ec2, image_id: str) -> list[str]:
    image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    return [m["Ebs"]["SnapshotId"] for m in image["BlockDeviceMappings"] if "Ebs" in m]


def snapshot_exists(ec2, snapshot_id: str) -> bool:
    try:
        ec2.describe_snapshots(SnapshotIds=[snapshot_id])
        return True
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "InvalidSnapshot.NotFound"
        return False


def infra_image_choice(monkeypatch, ec2) -> str:
    """The AMI infra/aws.py's program launches nodes from, its getAmiIds invoke answered by moto."""
    from tests.unit import test_pulumi_aws as program

    class AmisFromMoto(program.RecordingMocks):
        def call(self, args):
            if args.token != "aws:ec2/getAmiIds:getAmiIds":
                return super().call(args)
            self.calls.append((args.token, dict(args.args)))
            filters = [{"Name": f["name"], "Values": list(f["values"])} for f in args.args["filters"]]
            images = ec2.describe_images(Owners=list(args.args["owners"]), Filters=filters)["Images"]
            newest = sorted(images, key=lambda i: (i["CreationDate"], i["Name"]), reverse=True)
            return {"id": "ami-ids", "ids": [i["ImageId"] for i in newest]}

    monkeypatch.setattr(program, "RecordingMocks", AmisFromMoto)
    run = program.run_program(program.aws_config())
    return program.launch_template(run)["imageId"]


def test_aws_bake_provisions_the_builder_images_it_for_infra_and_removes_everything_else(
        session, node, home, monkeypatch):
    ec2 = session.client("ec2")
    old = seed_old_images(ec2, [(f"{FAMILY}-2026010{i}-000000", FAMILY) for i in (1, 2, 3)]
                          + [(f"{OTHER_FAMILY}-20260101-000000", OTHER_FAMILY)])
    oldest_snapshots = snapshots(ec2, old[f"{FAMILY}-20260101-000000"])
    before = inventory(ec2)
    seen: dict[str, object] = {}

    def connect_target(builder: BuilderInstance) -> ClusterInfo:
        seen["builder"] = builder
        seen["instance"] = ec2.describe_instances(InstanceIds=[builder.id])["Reservations"][0]["Instances"][0]
        seen["groups"] = ec2.describe_security_groups(
            GroupIds=[g["GroupId"] for g in seen["instance"]["SecurityGroups"]])["SecurityGroups"]
        seen["key_mode"] = os.stat(builder.key_path).st_mode & 0o777
        root = seen["instance"]["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
        seen["volume"] = ec2.describe_volumes(VolumeIds=[root])["Volumes"][0]
        return node

    events: list[str] = []
    result = bake_aws(BakeSpec(cloud="aws", ssh_cidrs=CIDRS), home, session=session,
                      connect_target=connect_target, on_event=events.append)

    # the node was really provisioned over SSH: venv, our code at this source tree, step markers
    workdir = Path(node.head.workdir)
    stamp = (workdir / "venv" / "gpuforge-source.txt").read_text().strip()
    markers = {p.stem for p in (workdir / ".gpuforge" / "markers").glob("*.json")}
    assert {"base", "python_env", "workload", "verify"} <= markers
    # the builder was launched as promised: base AMI from the SSM parameter, IMDSv2, encrypted root, SSH only from CIDRS
    instance = seen["instance"]
    assert instance["ImageId"] == BASE_AMI and instance["InstanceType"] == "g5.xlarge"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert seen["volume"]["Encrypted"] and seen["volume"]["Size"] == 100
    rules = [p for g in seen["groups"] for p in g["IpPermissions"]]
    ssh_rules = [(p["FromPort"], [r["CidrIp"] for r in p["IpRanges"]]) for p in rules]
    assert ssh_rules == [(22, list(CIDRS))]
    assert seen["key_mode"] == 0o600
    assert {t["Key"]: t["Value"] for t in instance["Tags"]}["gpuforge:builder"] == seen["builder"].name
    # the image: tagged as infra selects it, and infra's own lookup picks it
    image = ec2.describe_images(ImageIds=[result.image_id])["Images"][0]
    tags = {t["Key"]: t["Value"] for t in image["Tags"]}
    assert image["State"] == "available" and image["Name"] == result.name and result.name.startswith(FAMILY + "-")
    assert tags["gpuforge:baked"] == "true" and tags["gpuforge:os"] == "ubuntu-22.04"
    assert (tags["gpuforge:family"], tags["gpuforge:driver"], tags["gpuforge:cuda"], tags["gpuforge:torch"]) == (
        FAMILY, "580.167.08", "13.0", "2.13.0")
    assert tags["gpuforge:source"] == stamp and len(stamp) == len(source_fingerprint())
    version = tomllib.loads((project_root() / "pyproject.toml").read_text())["project"]["version"]
    assert tags["gpuforge:version"] == version
    assert tags["gpuforge:gpu"] == "A10G" and tags["gpuforge:driver-modules"] == "open"
    snapshot_tags = ec2.describe_snapshots(SnapshotIds=snapshots(ec2, result.image_id))["Snapshots"][0]["Tags"]
    assert {"Key": "gpuforge:family", "Value": FAMILY} in snapshot_tags
    assert infra_image_choice(monkeypatch, ec2) == result.image_id
    # the builder is terminated, and nothing but the image is left; the oldest of the family is pruned
    state = ec2.describe_instances(InstanceIds=[result.builder_id])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "terminated"
    after = inventory(ec2)
    assert result.deleted_images == [old[f"{FAMILY}-20260101-000000"]]
    assert after["images"] == (before["images"] | {result.image_id}) - set(result.deleted_images)
    assert not any(snapshot_exists(ec2, s) for s in oldest_snapshots)
    assert after["snapshots"] == (before["snapshots"] | set(snapshots(ec2, result.image_id))) - set(oldest_snapshots)
    for kind in set(after) - {"images", "snapshots"}:
        assert after[kind] == before[kind], kind
    assert not (home / "bakes" / seen["builder"].name).exists()  # the local private key is gone too


def stand_in(builder: BuilderInstance) -> ClusterInfo:
    """A target for failure tests whose provision never connects."""
    node = NodeInfo(name=builder.name, rank=0, public_address=builder.public_address, private_address="10.0.0.1")
    return ClusterInfo(name=builder.name, cloud="local", nodes=(node,))


def fail_provision(cluster: ClusterInfo, home: Path) -> None:
    raise BakeError("step nvidia-driver failed on the builder")


def interrupt_provision(cluster: ClusterInfo, home: Path) -> None:
    raise KeyboardInterrupt


def sigterm_provision(cluster: ClusterInfo, home: Path) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises in the main thread before this ends
    raise AssertionError("SIGTERM did not interrupt the bake")


@pytest.mark.parametrize("provision,raised", [
    (fail_provision, BakeError),
    (interrupt_provision, KeyboardInterrupt),
    (sigterm_provision, KeyboardInterrupt),
])
def test_aws_bake_failing_during_provisioning_terminates_the_builder_and_leaves_nothing(
        session, home, provision, raised):
    ec2 = session.client("ec2")
    before = inventory(ec2)
    seen = []
    previous = signal.getsignal(signal.SIGTERM)

    with pytest.raises(raised):
        bake_aws(BakeSpec(cloud="aws", ssh_cidrs=CIDRS), home, session=session, provision=provision,
                 connect_target=lambda b: seen.append(b) or stand_in(b), on_event=lambda _: None)

    assert signal.getsignal(signal.SIGTERM) == previous  # the bake's handler is gone again
    state = ec2.describe_instances(InstanceIds=[seen[0].id])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state == "terminated"
    assert inventory(ec2) == before


def test_aws_bake_refuses_an_image_name_in_use_before_launching_anything(session, home):
    ec2 = session.client("ec2")
    taken = seed_old_images(ec2, [("golden-1", FAMILY)])["golden-1"]
    before = inventory(ec2)

    with pytest.raises(BakeError, match=f"an image named golden-1 already exists \\({taken}\\)"):
        bake_aws(BakeSpec(cloud="aws", ssh_cidrs=CIDRS, name="golden-1"), home, session=session,
                 provision=lambda c, h: None, connect_target=stand_in, on_event=lambda _: None)

    assert inventory(ec2) == before


def test_aws_bake_whose_create_image_fails_after_aws_made_it_leaves_no_image(session, home):
    """A lost CreateImage response: AWS made the image but the bake never saw its id."""
    ec2 = session.client("ec2")
    before = inventory(ec2)
    made = []

    def lose_response(parsed, **_):
        made.append(parsed["ImageId"])
        raise ClientError({"Error": {"Code": "RequestTimeout", "Message": "connection reset"}}, "CreateImage")

    session.events.register("after-call.ec2.CreateImage", lose_response)
    seen = []
    with pytest.raises(BakeError, match="create_image .* RequestTimeout"):
        bake_aws(BakeSpec(cloud="aws", ssh_cidrs=CIDRS, name="half-made"), home, session=session,
                 provision=lambda c, h: None, connect_target=lambda b: seen.append(b) or stand_in(b),
                 on_event=lambda _: None)

    assert made, "moto did create the image"
    assert ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": ["half-made"]}])["Images"] == []
    state = ec2.describe_instances(InstanceIds=[seen[0].id])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state == "terminated"
    assert inventory(ec2) == before
