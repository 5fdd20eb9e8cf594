"""The real Pulumi program (infra/__main__.py) on AWS under Pulumi's mocks (preview=False).

The harness here (`run_program`) is shared with test_pulumi_gcp.py: fresh mocks and a fresh root stack
per run, every registration and invoke recorded, outputs resolved, duplicate (type, name) pairs refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pytest
from pulumi.runtime import settings

from infra import catalog
from infra.cluster import ClusterInfo
from infra.errors import SpecError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHxZ9p7test gpuforge@test"
STACK = "test"
DLAMI_ID = "ami-0dlami0000000000"
# Root device names as DescribeImages reports them: Ubuntu AMIs (Canonical's, the DLAMI) use /dev/sda1,
# Amazon Linux and many others /dev/xvda.
ROOT_DEVICES = {DLAMI_ID: "/dev/sda1", "ami-0amazonlinux0000": "/dev/xvda"}
# AWS resource types that take no tags (the API has no tags on them).
AWS_UNTAGGABLE = {
    "aws:ec2/routeTableAssociation:RouteTableAssociation",
    "aws:iam/rolePolicy:RolePolicy",
    "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
    "aws:s3/bucketOwnershipControls:BucketOwnershipControls",
    "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
    "aws:s3/bucketVersioning:BucketVersioning",
    "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration",
}


@dataclass
class Registered:
    typ: str
    name: str
    inputs: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    retain_on_delete: bool = False  # the resource option, as the engine receives it


@dataclass
class ProgramRun:
    resources: list[Registered]
    calls: list[tuple[str, dict[str, Any]]]
    outputs: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def of_type(self, suffix: str) -> list[Registered]:
        """Resources whose type ends with `suffix` (e.g. 'ec2/instance:Instance')."""
        return [r for r in self.resources if r.typ.endswith(suffix)]

    def one(self, suffix: str) -> Registered:
        found = self.of_type(suffix)
        assert len(found) == 1, f"expected one {suffix}, got {[r.name for r in found]}"
        return found[0]

    def named(self, name: str) -> Registered:
        return next(r for r in self.resources if r.name == name)

    @property
    def cluster(self) -> ClusterInfo:
        return ClusterInfo.from_dict(self.outputs["cluster"])


class RecordingMocks(pulumi.runtime.Mocks):
    """Answers like the providers would: computed ids, ARNs, addresses; every invoke the program uses."""

    def __init__(self, baked_amis: list[dict[str, Any]], gcp_images: list[dict[str, Any]]) -> None:
        self.resources: list[Registered] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.baked_amis = baked_amis
        self.gcp_images = gcp_images
        self.count = 0

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.count += 1
        outputs = dict(args.inputs)
        outputs.update(computed_outputs(args.typ, args.name, args.inputs, self.count))
        self.resources.append(Registered(args.typ, args.name, dict(args.inputs), outputs))
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        self.calls.append((args.token, dict(args.args)))
        if args.token == "aws:ec2/getAmiIds:getAmiIds":
            return {"id": "ami-ids", "ids": matching_amis(self.baked_amis, args.args.get("filters", []))}
        if args.token == "aws:ec2/getAmi:getAmi":
            (image,) = next(f["values"] for f in args.args["filters"] if f["name"] == "image-id")
            root = ROOT_DEVICES.get(image, "/dev/sda1")
            return {"id": image, "imageId": image, "rootDeviceName": root, "includeDeprecated": True}
        if args.token == "aws:ssm/getParameter:getParameter":
            return {"id": args.args["name"], "name": args.args["name"], "value": DLAMI_ID, "type": "String"}
        if args.token == "gcp:compute/getImages:getImages":
            return {"id": "images", "images": matching_images(self.gcp_images, args.args.get("filter", ""))}
        raise AssertionError(f"the program made an invoke the mocks do not answer: {args.token}")


def baked_ami(ami_id: str, os_name: str = "ubuntu-22.04", modules: str = "open") -> dict[str, Any]:
    """An AMI as images/aws.py tags it (newest first in a list, as EC2 sorts for sort_ascending=False)."""
    tags = {"gpuforge:baked": "true", "gpuforge:os": os_name, "gpuforge:driver-modules": modules}
    return {"id": ami_id, "tags": tags}


def matching_amis(amis: list[dict[str, Any]], filters: list[dict[str, Any]]) -> list[str]:
    """What EC2 DescribeImages answers for `tag:KEY` filters (any listed value matches); other filters pass."""
    wanted = {f["name"].removeprefix("tag:"): f["values"] for f in filters if f["name"].startswith("tag:")}
    return [a["id"] for a in amis if all(a["tags"].get(k) in values for k, values in wanted.items())]


def matching_images(images: list[dict[str, Any]], expression: str) -> list[dict[str, Any]]:
    """What Compute images.list answers for `expression`, by the API's documented filter rules
    (tests/fakes/gce_filter.py: a filter not in a documented form is refused, as the API refuses it with 400)."""
    from tests.fakes.gce_filter import matches, parse_filter

    terms = parse_filter(expression)
    fields = ("name", "selfLink", "creationTimestamp", "family", "labels", "archiveSizeBytes", "description",
              "diskSizeGb", "imageId", "sourceDisk", "sourceDiskId", "sourceImageId")  # what getImages returns
    return [{k: i[k] for k in fields if k in i} for i in images if matches(i, terms)]


class RecordingMonitor(pulumi.runtime.mocks.MockMonitor):
    """The mock monitor, also noting the resource options the engine would act on (retainOnDelete)."""

    def __init__(self, mocks: "RecordingMocks") -> None:
        super().__init__(mocks)
        self.retained: set[str] = set()

    def RegisterResource(self, request):  # noqa: N802 - the gRPC method name
        if request.retainOnDelete:
            self.retained.add(request.name)
        return super().RegisterResource(request)


def computed_outputs(typ: str, name: str, inputs: dict[str, Any], n: int) -> dict[str, Any]:
    """What the real provider computes on create, for the types the program reads outputs of."""
    if typ == "aws:ec2/instance:Instance":
        return {"publicIp": f"54.0.0.{n}", "privateIp": f"10.42.0.{n}", "primaryNetworkInterfaceId": f"eni-{n}"}
    if typ == "aws:ec2/eip:Eip":
        return {"publicIp": f"3.0.0.{n}"}
    if typ == "aws:s3/bucket:Bucket":
        bucket = inputs.get("bucketPrefix", "") + "20261101abc"
        return {"bucket": bucket, "arn": f"arn:aws:s3:::{bucket}"}
    if typ in ("aws:iam/role:Role", "aws:iam/instanceProfile:InstanceProfile"):
        return {"arn": f"arn:aws:iam::123456789012:{name}", "name": name}
    if typ == "aws:ec2/launchTemplate:LaunchTemplate":
        return {"latestVersion": 1}
    if typ == "aws:ec2/keyPair:KeyPair":
        return {"keyName": name}
    if typ == "aws:ec2/placementGroup:PlacementGroup":
        return {"name": name}
    if typ == "gcp:compute/instance:Instance":
        nics = [dict(nic) for nic in inputs["networkInterfaces"]]
        nics[0]["networkIp"] = f"10.42.0.{n}"
        nics[0]["accessConfigs"] = [{"natIp": f"34.0.0.{n}"}]
        return {"networkInterfaces": nics}
    if typ == "gcp:serviceaccount/account:Account":
        return {"email": f"{inputs['accountId']}@my-project-1.iam.gserviceaccount.com"}
    if typ == "gcp:storage/bucket:Bucket":
        return {"name": f"{name}-1a2b3c4", "url": f"gs://{name}-1a2b3c4"}
    if typ == "gcp:compute/resourcePolicy:ResourcePolicy":
        return {"selfLink": f"https://www.googleapis.com/compute/v1/projects/p/regions/r/resourcePolicies/{name}"}
    return {}


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


def start_mocks(config: dict[str, str], baked_amis=(), gcp_images=()) -> tuple[RecordingMocks, _ListHandler]:
    """Fresh mocks, a fresh root stack and the given stack config."""
    mocks = RecordingMocks(list(baked_amis), list(gcp_images))
    handler = _ListHandler()
    log = logging.getLogger(f"gpuforge.test.pulumi.{id(mocks)}")
    log.propagate = False
    log.addHandler(handler)
    settings.ROOT.set(None)
    mocks.monitor = RecordingMonitor(mocks)
    pulumi.runtime.set_mocks(mocks, project="gpuforge", stack=STACK, preview=False, logger=log, monitor=mocks.monitor)
    pulumi.runtime.set_all_config(config)
    return mocks, handler


def run_program(config: dict[str, str], baked_amis=(), gcp_images=()) -> ProgramRun:
    """Run infra/__main__.py's program under mocks and wait for every output."""
    from infra.__main__ import run

    mocks, handler = start_mocks(config, baked_amis, gcp_images)
    outputs: dict[str, Any] = {}

    @pulumi.runtime.test
    def program():
        return pulumi.Output.from_input(run()).apply(outputs.update)

    program()
    for resource in mocks.resources:
        resource.retain_on_delete = resource.name in mocks.monitor.retained
    keys = [(r.typ, r.name) for r in mocks.resources]
    assert len(keys) == len(set(keys)), f"duplicate resource names: {sorted(k for k in keys if keys.count(k) > 1)}"
    return ProgramRun(mocks.resources, mocks.calls, outputs, handler.messages)


