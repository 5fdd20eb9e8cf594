"""AWS half of the sweep: every resource infra/aws.py creates carries the tag `gpuforge:cluster=<name>`;
each EC2 kind is listed with that tag filter, and the S3 buckets whose tagging has it."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

from infra.cluster import CLUSTER_TAG
from infra.errors import SweepError
from infra.sweep.common import Leftover, attempt

logger = logging.getLogger(__name__)

AWS_TAG_KEY = CLUSTER_TAG  # put on every resource by infra/aws.py
AWS_LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]  # not terminated
AWS_TERMINATE_WAIT = {"Delay": 5, "MaxAttempts": 120}  # 10 min: GPU instances can take minutes to stop
# EC2 docs: a terminated instance's network interfaces can take a few minutes to go away, and until
# then its security group, subnet and VPC refuse deletion with DependencyViolation.
DEPENDENCY_RETRY_S = 180.0
DEPENDENCY_RETRY_DELAY_S = 5.0
AWS_GONE_CODES = ("NoSuchBucket", "InvalidPlacementGroup.Unknown")  # plus every *.NotFound code
S3_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys per call (S3 API reference)
AWS_PURGE_ORDER = ("instance", "elastic-ip", "network-interface", "volume", "key-pair", "placement-group",
                   "security-group", "internet-gateway", "route-table", "subnet", "vpc", "bucket")


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


def list_aws_kind(ec2: Any, kind: str, cluster: str, region: str) -> list[Leftover]:
    flt = [{"Name": f"tag:{AWS_TAG_KEY}", "Values": [cluster]}]
    if kind == "instance":
        flt.append({"Name": "instance-state-name", "Values": AWS_LIVE_STATES})
        return [Leftover("aws", "instance", i["InstanceId"], tag_value(i, "Name"), region,
                         f"{i['State']['Name']} {i.get('InstanceType', '')}".strip())
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
        item_id = item.get(id_field) or name
        found.append(Leftover("aws", kind, item_id, name or tag_value(item, "Name"), region, detail(item)))
    return found


def list_aws_buckets(s3: Any, cluster: str, region: str) -> list[Leftover]:
    from botocore.exceptions import ClientError

    found = []
    for bucket in iter_aws_pages(s3, "list_buckets", "Buckets", BucketRegion=region):
        try:
            tags = s3.get_bucket_tagging(Bucket=bucket["Name"])["TagSet"]
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code == "AccessDenied":
                logger.warning("cannot read the tags of s3://%s (AccessDenied): not swept", bucket["Name"])
            if code in ("NoSuchTagSet", "NoSuchBucket", "AccessDenied"):
                continue
            raise
        if {"Key": AWS_TAG_KEY, "Value": cluster} not in tags:
            continue
        page = s3.list_object_versions(Bucket=bucket["Name"], MaxKeys=1)
        content = "has objects" if page.get("Versions") or page.get("DeleteMarkers") else "empty"
        found.append(Leftover("aws", "bucket", bucket["Name"], bucket["Name"], region,
                              f"{content}; kept by design unless gpuforge:forceDestroyBucket=true"))
    return found


def find_aws_leftovers(cluster: str, region: str, session: Any = None) -> list[Leftover]:
    """Everything in `region` tagged gpuforge:cluster=<cluster>, in purge order."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    session = session or boto3.Session(region_name=region)
    ec2 = aws_client(session, "ec2", region)
    found: list[Leftover] = []
    for kind in AWS_PURGE_ORDER:
        try:
            if kind == "bucket":
                found += list_aws_buckets(aws_client(session, "s3", region), cluster, region)
            else:
                found += list_aws_kind(ec2, kind, cluster, region)
        except (BotoCoreError, ClientError) as exc:
            raise SweepError(f"listing AWS {kind}s of cluster {cluster!r} in {region} failed: {exc}") from exc
    return found


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
    "placement-group": lambda ec2, lo: ec2.delete_placement_group(GroupName=lo.name),
    "security-group": lambda ec2, lo: retry_dependency(lambda: ec2.delete_security_group(GroupId=lo.id)),
    "internet-gateway": delete_aws_igw,
    "route-table": delete_aws_route_table,
    "subnet": lambda ec2, lo: retry_dependency(lambda: ec2.delete_subnet(SubnetId=lo.id)),
    "vpc": lambda ec2, lo: retry_dependency(lambda: ec2.delete_vpc(VpcId=lo.id)),
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


def purge_aws(leftovers: list[Leftover], session: Any) -> list[tuple[Leftover, str | None]]:
    import boto3

    results: list[tuple[Leftover, str | None]] = []
    for region in sorted({lo.region for lo in leftovers}):
        here = [lo for lo in leftovers if lo.region == region]
        session_here = session or boto3.Session(region_name=region)
        ec2, s3 = aws_client(session_here, "ec2", region), aws_client(session_here, "s3", region)
        results += terminate_aws_instances(ec2, [lo for lo in here if lo.kind == "instance"])
        for kind in AWS_PURGE_ORDER[1:]:
            client = s3 if kind == "bucket" else ec2
            results += [(lo, attempt(lambda lo=lo: AWS_DELETERS[kind](client, lo), lo, is_aws_gone))
                        for lo in here if lo.kind == kind]
    return results
