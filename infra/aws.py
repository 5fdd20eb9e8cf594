"""AwsGpuCluster: a GPU cluster and its S3 bucket on AWS, as one Pulumi component.

Resources (every one tagged `gpuforge:cluster=<name>` and `gpuforge:cluster-id=<id>`, also through the provider's
default tags, so the sweep can tell this cluster from another of the same name):

- a dedicated VPC with one public subnet in the chosen zone, an internet gateway and a default route;
- a security group: SSH only from `ssh_cidrs` (none by default; IPv4 only, as the VPC is), all traffic from and to
  itself (NCCL and EFA need it), and egress to the internet (packages, S3);
- a cluster placement group when there is more than one node or the type has EFA;
- a launch template: the image (the one `gpuforge:image` records, see images/lookup.py), IMDSv2 required, an
  encrypted gp3 root volume on the image's own root device, the key pair, the instance profile, the placement
  group, and the network interfaces (primary ENA, plus one `efa-only` interface per EFA the catalog lists, laid
  out as AWS's guide for maximum bandwidth does);
- one instance per node (spot through instance market options when asked), and an Elastic IP per node when
  a node has several interfaces (AWS assigns no public IP then; `fab up` checks the Elastic IP quota first);
- an S3 bucket: public access blocked, SSE, versioning, old versions expired. It holds the user's data, so it and
  its settings are `retain_on_delete`: `pulumi destroy` leaves them (data policy: `fab down` keeps the data,
  `fab down --delete-data` deletes it); an IAM role (path /gpuforge/) whose only policy reaches this bucket.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pulumi
import pulumi_aws as aws

from images.lookup import BAKED_TAG, DLAMI_PARAMETER, MODULES_TAG, OS_TAG, driver_modules
from infra.autostop import aws_shutdown_behavior
from infra.cluster import CLUSTER_ID_TAG, CLUSTER_TAG
from infra.spec import ClusterSpec

logger = logging.getLogger(__name__)

VPC_CIDR = "10.42.0.0/16"
# One /20 per zone (4091 addresses: one per node; efa-only interfaces take none), the zone's index in the catalog
# choosing which: when `fab up` moves a first attempt to the next zone (capacity), the new subnet is created before
# the old one is deleted (Pulumi's default for a replacement) and two subnets of a VPC may not overlap.
SUBNET_PREFIX = 20
SSH_PORT = 22
IAM_PATH = "/gpuforge/"  # our roles and instance profiles live here: the sweep lists by this path, then by tag
REGION_TAG = "gpuforge:region"  # on IAM resources (IAM is global): which region's cluster they belong to
UNPINNED_IMAGE_HINT = (
    "gpuforge:image is not set, so this run picked the newest image; every later `pulumi up` would pick again and "
    "replace the nodes when a newer one is published. Pin it: pulumi config set gpuforge:image {image} "
    "(`gpuforge up` does this for you)"
)
NONCURRENT_VERSION_DAYS = 30  # checkpoints overwritten more than a month ago are gone
ABORT_MULTIPART_DAYS = 7  # a crashed upload's parts stop costing money after a week
IMDS_HOP_LIMIT = 1  # IMDSv2 tokens do not leave the instance (no containers in between)
BUCKET_OBJECT_ACTIONS = [
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
]
BUCKET_ACTIONS = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]


def bucket_policy_document(bucket_arn: str) -> str:
    """IAM policy that reaches this bucket and its objects, nothing else."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Sid": "Bucket", "Effect": "Allow", "Action": BUCKET_ACTIONS, "Resource": bucket_arn},
                {"Sid": "Objects", "Effect": "Allow", "Action": BUCKET_OBJECT_ACTIONS, "Resource": f"{bucket_arn}/*"},
            ],
        }
    )


EC2_TRUST_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
    }
)


def warn_unpinned(image: str) -> str:
    pulumi.log.warn(UNPINNED_IMAGE_HINT.format(image=image))
    return image