def aws_config(**overrides: str) -> dict[str, str]:
    config = {
        "gpuforge:cloud": "aws",
        "gpuforge:instanceType": "g5.xlarge",
        "gpuforge:nodes": "1",
        "gpuforge:region": "us-east-1",
        "gpuforge:sshPublicKey": KEY,
        "gpuforge:sshKeyPath": "/home/me/.ssh/gpuforge_test",
        "gpuforge:sshCidrs": '["203.0.113.4/32"]',
    }
    config.update({f"gpuforge:{k}": v for k, v in overrides.items()})
    return config


@pytest.fixture(scope="module")
def p4d_pair() -> ProgramRun:
    return run_program(aws_config(instanceType="p4d.24xlarge", nodes="2"))


@pytest.fixture(scope="module")
def g5_single() -> ProgramRun:
    return run_program(aws_config())


def launch_template(run: ProgramRun) -> dict[str, Any]:
    return run.one("ec2/launchTemplate:LaunchTemplate").inputs


# -- topology -------------------------------------------------------------------------------------
def test_p4d_nodes_get_one_ena_and_an_efa_only_interface_per_network_card(p4d_pair):
    nics = launch_template(p4d_pair)["networkInterfaces"]
    group_id = p4d_pair.one("ec2/securityGroup:SecurityGroup").name + "-id"
    primary, efa = nics[0], nics[1:]
    assert (primary["deviceIndex"], primary["networkCardIndex"]) == (0, 0)
    assert "interfaceType" not in primary and primary["associatePublicIpAddress"] == "false"
    assert [n["interfaceType"] for n in efa] == ["efa-only"] * 4
    assert all(n["securityGroups"] == [group_id] for n in nics)


