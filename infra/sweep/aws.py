"""AWS half of the sweep. Every resource infra/aws.py creates carries the tag `gpuforge:cluster=<name>` (and
`gpuforge:cluster-id=<id>`): each EC2 kind is listed with a tag filter, IAM roles and instance profiles under our
path (/gpuforge/) by their tags, and the S3 buckets whose tagging has it. Resources the stack recorded are claimed
by id too. Buckets hold the user's data: a purge deletes an empty one, and one with objects only when told to."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

from infra.cluster import CLUSTER_ID_TAG, CLUSTER_TAG
from infra.errors import SweepError
from infra.sweep.common import Claim, Leftover, attempt

logger = logging.getLogger(__name__)

AWS_TAG_KEY = CLUSTER_TAG  # put on every resource by infra/aws.py
AWS_LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]  # not terminated
AWS_TERMINATE_WAIT = {"Delay": 5, "MaxAttempts": 120}  # 10 min: GPU instances can take minutes to stop
# EC2 docs: a terminated instance's network interfaces can take a few minutes to go away, and until
# then its security group, subnet and VPC refuse deletion with DependencyViolation.
DEPENDENCY_RETRY_S = 180.0
DEPENDENCY_RETRY_DELAY_S = 5.0
AWS_GONE_CODES = ("NoSuchBucket", "InvalidPlacementGroup.Unknown", "NoSuchEntity")  # plus every *.NotFound code
S3_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys per call (S3 API reference)
IAM_PATH = "/gpuforge/"  # infra/aws.py creates its role and instance profile here
REGION_TAG = "gpuforge:region"  # IAM is global: this tag says which region's cluster a role belongs to
AWS_PURGE_ORDER = ("instance", "elastic-ip", "network-interface", "volume", "key-pair", "launch-template",
                   "placement-group", "security-group", "internet-gateway", "route-table", "subnet", "vpc",
                   "iam-instance-profile", "iam-role", "bucket")
IAM_KINDS = ("iam-instance-profile", "iam-role")


# -- AWS: find --------------------------------------------------------------------------------

def tag_value(item: dict, key: str) -> str:
    return next((t["Value"] for t in item.get("Tags", []) if t["Key"] == key), "")


# kind -> (describe call, result key, id field, name field ("" = the Name tag), detail)
AWS_LISTERS: dict[str, tuple[str, str, str, str, Callable[[dict], str]]] = {
    "elastic-ip": ("describe_addresses", "Addresses", "AllocationId", "PublicIp",
                   lambda a: f"associated with {a.get('InstanceId') or a.get('NetworkInterfaceId')}"
                   if a.get("AssociationId") else "not associated"),
    "network-interface": ("describe_network_interfaces", "NetworkInterfaces", "NetworkInterfaceId", "",
                          lambda n: f"{n.get('Status', '')} {n.get('InterfaceType', '')}".strip()),
    "volume": ("describe_volumes", "Volumes", "VolumeId", "",
               lambda v: f"{v['State']}, {v['Size']} GiB, {v['AvailabilityZone']}"),
    "key-pair": ("describe_key_pairs", "KeyPairs", "KeyPairId", "KeyName", lambda k: ""),
    "launch-template": ("describe_launch_templates", "LaunchTemplates", "LaunchTemplateId", "LaunchTemplateName",
                        lambda t: f"version {t.get('LatestVersionNumber', '')}"),
    "placement-group": ("describe_placement_groups", "PlacementGroups", "GroupId", "GroupName",
                        lambda g: f"{g.get('Strategy', '')} {g.get('State', '')}".strip()),
    "security-group": ("describe_security_groups", "SecurityGroups", "GroupId", "GroupName",
                       lambda g: g.get("VpcId", "")),
    "internet-gateway": ("describe_internet_gateways", "InternetGateways", "InternetGatewayId", "",
                         lambda g: " ".join(a["VpcId"] for a in g.get("Attachments", []))),
    "route-table": ("describe_route_tables", "RouteTables", "RouteTableId", "", lambda r: r.get("VpcId", "")),
    "subnet": ("describe_subnets", "Subnets", "SubnetId", "",
               lambda s: f"{s['CidrBlock']} {s.get('AvailabilityZone', '')}"),
    "vpc": ("describe_vpcs", "Vpcs", "VpcId", "", lambda v: v["CidrBlock"]),
}


def aws_client(session: Any, service: str, region: str) -> Any:
    from botocore.config import Config

    return session.client(service, region_name=region, config=Config(retries={"mode": "standard"}))


def iter_aws_pages(client: Any, op: str, key: str, **params: Any) -> Iterator[dict]:
    if client.can_paginate(op):
        for page in client.get_paginator(op).paginate(**params):
            yield from page.get(key, [])
    else:
        yield from getattr(client, op)(**params).get(key, [])


def tag_filter(claim: Claim) -> list[dict]:
    """The EC2 filter that lists our resources: one cluster's tag value, or any value of our tag key."""
    if claim.cluster is None:
        return [{"Name": "tag-key", "Values": [AWS_TAG_KEY]}]
    return [{"Name": f"tag:{AWS_TAG_KEY}", "Values": [claim.cluster]}]


