"""Bake a gpuforge AMI: a builder instance provisioned over SSH, stopped, imaged, always removed.

    from images.aws import bake_aws
    from images.spec import BakeSpec
    result = bake_aws(BakeSpec(cloud="aws", ssh_cidrs=("203.0.113.4/32",)), home=Path("~/.gpuforge"))

Flow: a temporary key pair (generated here, private key 0600, deleted after); the subnet given or a
temporary VPC (subnet, internet gateway, route) and a temporary security group with SSH from
`ssh_cidrs`; the builder from Canonical's Ubuntu AMI (IMDSv2 only, encrypted gp3 root, tagged
`gpuforge:builder` and `gpuforge:cluster=<builder>` so `fab sweep` can find it after a crash); wait
running; provision over SSH (provision.setup.setup_cluster) and seal (remove the bake's key, `cloud-init
clean`); stop; `create_image` with the tags infra/aws.py selects on; wait available; tag its snapshots.
Whatever happens (an error, Ctrl-C, SIGTERM) the builder is terminated and every temporary resource
deleted, and an image whose creation had started is deregistered with its snapshots. After a
successful bake, images of the family beyond the newest `keep` are deregistered with their snapshots.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from images.common import (
    BakeRun,
    BuilderInstance,
    Cleanup,
    Event,
    aws_tags,
    builder_cluster,
    execute,
    image_metadata,
    images_to_prune,
    make_builder_key,
    remove_state,
    run_provisioning,
)
from images.errors import BakeError, BakeSpecError
from images.spec import BakeNames, BakeResult, BakeSpec
from infra.cluster import CLUSTER_TAG, ClusterInfo

logger = logging.getLogger(__name__)

BUILDER_TAG = "gpuforge:builder"
# EC2 waiters poll every 15 s by default (botocore waiter models); attempts bound each wait.
WAIT_DELAY_S = 15
RUNNING_ATTEMPTS = 40  # 10 min: GPU instances usually run within 1-2 min
STOPPED_ATTEMPTS = 40  # 10 min
TERMINATED_ATTEMPTS = 40  # 10 min
IMAGE_ATTEMPTS = 160  # 40 min: the first snapshot of a 100 GB root with CUDA and torch takes 10-30 min
TEMP_VPC_CIDR = "10.77.0.0/16"  # apart from the cluster VPC's 10.42.0.0/16 (infra/aws.py)
TEMP_SUBNET_CIDR = "10.77.0.0/24"
IMDS_HOP_LIMIT = 1  # IMDSv2 tokens stay on the instance, as on cluster nodes
SSH_PORT = 22


def bake_aws(spec: BakeSpec, home: Path, session: Any = None,
             provision: Callable[[ClusterInfo, Path], Any] | None = None,
             connect_target: Callable[[BuilderInstance], ClusterInfo] | None = None,
             on_event: Event = print) -> BakeResult:
    """Bake an AMI for `spec`; returns what was made. Raises BakeError (the builder is gone by then)."""
    if spec.cloud != "aws":
        raise BakeSpecError(f"bake_aws needs a spec with cloud='aws', got {spec.cloud!r}")
    if session is None:
        import boto3

        session = boto3.Session()
    bake = AwsBake(spec, Path(home).expanduser(), session, on_event)
    return bake.run(provision, connect_target or builder_cluster)


def client_error_text(exc: Exception) -> str:
    error = getattr(exc, "response", {}).get("Error", {})
    return f"{error.get('Code', type(exc).__name__)}: {error.get('Message', exc)}"


class AwsBake(BakeRun):
    """One bake run's state: clients, names, what has been created (in `cleanup`)."""

    def __init__(self, spec: BakeSpec, home: Path, session: Any, on_event: Event):
        from botocore.config import Config

        config = Config(retries={"mode": "standard"})  # retries throttling and 5xx only
        self.spec, self.home, self.on_event = spec, home, on_event
        self.ec2 = session.client("ec2", region_name=spec.region, config=config)
        self.ssm = session.client("ssm", region_name=spec.region, config=config)
        self.names = BakeNames.new(spec)
        self.state_dir = home / "bakes" / self.names.builder
        self.cleanup = Cleanup(on_event)
        self.temp_tags = {CLUSTER_TAG: self.names.builder, BUILDER_TAG: self.names.builder}
        self.builder_id = ""
        self.fingerprint = ""

    def call(self, what: str, fn: Callable[..., Any], **params: Any) -> Any:
        """One EC2/SSM call; an SDK error becomes a BakeError saying what was being done."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**params)
        except (ClientError, BotoCoreError) as exc:
            raise BakeError(f"{what} failed: {client_error_text(exc)}") from exc

    def tag_spec(self, *kinds: str, extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
        values = {**self.temp_tags, "Name": self.names.builder, **(extra or {})}
        tags = [{"Key": k, "Value": v} for k, v in values.items()]
        return [{"ResourceType": kind, "Tags": tags} for kind in kinds]

    def wait(self, waiter: str, attempts: int, **params: Any) -> None:
        from botocore.exceptions import WaiterError

        try:
            self.ec2.get_waiter(waiter).wait(**params, WaiterConfig={"Delay": WAIT_DELAY_S, "MaxAttempts": attempts})
        except WaiterError as exc:
            raise BakeError(f"waiting for {waiter} ({params}) failed: {exc}") from exc

    # -- the flow ----------------------------------------------------------------------------------
    def run(self, provision: Callable[..., Any] | None,
            connect_target: Callable[[BuilderInstance], ClusterInfo]) -> BakeResult:
        started = time.monotonic()
        from provision.wheel import source_fingerprint

        self.fingerprint = source_fingerprint()  # once: the tag and what the builder gets agree
        tags = aws_tags(image_metadata(self.spec, self.fingerprint), {"Name": self.names.image})
        image_id, deleted, warnings = execute(self, tags, provision, connect_target)
        seconds = time.monotonic() - started
        self.on_event(f"baked {image_id} ({self.names.image}) in {seconds:.0f}s")
        return BakeResult(cloud="aws", image_id=image_id, name=self.names.image, family=self.spec.family, tags=tags,
                          builder_id=self.builder_id, seconds=seconds, deleted_images=deleted, warnings=warnings)

    def build(self, tags: dict[str, str], provision: Callable[..., Any] | None,
              connect_target: Callable[[BuilderInstance], ClusterInfo]) -> str:
        self.check_name_free()
        ami, root_device = self.resolve_base_image()
        key_name, key_path = self.create_key_pair()
        subnet_id, group_id = self.prepare_network()
        builder = self.launch_builder(ami, root_device, key_name, key_path, subnet_id, group_id)
        self.on_event(f"provisioning {builder.id} at {builder.public_address}")
        run_provisioning(connect_target(builder), self.home, provision, self.names.builder, self.on_event,
                         self.fingerprint)
        self.on_event(f"stopping {builder.id}")
        self.call("stop_instances", self.ec2.stop_instances, InstanceIds=[builder.id])
        self.wait("instance_stopped", STOPPED_ATTEMPTS, InstanceIds=[builder.id])
        return self.create_image(builder.id, tags)

    def check_name_free(self) -> None:
        """Refuse an AMI name in use before launching anything (and so never deregister someone's image
        when cleaning up a half-made one of that name)."""
        taken = self.call("describe_images", self.ec2.describe_images, Owners=["self"],
                          Filters=[{"Name": "name", "Values": [self.names.image]}])["Images"]
        if taken:
            raise BakeError(f"an image named {self.names.image} already exists ({taken[0]['ImageId']}); "
                            "choose another name")

    def resolve_base_image(self) -> tuple[str, str]:
        """(AMI id, root device name) of the base image: an AMI id, or the one an SSM parameter names."""
        ref = self.spec.base_image_ref
        ami = ref
        if not ref.startswith("ami-"):
            name = ref.removeprefix("resolve:ssm:")
            ami = self.call(f"reading SSM parameter {name}", self.ssm.get_parameter, Name=name)["Parameter"]["Value"]
        images = self.call(f"describing base image {ami}", self.ec2.describe_images, ImageIds=[ami])["Images"]
        if not images:
            raise BakeError(f"base image {ami} (from {ref}) does not exist in {self.spec.region}")
        self.on_event(f"base image {ami} ({images[0].get('Name', '')}) from {ref}")
        return ami, images[0].get("RootDeviceName") or "/dev/sda1"

    def create_key_pair(self) -> tuple[str, Path]:
        self.cleanup.add(f"local key {self.state_dir}", lambda: remove_state(self.state_dir))
        key_path, public = make_builder_key(self.state_dir, self.names.builder)
        name = self.names.builder
        self.call("import_key_pair", self.ec2.import_key_pair, KeyName=name, PublicKeyMaterial=public.encode(),
                  TagSpecifications=self.tag_spec("key-pair"))
        self.cleanup.add(f"key pair {name}", lambda: self.ec2.delete_key_pair(KeyName=name))
        return name, key_path

    def prepare_network(self) -> tuple[str, str]:
        """(subnet id, security group id): the spec's, or temporary ones this bake removes again."""
        spec = self.spec
        if spec.subnet_id:
            subnets = self.call(f"describing subnet {spec.subnet_id}", self.ec2.describe_subnets,
                                SubnetIds=[spec.subnet_id])["Subnets"]
            vpc_id = subnets[0]["VpcId"]
            subnet_id = spec.subnet_id
        else:
            vpc_id, subnet_id = self.create_temp_network()
        if spec.security_group_id:
            return subnet_id, spec.security_group_id
        return subnet_id, self.create_security_group(vpc_id)

    def create_temp_network(self) -> tuple[str, str]:
        from infra.sweep import Leftover, delete_aws_igw, delete_aws_route_table, retry_dependency

        ec2, region = self.ec2, self.spec.region
        vpc = self.call("create_vpc", ec2.create_vpc, CidrBlock=TEMP_VPC_CIDR, TagSpecifications=self.tag_spec("vpc"))
        vpc_id = vpc["Vpc"]["VpcId"]
        self.cleanup.add(f"VPC {vpc_id}", lambda: retry_dependency(lambda: ec2.delete_vpc(VpcId=vpc_id)))
        subnet = self.call("create_subnet", ec2.create_subnet, VpcId=vpc_id, CidrBlock=TEMP_SUBNET_CIDR,
                           AvailabilityZone=self.spec.zone, TagSpecifications=self.tag_spec("subnet"))
        subnet_id = subnet["Subnet"]["SubnetId"]
        self.cleanup.add(f"subnet {subnet_id}", lambda: retry_dependency(lambda: ec2.delete_subnet(SubnetId=subnet_id)))
        igw = self.call("create_internet_gateway", ec2.create_internet_gateway,
                        TagSpecifications=self.tag_spec("internet-gateway"))["InternetGateway"]["InternetGatewayId"]
        self.cleanup.add(f"internet gateway {igw}",
                         lambda: delete_aws_igw(ec2, Leftover("aws", "internet-gateway", igw, igw, region)))
        self.call("attach_internet_gateway", ec2.attach_internet_gateway, InternetGatewayId=igw, VpcId=vpc_id)
        table = self.call("create_route_table", ec2.create_route_table, VpcId=vpc_id,
                          TagSpecifications=self.tag_spec("route-table"))["RouteTable"]["RouteTableId"]
        self.cleanup.add(f"route table {table}",
                         lambda: delete_aws_route_table(ec2, Leftover("aws", "route-table", table, table, region)))
        self.call("create_route", ec2.create_route, RouteTableId=table, DestinationCidrBlock="0.0.0.0/0",
                  GatewayId=igw)
        self.call("associate_route_table", ec2.associate_route_table, RouteTableId=table, SubnetId=subnet_id)
        self.on_event(f"temporary network: {vpc_id}, {subnet_id} in {self.spec.zone}")
        return vpc_id, subnet_id

    def create_security_group(self, vpc_id: str) -> str:
        from infra.sweep import retry_dependency

        ec2 = self.ec2
        group_id = self.call("create_security_group", ec2.create_security_group, GroupName=self.names.builder,
                             Description=f"gpuforge image bake {self.names.builder}: SSH from ssh_cidrs",
                             VpcId=vpc_id, TagSpecifications=self.tag_spec("security-group"))["GroupId"]
        self.cleanup.add(f"security group {group_id}",
                         lambda: retry_dependency(lambda: ec2.delete_security_group(GroupId=group_id)))
        v4 = [{"CidrIp": c, "Description": "gpuforge bake SSH"} for c in self.spec.ssh_cidrs if ":" not in c]
        v6 = [{"CidrIpv6": c, "Description": "gpuforge bake SSH"} for c in self.spec.ssh_cidrs if ":" in c]
        self.call("authorize_security_group_ingress", ec2.authorize_security_group_ingress, GroupId=group_id,
                  IpPermissions=[{"IpProtocol": "tcp", "FromPort": SSH_PORT, "ToPort": SSH_PORT,
                                  "IpRanges": v4, "Ipv6Ranges": v6}])
        return group_id

    def launch_builder(self, ami: str, root_device: str, key_name: str, key_path: Path, subnet_id: str,
                       group_id: str) -> BuilderInstance:
        spec = self.spec
        # Registered before the launch: an interrupt during run_instances may leave an instance whose id
        # we never saw, so cleanup finds builders by tag.
        self.cleanup.add(f"builder {self.names.builder}", self.terminate_builders)
        reservation = self.call(
            f"run_instances ({spec.instance_type} in {spec.zone})", self.ec2.run_instances,
            ImageId=ami, InstanceType=spec.instance_type, KeyName=key_name, MinCount=1, MaxCount=1,
            NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": subnet_id, "Groups": [group_id],
                                "AssociatePublicIpAddress": True, "DeleteOnTermination": True}],
            MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled",
                             "HttpPutResponseHopLimit": IMDS_HOP_LIMIT},
            BlockDeviceMappings=[{"DeviceName": root_device, "Ebs": {
                "VolumeSize": spec.disk_gb, "VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True}}],
            TagSpecifications=self.tag_spec("instance", "volume"),
        )
        instance_id = reservation["Instances"][0]["InstanceId"]
        self.builder_id = instance_id
        self.on_event(f"launched builder {instance_id} ({spec.instance_type}) from {ami}; waiting for it to run")
        self.wait("instance_running", RUNNING_ATTEMPTS, InstanceIds=[instance_id])
        desc = self.call("describe_instances", self.ec2.describe_instances, InstanceIds=[instance_id])
        instance = desc["Reservations"][0]["Instances"][0]
        if not instance.get("PublicIpAddress"):
            raise BakeError(f"builder {instance_id} has no public IP address; give a subnet_id whose instances get one")
        model, count = spec.gpus
        return BuilderInstance(
            cloud="aws", id=instance_id, name=self.names.builder, public_address=instance["PublicIpAddress"],
            private_address=instance.get("PrivateIpAddress", ""), key_path=str(key_path),
            instance_type=spec.instance_type, region=spec.region, zone=spec.zone, state_dir=str(self.state_dir),
            gpu_model=model, gpu_count=count, os_name=spec.os_name,
        )

    def terminate_builders(self) -> None:
        """Terminate every instance of this bake (by its builder tag) and wait until they are gone."""
        found = self.ec2.describe_instances(Filters=[
            {"Name": f"tag:{BUILDER_TAG}", "Values": [self.names.builder]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped", "shutting-down"]},
        ])
        ids = [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]]
        if ids:
            self.ec2.terminate_instances(InstanceIds=ids)
            self.wait("instance_terminated", TERMINATED_ATTEMPTS, InstanceIds=ids)

    def create_image(self, instance_id: str, tags: dict[str, str]) -> str:
        name = self.names.image
        self.cleanup.add(f"unfinished image {name}", lambda: self.deregister_named(name), always=False)
        self.on_event(f"creating image {name} from {instance_id}")
        image_id = self.call(
            f"create_image {name}", self.ec2.create_image, InstanceId=instance_id, Name=name,
            Description=f"gpuforge {self.spec.family} baked on {self.spec.instance_type}",
            TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
        )["ImageId"]
        self.wait("image_available", IMAGE_ATTEMPTS, ImageIds=[image_id])
        snapshots = self.snapshots_of(image_id)
        if snapshots:  # tagged afterwards: CreateImage's snapshot TagSpecifications are not everywhere
            self.call("tagging snapshots", self.ec2.create_tags, Resources=snapshots,
                      Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
        return image_id

    def snapshots_of(self, image_id: str) -> list[str]:
        images = self.ec2.describe_images(ImageIds=[image_id])["Images"]
        return [m["Ebs"]["SnapshotId"] for img in images for m in img.get("BlockDeviceMappings", [])
                if m.get("Ebs", {}).get("SnapshotId")]

    def deregister(self, image_id: str) -> None:
        """Deregister an AMI, then delete its snapshots (they would keep costing money)."""
        snapshots = self.snapshots_of(image_id)
        self.ec2.deregister_image(ImageId=image_id)
        for snapshot in snapshots:
            self.ec2.delete_snapshot(SnapshotId=snapshot)

    def deregister_named(self, name: str) -> None:
        """Remove the image called `name`, found by name: create_image may have succeeded without our
        seeing its id (a lost response, an interrupt)."""
        images = self.ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])["Images"]
        for image in images:
            self.deregister(image["ImageId"])

    def prune(self, image_id: str) -> tuple[list[str], list[str]]:
        """Deregister baked images of this family beyond the newest `keep`; failures become warnings."""
        try:
            images = self.ec2.describe_images(Owners=["self"], Filters=[
                {"Name": "tag:gpuforge:baked", "Values": ["true"]},
                {"Name": "tag:gpuforge:family", "Values": [self.spec.family]},
                {"Name": "state", "Values": ["available"]},
            ])["Images"]
        except Exception as exc:  # noqa: BLE001 - the image is made; pruning is best effort
            return [], [f"listing images of {self.spec.family} to prune failed: {client_error_text(exc)}"]
        old = images_to_prune(images, self.spec.keep, key=lambda i: (i.get("CreationDate", ""), i.get("Name", "")),
                              keep_id=image_id, id_of=lambda i: i["ImageId"])
        deleted, warnings = [], []
        for image in old:
            try:
                self.deregister(image["ImageId"])
                deleted.append(image["ImageId"])
                self.on_event(f"deregistered old image {image['ImageId']} ({image.get('Name', '')}) and its snapshots")
            except Exception as exc:  # noqa: BLE001
                warnings.append(f"could not deregister {image['ImageId']}: {client_error_text(exc)}")
        return deleted, warnings