@pytest.mark.parametrize("instance_type,cards", [("p4d.24xlarge", 4), ("p5.48xlarge", 32), ("g5.8xlarge", 1)])
def test_efa_interfaces_follow_awss_maximum_bandwidth_layout(instance_type, cards):
    """AWS EC2 user guide, "Maximize network bandwidth on instances with multiple network cards": the primary ENA
    interface at card 0 / device 0, an efa-only one at card 0 / device 1, then one efa-only interface at device
    index 0 of every further card (regression: every efa-only interface was at device index 1)."""
    run = run_program(aws_config(instanceType=instance_type))
    nics = launch_template(run)["networkInterfaces"]
    slots = [(n["networkCardIndex"], n["deviceIndex"]) for n in nics]
    assert slots == [(0, 0), (0, 1)] + [(card, 0) for card in range(1, cards)]
    assert len(set(slots)) == len(slots)  # EC2 refuses two interfaces in one (card, device) slot


def test_p4d_nodes_share_a_cluster_placement_group(p4d_pair):
    group = p4d_pair.one("ec2/placementGroup:PlacementGroup")
    assert group.inputs["strategy"] == "cluster"
    assert launch_template(p4d_pair)["placement"]["groupName"] == group.name


@pytest.mark.parametrize(
    "instance_type,nodes,expected", [("g5.xlarge", "1", False), ("g5.xlarge", "2", True), ("p4d.24xlarge", "1", True)]
)
def test_placement_group_when_several_nodes_or_efa(instance_type, nodes, expected):
    run = run_program(aws_config(instanceType=instance_type, nodes=nodes))
    assert bool(run.of_type("PlacementGroup")) is expected
    assert (launch_template(run).get("placement") is not None) is expected