# kinds whose name is unique in the account (IAM, buckets) or the region (key pairs, placement groups, launch
# templates), so a recorded name names only this resource; others (Name tags) never claim anything
UNIQUE_NAMES = ("key-pair", "placement-group", "launch-template", "iam-role", "iam-instance-profile", "bucket")


def owned(kind: str, item_id: str, name: str, region: str, detail: str, tags_of: dict, claim: Claim) -> Leftover:
    tags = {t["Key"]: t["Value"] for t in tags_of.get("Tags", [])}
    keys = (item_id, name) if kind in UNIQUE_NAMES else (item_id,)
    return Leftover("aws", kind, item_id, name, region, detail, owner=tags.get(AWS_TAG_KEY, ""),
                    owner_id=tags.get(CLUSTER_ID_TAG, ""), recorded=claim.is_recorded(*keys))


def list_aws_kind(ec2: Any, kind: str, claim: Claim, region: str) -> list[Leftover]:
    flt = tag_filter(claim)
    if kind == "instance":
        flt.append({"Name": "instance-state-name", "Values": AWS_LIVE_STATES})
        return [owned("instance", i["InstanceId"], tag_value(i, "Name"), region,
                      f"{i['State']['Name']} {i.get('InstanceType', '')}".strip(), i, claim)
                for r in iter_aws_pages(ec2, "describe_instances", "Reservations", Filters=flt)
                for i in r["Instances"]]
    op, key, id_field, name_field, detail = AWS_LISTERS[kind]
    found = []
    for item in iter_aws_pages(ec2, op, key, Filters=flt):
        name = item.get(name_field, "") if name_field else tag_value(item, "Name")
        if kind == "security-group" and name == "default":
            continue  # deleted with its VPC, never by hand
        if kind == "route-table" and any(a.get("Main") for a in item.get("Associations", [])):
            continue  # the main route table goes with its VPC
        found.append(owned(kind, item.get(id_field) or name, name, region, detail(item), item, claim))
    return [lo for lo in found if claim.owns(lo)]


def list_aws_iam(iam: Any, claim: Claim, region: str) -> list[Leftover]:
    """Our instance profiles and roles (under IAM_PATH) whose tags name the cluster and this region (IAM is global:
    a same-named cluster's role in another region is not this sweep's). ListRoles and ListInstanceProfiles return no
    tags (IAM API reference), so each is read with GetInstanceProfile / ListRoleTags."""
    found = []
    for profile in iter_aws_pages(iam, "list_instance_profiles", "InstanceProfiles", PathPrefix=IAM_PATH):
        name = profile["InstanceProfileName"]
        full = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        roles = ", ".join(r["RoleName"] for r in full.get("Roles", []))
        found.append((owned("iam-instance-profile", name, name, "global", f"roles: {roles or 'none'}", full, claim),
                      tag_value(full, REGION_TAG)))
    for role in iter_aws_pages(iam, "list_roles", "Roles", PathPrefix=IAM_PATH):
        name = role["RoleName"]
        tags = iam.list_role_tags(RoleName=name)
        policies = iam.list_role_policies(RoleName=name).get("PolicyNames", [])
        found.append((owned("iam-role", name, name, "global", f"inline policies: {', '.join(policies) or 'none'}",
                            tags, claim), tag_value(tags, REGION_TAG)))
    return [lo for lo, where in found
            if (lo.recorded or where in ("", region)) and claim.owns(lo)]


def bucket_content(s3: Any, bucket: str) -> tuple[int, int]:
    """(object versions and delete markers, bytes) in a bucket."""
    count = size = 0
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        versions = page.get("Versions", [])
        count += len(versions) + len(page.get("DeleteMarkers", []))
        size += sum(v.get("Size", 0) for v in versions)
    return count, size


def list_aws_buckets(s3: Any, claim: Claim, region: str) -> list[Leftover]:
    from botocore.exceptions import ClientError

    found = []
    for bucket in iter_aws_pages(s3, "list_buckets", "Buckets", BucketRegion=region):
        name = bucket["Name"]
        try:
            tags = s3.get_bucket_tagging(Bucket=name)["TagSet"]
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code == "AccessDenied":
                logger.warning("cannot read the tags of s3://%s (AccessDenied): not swept", name)
            if code in ("NoSuchTagSet", "NoSuchBucket", "AccessDenied"):
                tags = []
            else:
                raise
        lo = owned("bucket", name, name, region, "", {"Tags": tags}, claim)
        if not claim.owns(lo):
            continue
        count, size = bucket_content(s3, name)
        from dataclasses import replace

        found.append(replace(lo, detail=f"{count} object version(s), {size} bytes" if count else "empty"))
    return found