def subnet_cidr(spec: ClusterSpec) -> str:
    """The zone's /20 of the VPC (see SUBNET_PREFIX)."""
    import ipaddress

    from infra import catalog

    index = catalog.zones("aws", spec.region).index(spec.zone)
    return str(list(ipaddress.ip_network(VPC_CIDR).subnets(new_prefix=SUBNET_PREFIX))[index])


def cluster_tags(spec: ClusterSpec) -> dict[str, str]:
    """The tags every resource of the cluster carries (the sweep claims by them)."""
    tags = {CLUSTER_TAG: spec.name}
    if spec.cluster_id:
        tags[CLUSTER_ID_TAG] = spec.cluster_id
    return tags


def efa_slots(efa_interfaces: int) -> list[dict[str, int]]:
    """(network card, device index) of each efa-only interface: card 0 at device 1 (device 0 is the primary ENA
    interface), then device 0 of cards 1, 2, ... (AWS EC2 user guide, efa-acc-inst-types)."""
    return [{"network_card_index": card, "device_index": 1 if card == 0 else 0} for card in range(efa_interfaces)]


class AwsGpuCluster(pulumi.ComponentResource):
    """The cluster of `spec` on AWS; `cluster` is its ClusterInfo as a dict."""

    cluster: pulumi.Output[dict[str, Any]]

    def __init__(self, name: str, spec: ClusterSpec, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpuforge:aws:GpuCluster", name, None, opts)
        self._name = name
        self._spec = spec
        self._tags = cluster_tags(spec)
        provider = aws.Provider(
            f"{name}-aws",
            region=spec.region,
            default_tags={"tags": self._tags},
            opts=pulumi.ResourceOptions(parent=self),
        )
        self._provider = provider
        self._child = pulumi.ResourceOptions(parent=self, provider=provider)

        subnet, gateway = self._create_network()
        group = self._create_security_group(subnet.vpc_id)
        bucket = self._create_bucket()
        profile = self._create_instance_profile(bucket)
        key = aws.ec2.KeyPair(f"{name}-key", public_key=spec.ssh_public_key, tags=self._tags, opts=self._child)
        placement = self._create_placement_group()
        self.image = self._choose_image()
        template = self._create_launch_template(subnet, group, profile, key, placement)
        addresses = [self._create_node(rank, template, gateway) for rank in range(spec.nodes)]

        self.bucket_name = bucket.bucket
        self.cluster = self._cluster_output(addresses, bucket.bucket)
        self.register_outputs({"cluster": self.cluster, "bucket": bucket.bucket, "image": self.image})

    def _opts(self, **kwargs: Any) -> pulumi.ResourceOptions:
        return pulumi.ResourceOptions.merge(self._child, pulumi.ResourceOptions(**kwargs))

    # -- network ---------------------------------------------------------------------------
    def _create_network(self) -> tuple[aws.ec2.Subnet, aws.ec2.InternetGateway]:
        n, tags = self._name, self._tags
        vpc = aws.ec2.Vpc(
            f"{n}-vpc", cidr_block=VPC_CIDR, enable_dns_support=True, enable_dns_hostnames=True,
            tags={**tags, "Name": f"{n}-vpc"}, opts=self._child,
        )
        subnet = aws.ec2.Subnet(
            f"{n}-subnet", vpc_id=vpc.id, cidr_block=subnet_cidr(self._spec), availability_zone=self._spec.zone,
            map_public_ip_on_launch=False, tags={**tags, "Name": f"{n}-subnet"}, opts=self._child,
        )
        gateway = aws.ec2.InternetGateway(f"{n}-igw", vpc_id=vpc.id, tags=tags, opts=self._child)
        table = aws.ec2.RouteTable(
            f"{n}-rt", vpc_id=vpc.id, routes=[{"cidr_block": "0.0.0.0/0", "gateway_id": gateway.id}],
            tags=tags, opts=self._child,
        )
        aws.ec2.RouteTableAssociation(f"{n}-rta", subnet_id=subnet.id, route_table_id=table.id, opts=self._child)
        return subnet, gateway

    def _create_security_group(self, vpc_id: pulumi.Output[str]) -> aws.ec2.SecurityGroup:
        n, tags = self._name, self._tags
        group = aws.ec2.SecurityGroup(
            f"{n}-sg", vpc_id=vpc_id, description=f"gpuforge cluster {self._spec.name}", tags=tags, opts=self._child
        )
        for i, cidr in enumerate(self._spec.ssh_cidrs):  # IPv4 only: the spec refuses IPv6 (the VPC has none)
            aws.vpc.SecurityGroupIngressRule(
                f"{n}-ssh-{i}", security_group_id=group.id, ip_protocol="tcp", from_port=SSH_PORT, to_port=SSH_PORT,
                cidr_ipv4=cidr, description="SSH from gpuforge:sshCidrs", tags=tags, opts=self._child,
            )
        aws.vpc.SecurityGroupIngressRule(
            f"{n}-intra-in", security_group_id=group.id, ip_protocol="-1", referenced_security_group_id=group.id,
            description="all traffic between cluster nodes (NCCL, EFA)", tags=tags, opts=self._child,
        )
        aws.vpc.SecurityGroupEgressRule(
            f"{n}-intra-out", security_group_id=group.id, ip_protocol="-1", referenced_security_group_id=group.id,
            description="all traffic between cluster nodes (EFA requires the outbound self rule)", tags=tags,
            opts=self._child,
        )
        aws.vpc.SecurityGroupEgressRule(
            f"{n}-egress", security_group_id=group.id, ip_protocol="-1", cidr_ipv4="0.0.0.0/0",
            description="packages, S3 and other outbound traffic", tags=tags, opts=self._child,
        )
        return group

    def _create_placement_group(self) -> aws.ec2.PlacementGroup | None:
        spec = self._spec
        if (spec.nodes == 1 and spec.efa_interfaces == 0) or not spec.instance.compact_placement:
            return None
        # one group per zone: a cluster placement group holds instances of one zone only, and a cluster that moves
        # (recovery, for want of capacity) creates its new nodes before the old ones go
        return aws.ec2.PlacementGroup(f"{self._name}-pg-{spec.zone}", strategy="cluster", tags=self._tags,
                                      opts=self._child)

    # -- storage and identity --------------------------------------------------------------------
    def _create_bucket(self) -> aws.s3.Bucket:
        """The data bucket. It and its settings are retained by `pulumi destroy`: deleting the public access block or
        the encryption setting of a bucket that stays would weaken it, and the bucket holds the user's data."""
        n = self._name
        data = self._opts(retain_on_delete=True)
        bucket = aws.s3.Bucket(
            f"{n}-bucket", bucket_prefix=f"gpuforge-{self._spec.name}-", force_destroy=False, tags=self._tags,
            opts=data,
        )
        aws.s3.BucketPublicAccessBlock(
            f"{n}-bucket-pab", bucket=bucket.id, block_public_acls=True, block_public_policy=True,
            ignore_public_acls=True, restrict_public_buckets=True, opts=data,
        )
        aws.s3.BucketOwnershipControls(
            f"{n}-bucket-owner", bucket=bucket.id, rule={"object_ownership": "BucketOwnerEnforced"}, opts=data
        )
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{n}-bucket-sse", bucket=bucket.id,
            rules=[{"apply_server_side_encryption_by_default": {"sse_algorithm": "AES256"}}], opts=data,
        )
        versioning = aws.s3.BucketVersioning(
            f"{n}-bucket-versioning", bucket=bucket.id, versioning_configuration={"status": "Enabled"}, opts=data,
        )
        aws.s3.BucketLifecycleConfiguration(
            f"{n}-bucket-lifecycle", bucket=bucket.id,
            rules=[{
                "id": "expire-old-versions",
                "status": "Enabled",
                "filter": {"prefix": ""},
                "noncurrent_version_expiration": {"noncurrent_days": NONCURRENT_VERSION_DAYS},
                "abort_incomplete_multipart_upload": {"days_after_initiation": ABORT_MULTIPART_DAYS},
            }],
            opts=self._opts(depends_on=[versioning], retain_on_delete=True),
        )
        return bucket

    def _create_instance_profile(self, bucket: aws.s3.Bucket) -> aws.iam.InstanceProfile:
        n = self._name
        tags = {**self._tags, REGION_TAG: self._spec.region}
        role = aws.iam.Role(f"{n}-node-role", path=IAM_PATH, assume_role_policy=EC2_TRUST_POLICY, tags=tags,
                            opts=self._child)
        aws.iam.RolePolicy(
            f"{n}-bucket-access", role=role.id, policy=bucket.arn.apply(bucket_policy_document), opts=self._child
        )
        return aws.iam.InstanceProfile(f"{n}-profile", path=IAM_PATH, role=role.name, tags=tags, opts=self._child)

    # -- image -----------------------------------------------------------------------------------
    def _choose_image(self) -> pulumi.Output[str]:
        """The image the stack records (`gpuforge:image`, which `fab up` sets at the first up), else the newest
        baked gpuforge AMI for the OS and the GPU's kernel-module flavour, else the Deep Learning Base AMI."""
        spec = self._spec
        if spec.image:
            return pulumi.Output.from_input(spec.image)
        modules = driver_modules(spec.gpu_model)
        baked = aws.ec2.get_ami_ids_output(
            owners=["self"],
            filters=[
                {"name": f"tag:{BAKED_TAG}", "values": ["true"]},
                {"name": f"tag:{OS_TAG}", "values": [spec.os]},
                {"name": f"tag:{MODULES_TAG}", "values": [modules]},
                {"name": "state", "values": ["available"]},
            ],
            sort_ascending=False,  # newest first
            opts=self._invoke(),
        )

        def pick(ids: list[str]) -> pulumi.Output[str] | str:
            if ids:
                return ids[0]
            pulumi.log.info(f"no baked gpuforge image for {spec.os} with {modules} driver modules in {spec.region}; "
                            "using the Deep Learning AMI")
            return aws.ssm.get_parameter_output(name=DLAMI_PARAMETER.format(os=spec.os), opts=self._invoke()).value

        return baked.ids.apply(pick).apply(warn_unpinned)

    def _root_device(self) -> pulumi.Output[str]:
        """The chosen image's root device name (`/dev/sda1` on Ubuntu AMIs, `/dev/xvda` on others): the root
        volume's mapping must name it, or the instance gets a second, empty volume instead."""
        ami = aws.ec2.get_ami_output(
            filters=[{"name": "image-id", "values": [self.image]}], include_deprecated=True, opts=self._invoke()
        )
        return ami.root_device_name

    def _invoke(self) -> pulumi.InvokeOutputOptions:
        return pulumi.InvokeOutputOptions(provider=self._provider, parent=self)

    # -- nodes ------------------------------------------------------------------------------------
    def _network_interfaces(self, subnet: aws.ec2.Subnet, group: aws.ec2.SecurityGroup) -> list[dict[str, Any]]:
        """The layout of AWS's guide "Maximize network bandwidth on instances with multiple network cards": the
        primary ENA interface at network card 0, device index 0; an efa-only interface at card 0, device index 1;
        and one efa-only interface at device index 0 of each further card."""
        common = {"subnet_id": subnet.id, "security_groups": [group.id], "delete_on_termination": "true"}
        efa = self._spec.efa_interfaces
        primary = {
            **common, "device_index": 0, "network_card_index": 0,
            # AWS assigns no public IP to an instance with several interfaces; those nodes get an Elastic IP.
            "associate_public_ip_address": "false" if efa else "true",
        }
        return [primary, *[{**common, **slot, "interface_type": "efa-only"} for slot in efa_slots(efa)]]

    def _create_launch_template(
        self,
        subnet: aws.ec2.Subnet,
        group: aws.ec2.SecurityGroup,
        profile: aws.iam.InstanceProfile,
        key: aws.ec2.KeyPair,
        placement: aws.ec2.PlacementGroup | None,
    ) -> aws.ec2.LaunchTemplate:
        spec, tags = self._spec, self._tags
        tag_specs = [
            {"resource_type": kind, "tags": tags}
            for kind in ("instance", "volume", "network-interface", "spot-instances-request")
        ]
        return aws.ec2.LaunchTemplate(
            f"{self._name}-lt",
            image_id=self.image,
            instance_type=spec.instance_type,
            key_name=key.key_name,
            iam_instance_profile={"arn": profile.arn},
            metadata_options={
                "http_endpoint": "enabled",
                "http_tokens": "required",  # IMDSv2 only
                "http_put_response_hop_limit": IMDS_HOP_LIMIT,
                "instance_metadata_tags": "disabled",
            },
            block_device_mappings=[{
                "device_name": self._root_device(),
                "ebs": {
                    "volume_size": spec.disk_gb,
                    "volume_type": "gp3",
                    "encrypted": "true",
                    "delete_on_termination": "true",
                },
            }],
            network_interfaces=self._network_interfaces(subnet, group),
            placement={"group_name": placement.name, "availability_zone": spec.zone} if placement else None,
            tag_specifications=tag_specs,
            update_default_version=True,
            tags=tags,
            opts=self._child,
        )

    def _shutdown_options(self) -> dict[str, Any]:
        """Instance arguments for what an instance does when its OS shuts down (autostop's idle `poweroff`): stop,
        or terminate with autodown and on spot (infra/autostop.py). On the instance, not the launch template: EC2
        changes it in place (ModifyInstanceAttribute), where a new template version would replace the node."""
        return {"instance_initiated_shutdown_behavior": aws_shutdown_behavior(self._spec.autodown, self._spec.spot)}

    def _create_node(
        self, rank: int, template: aws.ec2.LaunchTemplate, gateway: aws.ec2.InternetGateway
    ) -> tuple[pulumi.Output[str], pulumi.Output[str]]:
        """One instance; returns its (public, private) address."""
        spec = self._spec
        market = None
        if spec.spot:
            market = {
                "market_type": "spot",
                "spot_options": {"spot_instance_type": "one-time", "instance_interruption_behavior": "terminate"},
            }
        instance = aws.ec2.Instance(
            f"{self._name}-node-{rank}",
            launch_template={"id": template.id, "version": template.latest_version.apply(str)},
            instance_type=spec.instance_type,
            instance_market_options=market,
            **self._shutdown_options(),
            tags={**self._tags, "Name": spec.node_name(rank), "gpuforge:rank": str(rank)},
            opts=self._opts(depends_on=[gateway]),
        )
        if spec.efa_interfaces == 0:
            return instance.public_ip, instance.private_ip
        eip = aws.ec2.Eip(
            f"{self._name}-eip-{rank}", domain="vpc", network_interface=instance.primary_network_interface_id,
            tags={**self._tags, "Name": spec.node_name(rank)}, opts=self._opts(depends_on=[gateway]),
        )
        return eip.public_ip, instance.private_ip

    def _cluster_output(
        self, addresses: list[tuple[pulumi.Output[str], pulumi.Output[str]]], bucket: pulumi.Output[str]
    ) -> pulumi.Output[dict[str, Any]]:
        flat = [value for pair in addresses for value in pair]

        def build(values: list[Any]) -> dict[str, Any]:
            bucket_name, image, *ips = values
            pairs = list(zip(ips[0::2], ips[1::2], strict=True))
            info = self._spec.cluster_info(pairs, f"s3://{bucket_name}", extra={"image": image, "spot": self._spec.spot})
            return info.to_dict()

        return pulumi.Output.all(bucket, self.image, *flat).apply(build)