def test_multi_interface_nodes_get_an_elastic_ip_on_the_primary_interface(p4d_pair):
    # Pulumi registers resources concurrently: pair them by name (node index), not by registration order.
    eips = sorted(p4d_pair.of_type("ec2/eip:Eip"), key=lambda r: r.name)
    instances = sorted(p4d_pair.of_type("ec2/instance:Instance"), key=lambda r: r.name)
    assert [e.inputs["networkInterface"] for e in eips] == [i.outputs["primaryNetworkInterfaceId"] for i in instances]
    assert all(e.inputs["domain"] == "vpc" for e in eips)
    cluster = p4d_pair.cluster
    assert [n.public_address for n in cluster.nodes] == [e.outputs["publicIp"] for e in eips]
    assert [n.private_address for n in cluster.nodes] == [i.outputs["privateIp"] for i in instances]


def test_security_group_allows_all_traffic_from_and_to_itself(p4d_pair):
    group_id = p4d_pair.one("ec2/securityGroup:SecurityGroup").name + "-id"
    self_in = [r for r in p4d_pair.of_type("SecurityGroupIngressRule") if r.inputs.get("referencedSecurityGroupId")]
    self_out = [r for r in p4d_pair.of_type("SecurityGroupEgressRule") if r.inputs.get("referencedSecurityGroupId")]
    for rules in (self_in, self_out):
        assert len(rules) == 1
        assert rules[0].inputs["referencedSecurityGroupId"] == group_id
        assert rules[0].inputs["securityGroupId"] == group_id
        assert rules[0].inputs["ipProtocol"] == "-1"


def test_single_g5_node_has_no_placement_group_no_efa_and_a_public_ip(g5_single):
    assert not g5_single.of_type("PlacementGroup") and not g5_single.of_type("ec2/eip:Eip")
    template = launch_template(g5_single)
    assert template.get("placement") is None
    (nic,) = template["networkInterfaces"]
    assert nic["associatePublicIpAddress"] == "true" and "interfaceType" not in nic
    assert g5_single.cluster.head.public_address == g5_single.one("ec2/instance:Instance").outputs["publicIp"]


def test_network_is_a_dedicated_vpc_with_a_public_subnet_in_the_zone(g5_single):
    vpc = g5_single.one("ec2/vpc:Vpc")
    subnet = g5_single.one("ec2/subnet:Subnet")
    assert subnet.inputs["vpcId"] == f"{vpc.name}-id" and subnet.inputs["availabilityZone"] == "us-east-1a"
    (route,) = g5_single.one("ec2/routeTable:RouteTable").inputs["routes"]
    assert route == {"cidrBlock": "0.0.0.0/0", "gatewayId": g5_single.one("InternetGateway").name + "-id"}
    assert g5_single.one("RouteTableAssociation").inputs["subnetId"] == f"{subnet.name}-id"