def find_aws_leftovers(cluster: str | None, region: str, session: Any = None,
                       recorded: frozenset[str] = frozenset()) -> list[Leftover]:
    """Everything in `region` carrying our tag for `cluster` (None: for any cluster), or that the stack
    recorded (`recorded`: ids and names), in purge order."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    claim = Claim(cluster, frozenset(recorded))
    session = session or boto3.Session(region_name=region)
    ec2 = aws_client(session, "ec2", region)
    found: list[Leftover] = []
    for kind in AWS_PURGE_ORDER:
        try:
            if kind == "bucket":
                found += list_aws_buckets(aws_client(session, "s3", region), claim, region)
            elif kind == "iam-role":
                continue  # listed with the instance profiles
            elif kind == "iam-instance-profile":
                iam = list_aws_iam(aws_client(session, "iam", region), claim, region)
                found += sorted(iam, key=lambda lo: AWS_PURGE_ORDER.index(lo.kind))
            else:
                found += list_aws_kind(ec2, kind, claim, region)
        except (BotoCoreError, ClientError) as exc:
            raise SweepError(f"listing AWS {kind}s of {_who(cluster)} in {region} failed: {exc}") from exc
    return found


def _who(cluster: str | None) -> str:
    return f"cluster {cluster!r}" if cluster else "gpuforge clusters"


# -- AWS: purge -------------------------------------------------------------------------------

def is_aws_gone(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code.endswith("NotFound") or code in AWS_GONE_CODES


def retry_dependency(call: Callable[[], Any]) -> Any:
    """Retry `call` while AWS says DependencyViolation (ENIs of terminated instances linger)."""
    from botocore.exceptions import ClientError

    deadline = time.monotonic() + DEPENDENCY_RETRY_S
    while True:
        try:
            return call()
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "DependencyViolation" or time.monotonic() > deadline:
                raise
            logger.info("dependency still there, retrying in %.0fs: %s", DEPENDENCY_RETRY_DELAY_S, exc)
            time.sleep(DEPENDENCY_RETRY_DELAY_S)


def delete_aws_eip(ec2: Any, lo: Leftover) -> None:
    for address in ec2.describe_addresses(AllocationIds=[lo.id])["Addresses"]:
        if address.get("AssociationId"):
            ec2.disassociate_address(AssociationId=address["AssociationId"])
    ec2.release_address(AllocationId=lo.id)


def delete_aws_eni(ec2: Any, lo: Leftover) -> None:
    for eni in ec2.describe_network_interfaces(NetworkInterfaceIds=[lo.id])["NetworkInterfaces"]:
        attachment = eni.get("Attachment", {})
        if attachment.get("AttachmentId") and attachment.get("Status") != "detached":
            ec2.detach_network_interface(AttachmentId=attachment["AttachmentId"], Force=True)
            ec2.get_waiter("network_interface_available").wait(NetworkInterfaceIds=[lo.id])
    ec2.delete_network_interface(NetworkInterfaceId=lo.id)


def delete_aws_igw(ec2: Any, lo: Leftover) -> None:
    for igw in ec2.describe_internet_gateways(InternetGatewayIds=[lo.id])["InternetGateways"]:
        for attachment in igw.get("Attachments", []):
            retry_dependency(lambda: ec2.detach_internet_gateway(InternetGatewayId=lo.id,
                                                                VpcId=attachment["VpcId"]))
    ec2.delete_internet_gateway(InternetGatewayId=lo.id)


def delete_aws_route_table(ec2: Any, lo: Leftover) -> None:
    for table in ec2.describe_route_tables(RouteTableIds=[lo.id])["RouteTables"]:
        for assoc in table.get("Associations", []):
            if not assoc.get("Main") and assoc.get("RouteTableAssociationId"):
                ec2.disassociate_route_table(AssociationId=assoc["RouteTableAssociationId"])
    ec2.delete_route_table(RouteTableId=lo.id)


def delete_aws_instance_profile(iam: Any, lo: Leftover) -> None:
    """A profile is deleted once no role is in it (IAM: DeleteConflict otherwise)."""
    profile = iam.get_instance_profile(InstanceProfileName=lo.id)["InstanceProfile"]
    for role in profile.get("Roles", []):
        iam.remove_role_from_instance_profile(InstanceProfileName=lo.id, RoleName=role["RoleName"])
    iam.delete_instance_profile(InstanceProfileName=lo.id)


def delete_aws_role(iam: Any, lo: Leftover) -> None:
    """A role is deleted once its inline policies, attached policies and instance profiles are gone."""
    for name in iam.list_role_policies(RoleName=lo.id).get("PolicyNames", []):
        iam.delete_role_policy(RoleName=lo.id, PolicyName=name)
    for policy in iam.list_attached_role_policies(RoleName=lo.id).get("AttachedPolicies", []):
        iam.detach_role_policy(RoleName=lo.id, PolicyArn=policy["PolicyArn"])
    for profile in iam.list_instance_profiles_for_role(RoleName=lo.id).get("InstanceProfiles", []):
        iam.remove_role_from_instance_profile(InstanceProfileName=profile["InstanceProfileName"], RoleName=lo.id)
    iam.delete_role(RoleName=lo.id)


def empty_aws_bucket(s3: Any, bucket: str) -> None:
    """Delete every object version and delete marker, and abort multipart uploads."""
    keys = [{"Key": v["Key"], "VersionId": v["VersionId"]}
            for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket)
            for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
    for start in range(0, len(keys), S3_DELETE_BATCH):
        reply = s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[start:start + S3_DELETE_BATCH],
                                                         "Quiet": True})
        if reply.get("Errors"):
            first = reply["Errors"][0]
            raise SweepError(f"deleting {len(reply['Errors'])} objects of s3://{bucket} failed, "
                             f"first {first['Key']}: {first.get('Code')} {first.get('Message')}")
    for upload in iter_aws_pages(s3, "list_multipart_uploads", "Uploads", Bucket=bucket):
        s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])


def delete_aws_bucket(s3: Any, lo: Leftover) -> None:
    empty_aws_bucket(s3, lo.id)
    s3.delete_bucket(Bucket=lo.id)


AWS_DELETERS: dict[str, Callable[[Any, Leftover], Any]] = {
    "elastic-ip": delete_aws_eip,
    "network-interface": delete_aws_eni,
    "volume": lambda ec2, lo: ec2.delete_volume(VolumeId=lo.id),
    "key-pair": lambda ec2, lo: ec2.delete_key_pair(KeyName=lo.name),
    "launch-template": lambda ec2, lo: ec2.delete_launch_template(LaunchTemplateId=lo.id),
    "placement-group": lambda ec2, lo: ec2.delete_placement_group(GroupName=lo.name),
    "security-group": lambda ec2, lo: retry_dependency(lambda: ec2.delete_security_group(GroupId=lo.id)),
    "internet-gateway": delete_aws_igw,
    "route-table": delete_aws_route_table,
    "subnet": lambda ec2, lo: retry_dependency(lambda: ec2.delete_subnet(SubnetId=lo.id)),
    "vpc": lambda ec2, lo: retry_dependency(lambda: ec2.delete_vpc(VpcId=lo.id)),
    "iam-instance-profile": delete_aws_instance_profile,
    "iam-role": delete_aws_role,
    "bucket": delete_aws_bucket,
}


def terminate_aws_instances(ec2: Any, instances: list[Leftover]) -> list[tuple[Leftover, str | None]]:
    started = {lo.id: attempt(lambda lo=lo: ec2.terminate_instances(InstanceIds=[lo.id]), lo, is_aws_gone)
               for lo in instances}
    waiting = [i for i, err in started.items() if err is None]
    if waiting:
        try:
            ec2.get_waiter("instance_terminated").wait(InstanceIds=waiting, WaiterConfig=AWS_TERMINATE_WAIT)
        except Exception as exc:  # noqa: BLE001 - reported per instance
            started.update({i: f"not terminated: {exc}" for i in waiting})
    return [(lo, started[lo.id]) for lo in instances]


def purge_aws(leftovers: list[Leftover], session: Any, region: str = "") -> list[tuple[Leftover, str | None]]:
    """Delete in AWS_PURGE_ORDER, region by region; IAM (global) resources go last, with the region's clients."""
    import boto3

    results: list[tuple[Leftover, str | None]] = []
    regions = sorted({lo.region for lo in leftovers if lo.kind not in IAM_KINDS}) or [region or "us-east-1"]
    for i, here_region in enumerate(regions):
        last_region = i == len(regions) - 1
        here = [lo for lo in leftovers
                if lo.region == here_region or (lo.kind in IAM_KINDS and last_region)]
        session_here = session or boto3.Session(region_name=here_region)
        clients = {service: aws_client(session_here, service, here_region) for service in ("ec2", "s3", "iam")}
        results += terminate_aws_instances(clients["ec2"], [lo for lo in here if lo.kind == "instance"])
        for kind in AWS_PURGE_ORDER[1:]:
            client = clients["s3" if kind == "bucket" else "iam" if kind in IAM_KINDS else "ec2"]
            results += [(lo, attempt(lambda lo=lo: AWS_DELETERS[kind](client, lo), lo, is_aws_gone))
                        for lo in here if lo.kind == kind]
    return results