def test_cluster_output_is_a_clusterinfo_record(p4d_pair):
    cluster = p4d_pair.cluster
    assert (cluster.name, cluster.cloud, cluster.region, cluster.state_dir) == (STACK, "aws", "us-east-1", "")
    assert cluster.storage_url == "s3://gpuforge-test-20261101abc"
    assert [(n.name, n.rank, n.ssh_port, n.user) for n in cluster.nodes] == [
        ("test-0", 0, 22, "ubuntu"), ("test-1", 1, 22, "ubuntu")
    ]
    node = cluster.head
    assert (node.gpu_model, node.gpu_count, node.instance_type) == ("A100", 8, "p4d.24xlarge")
    assert node.key_path == "/home/me/.ssh/gpuforge_test" and node.workdir == "/opt/gpuforge"
    assert cluster.extra["efa_interfaces"] == 4 and cluster.extra["nvswitch"] is True
    assert p4d_pair.outputs["costPerHour"] == catalog.hourly_cost("aws", "p4d.24xlarge", 2)
    assert json.loads(cluster.to_json())["nodes"][1]["name"] == "test-1"


# -- spot -----------------------------------------------------------------------------------------
def test_spot_uses_instance_market_options_and_on_demand_does_not(g5_single):
    spot = run_program(aws_config(spot="true"))
    (instance,) = spot.of_type("ec2/instance:Instance")
    options = instance.inputs["instanceMarketOptions"]
    assert options["marketType"] == "spot"
    assert options["spotOptions"]["instanceInterruptionBehavior"] == "terminate"
    assert "instanceMarketOptions" not in g5_single.one("ec2/instance:Instance").inputs
    assert spot.outputs["costPerHour"] < g5_single.outputs["costPerHour"]


# -- security properties -----------------------------------------------------------------------------
def ssh_rules(run: ProgramRun) -> list[Registered]:
    return [r for r in run.of_type("SecurityGroupIngressRule") if r.inputs.get("fromPort") == 22]


def test_no_ssh_ingress_without_ssh_cidrs_and_the_user_is_told_how_to_open_it():
    config = aws_config()
    del config["gpuforge:sshCidrs"]
    run = run_program(config)
    assert ssh_rules(run) == []
    for rule in run.of_type("SecurityGroupIngressRule"):
        assert rule.inputs.get("cidrIpv4") is None and rule.inputs.get("cidrIpv6") is None
    assert any("pulumi config set --path 'gpuforge:sshCidrs[0]'" in w for w in run.warnings)


def test_ssh_opens_only_to_the_configured_cidrs():
    run = run_program(aws_config(sshCidrs='["203.0.113.4/32", "198.51.100.0/24"]'))
    rules = ssh_rules(run)
    assert sorted(r.inputs["cidrIpv4"] for r in rules) == ["198.51.100.0/24", "203.0.113.4/32"]
    assert all(r.inputs.get("cidrIpv6") is None for r in rules)
    assert all((r.inputs["ipProtocol"], r.inputs["toPort"]) == ("tcp", 22) for r in rules)
    assert not [w for w in run.warnings if "sshCidrs" in w]


def test_imdsv2_is_required(p4d_pair, g5_single):
    for run in (p4d_pair, g5_single):
        metadata = launch_template(run)["metadataOptions"]
        assert metadata["httpTokens"] == "required" and metadata["httpPutResponseHopLimit"] == 1


def test_root_volume_is_encrypted_gp3_of_the_configured_size():
    run = run_program(aws_config(diskGb="512"))
    (mapping,) = launch_template(run)["blockDeviceMappings"]
    assert mapping["ebs"] == {
        "volumeSize": 512, "volumeType": "gp3", "encrypted": "true", "deleteOnTermination": "true"
    }


def test_instances_launch_from_the_template_with_key_and_profile(g5_single):
    template = launch_template(g5_single)
    assert template["keyName"] == g5_single.one("KeyPair").name
    assert g5_single.one("KeyPair").inputs["publicKey"] == KEY
    assert template["iamInstanceProfile"]["arn"].endswith(g5_single.one("InstanceProfile").name)
    instance = g5_single.one("ec2/instance:Instance")
    assert instance.inputs["launchTemplate"] == {"id": g5_single.one("LaunchTemplate").name + "-id", "version": "1"}


def test_bucket_is_private_encrypted_versioned_and_expires_old_versions(g5_single):
    bucket = g5_single.one("s3/bucket:Bucket")
    assert bucket.inputs["forceDestroy"] is False
    bucket_id = f"{bucket.name}-id"
    block = g5_single.one("BucketPublicAccessBlock").inputs
    assert block == {
        "bucket": bucket_id, "blockPublicAcls": True, "blockPublicPolicy": True,
        "ignorePublicAcls": True, "restrictPublicBuckets": True,
    }
    (rule,) = g5_single.one("BucketServerSideEncryptionConfiguration").inputs["rules"]
    assert rule["applyServerSideEncryptionByDefault"]["sseAlgorithm"] == "AES256"
    assert g5_single.one("BucketVersioning").inputs["versioningConfiguration"] == {"status": "Enabled"}
    (life,) = g5_single.one("BucketLifecycleConfiguration").inputs["rules"]
    assert life["status"] == "Enabled" and life["noncurrentVersionExpiration"]["noncurrentDays"] == 30
    assert g5_single.one("BucketOwnershipControls").inputs["rule"] == {"objectOwnership": "BucketOwnerEnforced"}


def test_the_bucket_and_its_settings_are_retained_by_a_destroy_and_nothing_else_is(g5_single):
    """Data policy: `pulumi destroy` leaves the data bucket (and the settings that keep it private and encrypted);
    `fab down --delete-data` deletes it. Everything else goes with the stack."""
    retained = {r.typ.split(":")[-1] for r in g5_single.resources if r.retain_on_delete}
    assert retained == {"Bucket", "BucketPublicAccessBlock", "BucketOwnershipControls",
                        "BucketServerSideEncryptionConfiguration", "BucketVersioning", "BucketLifecycleConfiguration"}
    assert g5_single.one("s3/bucket:Bucket").inputs["forceDestroy"] is False
    assert g5_single.outputs["bucket"] == g5_single.one("s3/bucket:Bucket").outputs["bucket"]


def test_iam_resources_live_under_our_path_with_the_region_tag(g5_single):
    for resource in (g5_single.one("iam/role:Role"), g5_single.one("InstanceProfile")):
        assert resource.inputs["path"] == "/gpuforge/"
        assert resource.inputs["tags"]["gpuforge:region"] == "us-east-1"


def test_a_cluster_id_tags_every_resource():
    run = run_program(aws_config(clusterId="abc123def456"))
    provider = run.one("pulumi:providers:aws")
    assert json.loads(provider.inputs["defaultTags"])["tags"]["gpuforge:cluster-id"] == "abc123def456"
    assert launch_template(run)["tags"]["gpuforge:cluster-id"] == "abc123def456"


def test_node_role_reaches_only_this_clusters_bucket(g5_single):
    bucket = g5_single.one("s3/bucket:Bucket")
    arn = "arn:aws:s3:::" + bucket.inputs["bucketPrefix"] + "20261101abc"
    (policy,) = g5_single.of_type("iam/rolePolicy:RolePolicy")
    statements = json.loads(policy.inputs["policy"])["Statement"]
    assert {s["Resource"] for s in statements} == {arn, f"{arn}/*"}
    for statement in statements:
        assert statement["Effect"] == "Allow"
        assert all(a.startswith("s3:") and "*" not in a for a in statement["Action"])
    trust = json.loads(g5_single.one("iam/role:Role").inputs["assumeRolePolicy"])
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    # no managed policies, no other inline policies
    assert not g5_single.of_type("RolePolicyAttachment") and not g5_single.of_type("iam/policy:Policy")


@pytest.mark.parametrize("fixture", ["p4d_pair", "g5_single"])
def test_every_taggable_resource_carries_the_cluster_tag(fixture, request):
    run: ProgramRun = request.getfixturevalue(fixture)
    for resource in run.resources:
        if not resource.typ.startswith("aws:") or resource.typ in AWS_UNTAGGABLE:
            continue
        assert resource.inputs.get("tags", {}).get("gpuforge:cluster") == STACK, resource.typ
    provider = run.one("pulumi:providers:aws")
    assert json.loads(provider.inputs["defaultTags"]) == {"tags": {"gpuforge:cluster": STACK}}
    assert provider.inputs["region"] == "us-east-1"
    specs = launch_template(run)["tagSpecifications"]
    assert {s["resourceType"] for s in specs} >= {"instance", "volume", "network-interface"}
    assert all(s["tags"] == {"gpuforge:cluster": STACK} for s in specs)


# -- image selection --------------------------------------------------------------------------------
@pytest.mark.parametrize("os_name", ["ubuntu-22.04", "ubuntu-24.04"])
def test_without_a_baked_image_the_deep_learning_ami_is_used(os_name):
    run = run_program(aws_config(os=os_name))
    assert launch_template(run)["imageId"] == DLAMI_ID
    tokens = dict(run.calls)
    baked_filters = {f["name"]: f["values"] for f in tokens["aws:ec2/getAmiIds:getAmiIds"]["filters"]}
    assert baked_filters["tag:gpuforge:baked"] == ["true"] and baked_filters["tag:gpuforge:os"] == [os_name]
    assert baked_filters["tag:gpuforge:driver-modules"] == ["open"]
    assert tokens["aws:ec2/getAmiIds:getAmiIds"]["owners"] == ["self"]
    expected = f"/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-{os_name}/latest/ami-id"
    assert tokens["aws:ssm/getParameter:getParameter"]["name"] == expected
    assert run.cluster.extra["image"] == DLAMI_ID


def test_newest_baked_image_wins_and_the_dlami_is_not_looked_up():
    run = run_program(aws_config(), baked_amis=[baked_ami("ami-0newest"), baked_ami("ami-0older")])
    assert launch_template(run)["imageId"] == "ami-0newest"
    assert [t for t, _ in run.calls] == ["aws:ec2/getAmiIds:getAmiIds", "aws:ec2/getAmi:getAmi"]
    assert any("pulumi config set gpuforge:image ami-0newest" in w for w in run.warnings)


@pytest.mark.parametrize(
    "amis, picked",
    [
        ([baked_ami("ami-0volta", modules="proprietary"), baked_ami("ami-0ampere")], "ami-0ampere"),
        ([baked_ami("ami-0volta", modules="proprietary"), baked_ami("ami-0noble", os_name="ubuntu-24.04")], DLAMI_ID),
    ],
)
def test_baked_image_of_another_driver_flavour_is_not_picked(amis, picked):
    """g5 (A10G) needs open kernel modules and the cu130 stack: an image baked for proprietary-module GPUs
    (V100/P100/P4, cu126) is not a candidate, however new."""
    run = run_program(aws_config(), baked_amis=amis)
    assert launch_template(run)["imageId"] == picked
    filters = {f["name"]: f["values"] for f in dict(run.calls)["aws:ec2/getAmiIds:getAmiIds"]["filters"]}
    assert filters["tag:gpuforge:driver-modules"] == ["open"]


def test_a_recorded_image_is_kept_and_only_its_root_device_is_read():
    run = run_program(aws_config(image="ami-0mine"), baked_amis=[baked_ami("ami-0newer")])
    assert launch_template(run)["imageId"] == "ami-0mine"
    ((token, args),) = run.calls
    assert token == "aws:ec2/getAmi:getAmi" and args["filters"] == [{"name": "image-id", "values": ["ami-0mine"]}]
    assert args["includeDeprecated"] is True  # a recorded image stays usable after AWS deprecates it
    assert not [w for w in run.warnings if "gpuforge:image" in w]


@pytest.mark.parametrize("image,device", [("ami-0amazonlinux0000", "/dev/xvda"), (DLAMI_ID, "/dev/sda1")])
def test_the_root_volume_goes_on_the_images_own_root_device(image, device):
    """Regression: /dev/sda1 was hard-coded; on an image whose root is /dev/xvda that mapping adds a second,
    empty volume and leaves the root at the image's size."""
    run = run_program(aws_config(image=image))
    (mapping,) = launch_template(run)["blockDeviceMappings"]
    assert mapping["deviceName"] == device


# -- config validation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes,fragment",
    [
        ({"gpuforge:nodes": "0"}, "nodes must be between 1 and 128, got 0"),
        ({"gpuforge:instanceType": "p4d.24xlage"}, "unknown aws instance type 'p4d.24xlage'; did you mean"),
        ({"gpuforge:region": "us-central1"}, "unknown aws region 'us-central1'"),
        ({"gpuforge:zone": "us-west-2b"}, "zone 'us-west-2b' is in region us-west-2, not us-east-1"),
        ({"gpuforge:sshCidrs": '["203.0.113.4/40"]'}, "ssh_cidrs entry '203.0.113.4/40' is not a CIDR"),
        ({"gpuforge:sshCidrs": "0.0.0.1/0"}, "ssh_cidrs entry '0.0.0.1/0' is not a CIDR"),
        ({"gpuforge:sshPublicKey": ""}, "ssh_public_key is empty"),
        ({"gpuforge:sshPublicKey": "ecdsa-sha2-nistp256 AAAAE2VjZHNh me"},
         "ssh_public_key has type ecdsa-sha2-nistp256, but EC2 imports only ssh-ed25519 and ssh-rsa keys"),
        ({"gpuforge:sshPublicKey": "sk-ssh-ed25519@openssh.com AAAAGnNr me"}, "EC2 imports only ssh-ed25519 and"),
        ({"gpuforge:sshCidrs": '["2001:db8::/64"]'}, "ssh_cidrs entry '2001:db8::/64' is IPv6, but gpuforge's aws"),
        ({"gpuforge:forceDestroyBucket": "true"}, "gpuforge:forceDestroyBucket is no longer used"),
        ({"gpuforge:instanceTyp": "g5.xlarge"}, "unknown stack config key(s) gpuforge:instanceTyp; valid keys:"),
        ({"gpuforge:accelerator": "nvidia-tesla-t4:1"}, "applies only to GCP n1 machine types"),
        ({"gpuforge:cloud": "local"}, "use `gpuforge up`"),
        ({"gpuforge:cloud": "azure"}, "cloud: Input should be 'local', 'aws' or 'gcp'"),
        ({"gpuforge:cloud": "gcp", "gpuforge:instanceType": "a2-highgpu-8g", "gpuforge:region": "us-central1"},
         "pulumi config set gcp:project"),
        ({"gpuforge:cloud": "gcp", "gpuforge:instanceType": "n1-standard-8", "gpuforge:region": "us-central1",
          "gcp:project": "my-project-1"}, "n1-standard-8 has no built-in GPUs"),
        ({"gpuforge:cloud": "gcp", "gpuforge:instanceType": "a2-highgpu-8g", "gpuforge:region": "us-central1",
          "gpuforge:zone": "us-east1-b", "gcp:project": "my-project-1"}, "zone 'us-east1-b' is in region us-east1"),
    ],
)
def test_bad_config_fails_before_any_resource_is_registered(changes, fragment):
    from infra.__main__ import run

    config = {**aws_config(), **changes}
    mocks, _ = start_mocks(config)
    with pytest.raises(SpecError) as err:
        run()
    assert fragment in str(err.value)
    assert mocks.resources == [] and mocks.calls == []


def test_stack_name_becomes_a_valid_cluster_name():
    from infra.__main__ import name_from_stack

    assert name_from_stack("Dev_Stack.2") == "dev-stack-2"
    assert name_from_stack("x" * 40) == "x" * 24
